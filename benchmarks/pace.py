"""This machine's pace today, in the two figures the README's Tests section compares runs of the
suite by: a ResNet-18 training step (fp32, batch 64, 32 px, SGD, torch's default threads), and
the time a fresh process takes to import torch, torchvision and timm (what every command and
notebook kernel pays first).

    python benchmarks/pace.py [--steps 10] [--imports 2]

The step is the median of `steps` after 3 of warm-up (issue #22 measured 0.29 s on this kind of
machine); the import time the median of `imports` fresh processes (0: not measured). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision


def step_seconds(steps: int, warmup: int = 3) -> float:
    model = torchvision.models.resnet18(num_classes=100)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_seconds(runs: int) -> float | None:
    if runs < 1:
        return None
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, torchvision, timm"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--imports", type=int, default=2)
    a = ap.parse_args(argv)
    result = {"resnet18_step_s": round(step_seconds(a.steps), 3), "import_s": import_seconds(a.imports),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if result["import_s"] is not None:
        result["import_s"] = round(result["import_s"], 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
