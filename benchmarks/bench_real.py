"""Real photographs: the `cpu` preset, trained through the command line's own code, against a
plain fine-tuning loop, on the same validation split of the same folder, one after the other.

    python benchmarks/bench_real.py DATA WEIGHTS [key=value ...]
    python benchmarks/bench_real.py DATA WEIGHTS --reference [image_size=96 epochs=2]
    python benchmarks/bench_real.py DATA WEIGHTS --reference --reference-head zero   # its head started at zero
    python benchmarks/bench_real.py DATA WEIGHTS --out benchmarks/results/real_cpu_trials.jsonl  # keep it

DATA is an image folder or archive (`dataset=folder`), WEIGHTS a state_dict for the backbone
(`tf_efficientnet_lite0` unless `backbone=` says otherwise). Without `--reference`, this runs
`python -m cifarlib.train preset=cpu dataset=folder data_dir=DATA weights=WEIGHTS` plus the
overrides, in a fresh process, after warming the decode cache, and times the whole command
from start to exit. With `--reference`, it runs the plain loop below the same way, in a fresh
process of its own. Each prints one JSON line: validation top-1 and loss after the last epoch,
the time spent training and validating, the whole command's time, and the resolved settings.
A benchmark, not a test: nothing is asserted.

The plain loop (the baseline of the issue that asked for this): batch 64, AdamW with weight
decay 0.01; one head-only epoch, one-cycle up to 2e-3 (pct_start 0.99); then the rest of the
epochs on five groups from the stem to the head with peaks spaced geometrically from 1e-5 to
1e-3 (pct_start 0.3); augmentation: a flip, a 4-px reflect-padded random crop at 32 px, then
bilinear upsampling; normalised with the backbone's mean and std; `model.train()` on everything
(so frozen layers' BatchNorm statistics keep updating); no Mixup, no label smoothing;
validation once, at the end. Its batches are augmented with a few tensor operations, not a
DataLoader of PIL images: as fast as such a loop gets here. For the trials that look for what
holds it back, `reference_lr_scale=K` multiplies its peak rates and `reference_frozen_bn=eval`
keeps its frozen layers' BatchNorm statistics in the head epoch; `--reference-head zero` starts
its head at zero.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"backbone": "tf_efficientnet_lite0"}


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def warm_cache(data: str, kv: dict) -> None:
    """Decode the folder once, untimed: the goal's clock runs with the decode cache warm."""
    from cifarlib.data.datasets import load_cifar
    load_cifar("folder", data, val_fraction=kv.get("val_fraction", 0.1), seed=kv.get("seed", 0),
               max_train_samples=kv.get("max_train_samples"), max_eval_samples=kv.get("max_eval_samples"),
               store_size=kv.get("store_size", 32), cache_dir=kv.get("cache_dir", "data"), device="cpu",
               data_on=kv.get("data_on", "auto"))  # pictures on disk: the cache laid out as the run reads it


# `--block-bytes`: the training command with blocks of another size in `order=block` (a module
# constant, not a setting: the benchmark bounds the block order's effect with small blocks)
BLOCKS_CHILD = ("import sys; import cifarlib.data.datasets as d; d.BLOCK_BYTES = int(sys.argv.pop(1)); "
                "from cifarlib.training.train import main; main()")


def ours(data: str, weights: str, kv: dict, block_bytes: int | None = None) -> dict:
    from cifarlib.evaluation import runs
    from cifarlib.model import checkpoints
    with tempfile.TemporaryDirectory() as tmp:
        args = {"preset": "cpu", "dataset": "folder", "data_dir": data, "weights": weights, **DEFAULTS, **kv,
                "checkpoint_dir": tmp, "run_name": "bench"}
        cmd = [sys.executable, "-m", "cifarlib.train", *[f"{k}={v}" for k, v in args.items()]]
        if block_bytes:
            cmd[1:3] = ["-c", BLOCKS_CHILD, str(block_bytes)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        command_s = time.perf_counter() - t0
        print(done.stdout, end="", file=sys.stderr)  # its device plan, budget lines and rows, as a user sees them
        if done.returncode != 0:
            raise SystemExit(f"the training command failed (exit status {done.returncode}): {' '.join(cmd)}")
        folder = Path(tmp) / "bench"
        history = checkpoints.read_history(folder / "history.csv")
        config = json.loads((folder / "config.json").read_text())
        listed = runs.read_run(folder)  # the runs table's row: its status and minutes
    last = history[-1]
    return {"who": "cpu preset", "command": " ".join(cmd[1:]), "val_top1": float(last["val_acc"]),
            "val_loss": float(last["val_loss"]), "best_val_top1": max(float(r["val_acc"]) for r in history),
            "train_val_s": round(sum(float(r["seconds"]) for r in history), 1), "command_s": round(command_s, 1),
            "epochs": [{k: r[k] for k in ("epoch", "stage", "val_acc", "val_loss", "seconds", "images_per_s")} for r in history],
            "runs_table": {k: listed.get(k) for k in ("status", "epochs_done", "epochs_planned", "budget_min", "planned_min", "actual_min", "best_val_acc")},
            "printed": [line for line in done.stdout.splitlines() if line.startswith(("budget", "re-planned", "device plan"))],
            "config": config}


def reference(data: str, weights: str, kv: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reference.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), data, weights, "--plain-loop", str(out),
               *[f"{k}={v}" for k, v in kv.items()]]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT)
        command_s = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"the plain loop failed (exit status {done.returncode})")
        result = json.loads(out.read_text())
    return {"who": "reference (plain loop)", **result, "command_s": round(command_s, 1)}


def plain_loop(data: str, weights: str, kv: dict, out: Path) -> None:
    """The baseline: a plain fine-tuning loop, as described in the module docstring."""
    import torch
    import torch.nn.functional as F

    from cifarlib.data.datasets import load_cifar
    from cifarlib.data.preprocess import normalization
    from cifarlib.model import build_model, layer_groups

    size, epochs, batch = kv.get("image_size", 96), kv.get("epochs", 2), kv.get("batch_size", 64)
    backbone = kv.get("backbone", DEFAULTS["backbone"])
    torch.manual_seed(kv.get("seed", 0))
    d = load_cifar("folder", data, val_fraction=0.1, seed=kv.get("seed", 0), max_train_samples=kv.get("max_train_samples"),
                   max_eval_samples=kv.get("max_eval_samples"), store_size=32, cache_dir=kv.get("cache_dir", "data"),
                   device="cpu")
    head_init = kv.get("reference_head", "default")  # default: as a plain loop makes it; zero: as the preset does
    model = build_model(backbone, d.num_classes, weights, head_init=head_init)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(backbone))
    groups = layer_groups(model)
    named = dict(model.named_parameters())
    five = [groups["stem"] + groups["layer1"], groups["layer2"], groups["layer3"], groups["layer4"], groups["head"]]

    def augment(x):
        b = len(x)
        x = x.float() / 255
        x = torch.where(torch.rand(b, 1, 1, 1) < 0.5, x.flip(-1), x)
        x = F.pad(x, (4, 4, 4, 4), mode="reflect")
        i, j = torch.randint(0, 9, (2, b))
        rows, cols = (i[:, None] + torch.arange(32))[:, None, :, None], (j[:, None] + torch.arange(32))[:, None, None, :]
        x = x[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        return (F.interpolate(x, size=size, mode="bilinear", align_corners=False) - mean) / std

    scale = kv.get("reference_lr_scale", 1.0)  # trials only: all its peak rates times this
    frozen_bn = kv.get("reference_frozen_bn", "train")  # trials only: "eval" keeps frozen BatchNorm's statistics

    def run_epochs(n, params, lrs, pct):
        lrs = [lr * scale for lr in lrs]
        opt = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in zip(params, lrs)], weight_decay=0.01)
        steps = len(d.train) // batch
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lrs, total_steps=n * steps, pct_start=pct)
        model.train()
        if frozen_bn == "eval":
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(q.requires_grad for q in m.parameters()):
                    m.eval()
        for _ in range(n):
            order = torch.randperm(len(d.train))
            for k in range(steps):
                idx = order[k * batch:(k + 1) * batch]
                loss = F.cross_entropy(model(augment(d.train.images[idx])), d.train.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()

    t0 = time.perf_counter()
    for name, p in named.items():
        p.requires_grad_(name in groups["head"])
    run_epochs(1, [[named[n] for n in groups["head"]]], [2e-3], 0.99)
    for p in named.values():
        p.requires_grad_(True)
    peaks = [1e-5 * 100 ** (k / 4) for k in range(5)]  # 1e-5 ... 1e-3, geometric
    run_epochs(epochs - 1, [[named[n] for n in g] for g in five], peaks, 0.3)
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(d.val), 256):
            x, y = d.val.images[k:k + 256], d.val.labels[k:k + 256]
            logits = model((F.interpolate(x.float() / 255, size=size, mode="bilinear", align_corners=False) - mean) / std)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    out.write_text(json.dumps({
        "val_top1": round(correct / len(d.val), 6), "val_loss": round(loss / len(d.val), 6),
        "train_val_s": round(time.perf_counter() - t0, 1),
        "config": {"backbone": backbone, "image_size": size, "epochs": epochs, "batch_size": batch, "head_init": head_init,
                   "lr_scale": scale, "frozen_bn": frozen_bn, "max_train_samples": kv.get("max_train_samples"),
                   "train": len(d.train),
                   "val": len(d.val), "head_lr": 2e-3, "group_peaks": [round(p, 8) for p in peaks], "weight_decay": 0.01}}))


def parse(pairs: list[str]) -> dict:
    from cifarlib.training.config import parse_value
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"expected key=value, got {' '.join(bad)}")
    return {k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an image folder or archive (dataset=folder)")
    p.add_argument("weights", help="a state_dict file for the backbone (or none: random, to check the script)")
    p.add_argument("--reference", action="store_true", help="run the plain loop instead of the cpu preset")
    p.add_argument("--reference-head", choices=("default", "zero"), default="default",
                   help="the plain loop's new head: as timm makes it (default, what a user's loop does) or at zero")
    p.add_argument("--out", metavar="FILE", help="also append the JSON line to FILE")
    p.add_argument("--block-bytes", type=int, help="order=block's block size in bytes (default: the library's 4 MB)")
    p.add_argument("--plain-loop", metavar="OUT", help=argparse.SUPPRESS)  # the timed child process
    p.add_argument("settings", nargs="*", help="key=value overrides (as for python -m cifarlib.train)")
    a = p.parse_intermixed_args()
    kv = parse(a.settings)
    if a.reference_head != "default":
        kv["reference_head"] = a.reference_head
    data = str(Path(a.data).resolve())
    weights = a.weights if a.weights in ("none", "imagenet") else str(Path(a.weights).resolve())
    if a.plain_loop:
        plain_loop(data, weights, kv, Path(a.plain_loop))
        return
    if any(k.startswith("reference_") for k in kv) and not (a.reference or a.plain_loop):
        raise SystemExit("--reference-head and reference_* settings apply to the plain loop: add --reference")
    warm_cache(data, {**kv, "store_size": 32} if a.reference else kv)
    result = reference(data, weights, kv) if a.reference else ours(data, weights, kv, a.block_bytes)
    if a.block_bytes:
        result["block_bytes"] = a.block_bytes
    result.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  load_average=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(result), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # cifarlib, without an install
    main()
