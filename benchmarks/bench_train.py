"""Training throughput: this project's loop against a faithful copy of the original loop.

Both train the same backbone on the same synthetic 32x32 images held in memory (no download),
on --device, in the same run:

- ours: `cifarlib.training.train.train_epoch` itself: device-resident uint8 data, `Batches`, the
  `original` augmentation policy on the device, under the device's own plan (bf16 autocast,
  channels_last, fused optimizer and cuDNN autotuning on CUDA), optional torch.compile;
- original: torchvision-style dataset of PIL images with the original per-sample chain, a
  DataLoader with 4 workers (as the original had) and again with one worker per core, fp32,
  batch 32, timm's Mixup/CutMix, SGD with Nesterov momentum.

Each is timed for full fine-tuning and for the first stage (frozen backbone, head only).
Each loop runs a warm-up and then its timed windows in one block; with --passes 2 (the
default) all blocks run again in reverse order, so drift in the machine's speed affects every
loop alike. The median images/s of each loop's windows is reported. Prints JSON
(and writes it to --out if given); `ratio` is ours over the original with 4 workers, full
fine-tuning. A benchmark, not a test: nothing is asserted.

    python benchmarks/bench_train.py --device cpu --image-size 64 --steps 4
    python benchmarks/bench_train.py --device cuda --image-size 224 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_augment, beside this file
from bench_augment import PilDataset, original_transform  # noqa: E402

from cifarlib.core import runtime  # noqa: E402
from cifarlib.data.augment import BatchAugment, make_policy  # noqa: E402
from cifarlib.data.datasets import Split  # noqa: E402
from cifarlib.data.preprocess import normalization  # noqa: E402
from cifarlib.data.synthetic import make_images  # noqa: E402
from cifarlib.model import GROUPS, build_model, layer_groups  # noqa: E402
from cifarlib.training import train  # noqa: E402
from cifarlib.training.config import Stage, make_config  # noqa: E402
from cifarlib.training.run import Run, StageRun  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device) -> float:
    """CUDA: peak allocated since the reset before the loop's warm-up; CPU: the process's peak
    resident set so far."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak so far


def reset_peak(device):
    """Once per loop, before its warm-up. (Emptying the cache before each timed window would make
    every window start by allocating its activations and workspaces again, on the clock.)"""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def summary(rates, batch, peak_mb, **extra):
    return {"images_per_s": round(statistics.median(rates), 1), "windows": [round(r, 1) for r in rates],
            "batch_size": batch, "peak_memory_mb": peak_mb, **extra}


def ours(a, images, labels, device, head_only: bool):
    """The project's own epoch function on windows of `steps` batches: yields images/s per window.
    It runs under the device's own plan, as training does (bf16 autocast, fused optimizer,
    channels_last and cuDNN autotuning on CUDA)."""
    cfg = make_config("original", backbone=a.backbone, weights="none", image_size=a.image_size,
                      batch_size=a.batch_size, compile=a.compile, device=str(device), optimizer=a.optimizer)
    plan = runtime.resolve_plan(device)
    plan.tune()  # cuDNN autotuning, as training turns on
    model = build_model(a.backbone, 100, "none").to(device, memory_format=plan.memory_format)  # as training
    groups = layer_groups(model)
    stage = Stage("bench", 1, ("head",), (0.01,)) if head_only else Stage("bench", 1, GROUPS, (1e-3,) * 6)
    params = train.apply_stage(model, groups, stage)
    net = torch.compile(model, dynamic=False, backend=a.compile_backend) if a.compile else model
    opt = train.make_optimizer(cfg, params, plan.fused)
    st = StageRun(0, stage, net, opt, train.make_schedule(cfg, opt, stage, (a.warmup + a.windows) * a.steps), plan.scaler())
    n = a.steps * a.batch_size
    split = Split(images[:n], labels[:n]).to(device)
    mean, std = normalization(a.backbone)
    aug = BatchAugment(make_policy("original"), a.image_size, mean, std, 100, seed=0, channels_last=plan.channels_last)
    run = Run(cfg, Path("."), plan, None, split, split, model, groups, aug)
    precision = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, gradient scaler"}.get(plan.precision, "fp32")
    yield {"batch_size": a.batch_size, "compile": a.compile_backend if a.compile else False, "precision": precision,
           "optimizer": f"{a.optimizer}{' (fused)' if plan.fused else ''}"}
    for w in range(a.warmup + a.windows):
        sync(device)
        t0 = time.perf_counter()
        train.train_epoch(run, st, epoch=w)  # ends with the epoch's loss read back: synchronised
        yield n / (time.perf_counter() - t0)  # main() drops the warm-up windows


def original(a, images, labels, device, workers: int, head_only: bool):
    """The original loop: per-sample PIL augmentation in DataLoader workers, fp32, batch 32;
    yields images/s per window."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    batch = 32
    model = build_model(a.backbone, 100, "none").to(device)  # torchvision's model, new 100-class head
    head = [p for n, p in model.named_parameters() if n in layer_groups(model)["head"]]
    if head_only:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
    params = head if head_only else list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.8, switch_prob=0.5, label_smoothing=0.1, num_classes=100)
    criterion = SoftTargetCrossEntropy()
    loader = torch.utils.data.DataLoader(
        PilDataset(images, labels, original_transform(a.image_size)), batch_size=batch, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    model.train()

    def batches():
        while True:
            yield from loader

    it = batches()
    yield {"batch_size": batch, "workers": workers, "precision": "fp32"}
    for w in range(a.warmup + a.windows):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            x, y = next(it)
            x, y = mixup(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss = criterion(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync(device)
        yield a.steps * batch / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=4, help="batches per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="windows before timing (compile, workers start)")
    p.add_argument("--passes", type=int, default=2, choices=(1, 2), help="2: run the loops again in reverse order")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=None, help="ours (default: 32 on CPU, 256 on CUDA)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="ours (the original loop runs SGD)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (eager: a quick check of the path)")
    p.add_argument("--workers", default=f"4,{len(os.sched_getaffinity(0))}", help="DataLoader workers of the original loop")
    p.add_argument("--no-head-only", action="store_true", help="time full fine-tuning only")
    p.add_argument("--only-ours", action="store_true", help="skip the original loop")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    device = torch.device(a.device)
    a.batch_size = a.batch_size or (256 if device.type == "cuda" else 32)
    pool = max(a.steps * max(a.batch_size, 32), 512)
    labels = torch.arange(pool) % 100
    images = make_images(labels, seed=0)
    torch.manual_seed(0)

    makers = {("ours", "full"): lambda: ours(a, images, labels, device, head_only=False)}
    if not a.no_head_only:
        makers[("ours", "head_only")] = lambda: ours(a, images, labels, device, head_only=True)
    for i, w in enumerate(dict.fromkeys(int(x) for x in a.workers.split(",")) if not a.only_ours else ()):
        makers[(f"original.workers_{w}", "full")] = lambda w=w: original(a, images, labels, device, w, head_only=False)
        if i == 0 and not a.no_head_only:
            makers[(f"original.workers_{w}", "head_only")] = lambda w=w: original(a, images, labels, device, w, head_only=True)
    # Each loop runs its windows in one block (so no loop's DataLoader workers take CPU from
    # another's windows), and the blocks run in order, then, with --passes 2, in reverse order,
    # so that a machine that speeds up or slows down during the run affects every loop alike.
    info, rates, peaks = {}, {key: [] for key in makers}, {key: 0.0 for key in makers}
    orders = [list(makers), list(makers)[::-1]][: a.passes]
    for order in orders:
        for key in order:
            gen = makers[key]()
            info[key] = next(gen)
            reset_peak(device)
            t0 = time.perf_counter()
            for _ in range(a.warmup):
                next(gen)
            info[key]["warmup_s"] = round(time.perf_counter() - t0, 1)  # compiling, with --compile
            for _ in range(a.windows):
                rates[key].append(next(gen))
            peaks[key] = max(peaks[key], peak_memory_mb(device))
            gen.close()  # frees the model; a DataLoader's workers stop
    result = {"ours": {}, "original": {}}
    for (who, stage), r in rates.items():
        extra = dict(info[(who, stage)])
        entry = summary(r, extra.pop("batch_size"), peaks[(who, stage)], **extra)
        if who == "ours":
            result["ours"][stage] = entry
        else:
            result["original"].setdefault(who.split(".")[1], {})[stage] = entry
    first = next(iter(result["original"].values()), None)
    ratio = lambda stage: round(result["ours"][stage]["images_per_s"] / first[stage]["images_per_s"], 2) \
        if first and stage in first and stage in result["ours"] else None  # noqa: E731
    out = {
        "benchmark": "training images/s, one stage, synthetic 32 px images upsampled to image_size",
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(), "torch": torch.__version__, "backbone": a.backbone,
        "image_size": a.image_size, "steps_per_window": a.steps, **result,
        "ratio": ratio("full"), "ratio_head_only": ratio("head_only"),
    }
    text = json.dumps(out, indent=2)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
