"""Probes of the GPU path: host syncs per training step, recompiles at a stage change, and what
saving costs. Writes one JSON file (after each probe, so a time limit keeps what was measured).

- `syncs_per_step`: training steps of `cifarlib.train.train_epoch` under
  `torch.cuda.set_sync_debug_mode("warn")`, which warns at every operation that makes the host
  wait for the GPU. Warnings raised by the loop's scheduled checks (the epoch's loss, and the
  check every `CHECK_EVERY_GPU` steps) are counted apart; the goal is 0 for everything else.
  CUDA only: `null` elsewhere, with the reason.
- `recompiles`: `prepare` + `epochs` of a three-epoch run (1 head-only epoch, 2 of everything),
  `compile=True` with a counting backend that runs the captured graphs as they are
  (`backend="eager"` with a counter): dynamo's guards, and so its recompiles, are those of the
  real backend, at a fraction of the cost. `recompiles` is the number of graphs compiled after
  the first stage's; the goal is at most 1, and none within a stage.
- `save_share`: the time the loop spends handing an epoch's files to the background saver
  (the copy to CPU memory), as a share of a full 45,000-image epoch at the training rate measured
  in the same run (the probe's own epochs are short, so this is a projection from measured
  parts); the saver's background time is reported beside it.

    python benchmarks/probe_gpu_path.py --device cuda --backbone resnet50 --image-size 224 --batch-size 256
    python benchmarks/probe_gpu_path.py --device cpu --backbone resnet18 --image-size 32 --batch-size 16 --steps 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from cifarlib import checkpoints, runtime, train
from cifarlib.augment import BatchAugment, make_policy
from cifarlib.config import Stage, make_config
from cifarlib.data import Split
from cifarlib.model import GROUPS, build_model, layer_groups
from cifarlib.preprocess import normalization
from cifarlib.synthetic import make_images

FULL_EPOCH = 45_000  # images in a CIFAR training split


def sync_probe(a, device) -> dict:
    """Host syncs per training step, by the line of code that caused them."""
    if device.type != "cuda":
        return {"syncs_per_step": None, "reason": "torch.cuda.set_sync_debug_mode needs CUDA; on the CPU, "
                "tests/test_gpu_path.py runs an epoch on the meta device, where any host read raises"}
    cfg = make_config("fast", backbone=a.backbone, weights="none", image_size=a.image_size,
                      batch_size=a.batch_size, device=str(device))
    model = build_model(a.backbone, 100, "none").to(device, memory_format=runtime.memory_format(device))
    groups = layer_groups(model)
    stage = Stage("all", 1, GROUPS, (1e-3,) * 6)
    opt = train.make_optimizer(cfg, train.apply_stage(model, groups, stage), device)
    sched = train.make_schedule(cfg, opt, stage, 10 * a.steps)
    labels = torch.arange(a.steps * a.batch_size) % 100
    split = Split(make_images(labels, seed=0), labels).to(device)
    mean, std = normalization(a.backbone)
    run = train.Run(cfg, Path("."), device, None, split, split, model, groups,
                    BatchAugment(make_policy("original"), a.image_size, mean, std, 100))
    scaler = train.make_scaler(device)
    train.runtime.tune_for_fixed_shapes(device)
    train.train_epoch(run, model, opt, sched, scaler, epoch=0)  # warm-up: allocations, cuDNN's search
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.train_epoch(run, model, opt, sched, scaler, epoch=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            key = f"{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    scheduled = {k: n for k, n in sites.items() if _is_scheduled(k)}
    other = sum(n for k, n in sites.items() if k not in scheduled)
    return {"syncs_per_step": round(other / a.steps, 3), "steps": a.steps, "sync_sites": sites,
            "scheduled_sites": sorted(scheduled)}


def _is_scheduled(site: str) -> bool:
    """Whether a sync comes from one of the loop's scheduled checks (by its source line)."""
    import inspect
    from cifarlib import loop
    name, line = site.rsplit(":", 1)
    if name != Path(loop.__file__).name:
        return False
    for fn in (loop.scheduled_check, loop.world_sums):  # the scheduled flags, the epoch's loss
        lines, start = inspect.getsourcelines(fn)
        if start <= int(line) < start + len(lines):
            return True
    return False


def tiny_run(a, device, root: Path, name: str, epochs: int, **kw):
    n = max(a.steps * a.batch_size, 2 * a.batch_size)
    cfg = make_config("cpu", dataset="synthetic", weights="none", backbone=a.backbone, batch_size=a.batch_size,
                      epochs=epochs, max_train_samples=n, max_eval_samples=a.batch_size, device=str(device),
                      data_dir=str(root / "data"), checkpoint_dir=str(root / "ckpt"), run_name=name, **kw)
    return train.prepare(cfg)


def recompile_probe(a, device, root: Path) -> dict:
    graphs: list[int] = []

    def counting(gm, example_inputs):  # the "eager" backend, counted
        graphs.append(len(gm.graph.nodes))
        return gm.forward
    torch._dynamo.reset()
    old = train.COMPILE_BACKEND
    train.COMPILE_BACKEND = counting
    try:
        run = tiny_run(a, device, root, "compile", 3, compile=True, image_size=min(a.image_size, 64))
        after = []
        for _ in train.epochs(run):
            after.append(len(graphs))
    finally:
        train.COMPILE_BACKEND = old
    stages = [r["stage"] for r in run.history]
    return {"recompiles": after[1] - after[0], "graphs_after_each_epoch": after, "stages": stages,
            "recompiles_within_a_stage": after[2] - after[1], "backend": "eager (counted)"}


def save_probe(a, device, root: Path) -> dict:
    run = tiny_run(a, device, root, "save", 2, image_size=a.image_size)
    rows = list(train.epochs(run))
    t0 = time.perf_counter()
    checkpoints.SAVER.wait()
    train_rate = max(r["images_per_s"] for r in rows) if "images_per_s" in rows[0] else None
    if train_rate is None:  # history without the column: the whole epoch's rate, validation included
        train_rate = max(len(run.train) / r["seconds"] for r in rows)
    foreground = run.saving_seconds / len(rows)
    full_epoch = FULL_EPOCH / train_rate
    files = sorted(p.name for p in run.dir.iterdir())
    return {"save_share": round(foreground / full_epoch, 5), "save_seconds_per_epoch": round(foreground, 4),
            "full_epoch_seconds_projected": round(full_epoch, 2), "training_images_per_s": round(train_rate, 1),
            "saver_wait_after_last_epoch_s": round(time.perf_counter() - t0, 3), "files": files}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="training steps per probe epoch")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    device = torch.device(a.device)
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "backbone": a.backbone, "image_size": a.image_size, "batch_size": a.batch_size,
              "check_every_gpu": train.CHECK_EVERY_GPU}
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        for name, probe in (("syncs", lambda: sync_probe(a, device)), ("save", lambda: save_probe(a, device, Path(tmp))),
                            ("compile", lambda: recompile_probe(a, device, Path(tmp)))):
            t0 = time.perf_counter()
            result.update(probe())
            result[f"{name}_probe_seconds"] = round(time.perf_counter() - t0, 1)
            out.write_text(json.dumps(result, indent=2) + "\n")  # kept if a later probe runs out of time
            print(f"{name} probe done in {result[f'{name}_probe_seconds']} s", flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
