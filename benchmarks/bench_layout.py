"""A training step of the model alone (no data path), in the default memory layout against
channels_last, on the CPU: why the device plan (`runtime.resolve_plan`) picks channels_last there too.

    python benchmarks/bench_layout.py [--image-size 64] [--batch-size 32]

Per backbone: images/s over 5 steps after 2 of warm-up, each layout measured twice in
alternating order (so drift in the machine's speed affects both alike). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # cifarlib, without an install
from cifarlib.model import build_model  # noqa: E402


def rate(model, x, y, opt, steps: int = 5, warmup: int = 2) -> float:
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return round(steps * len(x) / (time.perf_counter() - t0), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="resnet50,tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    torch.manual_seed(0)
    out = {"image_size": a.image_size, "batch_size": a.batch_size, "threads": torch.get_num_threads()}
    for name in a.backbones.split(","):
        model = build_model(name, 100, "none", head_init="default").train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(a.batch_size, 3, a.image_size, a.image_size), torch.randint(0, 100, (a.batch_size,))
        rates: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        for order in (("contiguous", "channels_last"), ("channels_last", "contiguous")):
            for layout in order:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                model.to(memory_format=fmt)
                rates[layout].append(rate(model, x.contiguous(memory_format=fmt), y, opt))
        out[name] = {**rates, "ratio": round(sum(rates["channels_last"]) / sum(rates["contiguous"]), 2)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
