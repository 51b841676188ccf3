"""Probes of the GPU path, each with SGD and with AdamW: host syncs per training step, recompiles
at a stage change, and what saving costs. Writes one JSON file (after each probe, so that a time
limit keeps what was measured).

- `syncs_per_step`: an epoch of `cifarlib.training.loop.train_epoch` (`--sync-steps` optimizer steps,
  60 by default, so that the check every 50 steps falls inside it) under
  `torch.cuda.set_sync_debug_mode("warn")`, which warns at every operation that makes the host
  wait for the GPU. Warnings raised by the loop's scheduled checks (`loop.scheduled_check`) and
  by the epoch's loss (`runtime.sum_over_ranks`) are counted apart; the goal is 0 for everything
  else. CUDA only: `null` elsewhere, with the reason.
- `recompiles`: `prepare` + `epochs` of a three-epoch run (1 head-only epoch, 2 of everything),
  `compile=True` with a counting backend that runs the captured graphs as they are
  (`backend="eager"` with a counter): dynamo's guards, and so its recompiles, are those of the
  real backend, at a fraction of the cost. `recompiles` is the number of graphs compiled after
  the first stage's; the goal is at most 1, and none within a stage.
- `save_share`: one real epoch of full fine-tuning (`--save-images` images, 45,000 by default:
  a CIFAR training split; the synthetic set's 3,600, repeated) through `cifarlib.training.train.epochs`, with the saves that epoch really makes
  (best.pt, last.pt, history.csv and the curves at its end; a periodic save if one falls due),
  started when no earlier save is still being written. Reported: the seconds the loop spent
  handing the files to the background saver (the copy to CPU memory) over the epoch's seconds,
  and the saver's own background seconds beside it.

    python benchmarks/probe_gpu_path.py --device cuda --backbone resnet50 --image-size 224 --batch-size 256
    python benchmarks/probe_gpu_path.py --device cpu --backbone test_resnet --image-size 32 --batch-size 16 \\
        --sync-steps 4 --save-images 64 --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from cifarlib.core import runtime
from cifarlib.data.augment import BatchAugment, make_policy
from cifarlib.data.datasets import Split
from cifarlib.data.preprocess import normalization
from cifarlib.data.synthetic import make_images
from cifarlib.model import GROUPS, build_model, checkpoints, layer_groups
from cifarlib.training import loop, train
from cifarlib.training.config import Stage, make_config
from cifarlib.training.run import Run, StageRun


def sync_probe(a, device, optimizer: str) -> dict:
    """Host syncs per training step, by the line of code that caused them."""
    if device.type != "cuda":
        return {"syncs_per_step": None, "reason": "torch.cuda.set_sync_debug_mode needs CUDA; on the CPU, "
                "tests/test_gpu_path.py runs an epoch on the meta device, where any host read raises"}
    plan = runtime.resolve_plan(device)
    cfg = make_config("fast", backbone=a.backbone, weights="none", image_size=a.image_size,
                      batch_size=a.batch_size, device=str(device), optimizer=optimizer)
    model = build_model(a.backbone, 100, "none").to(device, memory_format=plan.memory_format)
    groups = layer_groups(model)
    stage = Stage("all", 1, GROUPS, (1e-3,) * 6)
    opt = train.make_optimizer(cfg, train.apply_stage(model, groups, stage), plan.fused)
    st = StageRun(0, stage, model, opt, train.make_schedule(cfg, opt, stage, 10 * a.sync_steps), plan.scaler())
    labels = torch.arange(a.sync_steps * a.batch_size) % 100
    split = Split(make_images(labels, seed=0), labels).to(device)
    mean, std = normalization(a.backbone)
    run = Run(cfg, Path("."), plan, None, split, split, model, groups,
              BatchAugment(make_policy("original"), a.image_size, mean, std, 100, channels_last=plan.channels_last))
    plan.tune()
    train.train_epoch(run, st, epoch=0)  # warm-up: allocations, cuDNN's search
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train.train_epoch(run, st, epoch=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            key = f"{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    scheduled = {k: n for k, n in sites.items() if _is_scheduled(k)}
    other = sum(n for k, n in sites.items() if k not in scheduled)
    return {"syncs_per_step": round(other / a.sync_steps, 3), "steps": a.sync_steps, "check_every": plan.check_every,
            "sync_sites": sites, "scheduled_sites": sorted(scheduled)}


def _is_scheduled(site: str) -> bool:
    """Whether a sync comes from one of the loop's scheduled checks or the epoch's loss."""
    name, line = site.rsplit(":", 1)
    for fn in (loop.scheduled_check, runtime.sum_over_ranks, runtime.all_reduce):
        if name == Path(inspect.getsourcefile(fn)).name:
            lines, start = inspect.getsourcelines(fn)
            if start <= int(line) < start + len(lines):
                return True
    return False


def tiny_run(a, device, root: Path, name: str, epochs: int, optimizer: str, images: int, **kw):
    cfg = make_config("cpu", dataset="synthetic", weights="none", backbone=a.backbone, batch_size=a.batch_size,
                      epochs=epochs, max_train_samples=images, max_eval_samples=a.batch_size, device=str(device),
                      data_dir=str(root / "data"), checkpoint_dir=str(root / "ckpt"), run_name=name,
                      optimizer=optimizer, overwrite=True, **kw)
    return train.prepare(cfg)


def recompile_probe(a, device, root: Path, optimizer: str) -> dict:
    graphs: list[int] = []

    def counting(gm, example_inputs):  # the "eager" backend, counted
        graphs.append(len(gm.graph.nodes))
        return gm.forward
    torch._dynamo.reset()
    old = loop.COMPILE_BACKEND
    loop.COMPILE_BACKEND = counting
    try:
        run = tiny_run(a, device, root, f"compile-{optimizer}", 3, optimizer, 2 * a.batch_size, compile=True,
                       image_size=min(a.image_size, 64))
        after = []
        for _ in train.epochs(run):
            after.append(len(graphs))
    finally:
        loop.COMPILE_BACKEND = old
    return {"recompiles": after[1] - after[0], "graphs_after_each_epoch": after,
            "stages": [r["stage"] for r in run.history], "recompiles_within_a_stage": after[2] - after[1],
            "backend": "eager (counted)"}


def save_probe(a, device, root: Path, optimizer: str) -> dict:
    """One epoch of full fine-tuning, with its real saves."""
    stages = [Stage("all", 1, GROUPS, (1e-4, 2e-4, 4e-4, 8e-4, 1e-3, 1e-2))]
    run = tiny_run(a, device, root, f"save-{optimizer}", 1, optimizer, None, stages=stages,
                   image_size=a.image_size, augmentation="light")
    run.train = run.train.subset(torch.arange(a.save_images) % len(run.train))  # the synthetic set, repeated
    checkpoints.SAVER.wait()  # nothing of an earlier run still being written
    t0 = time.perf_counter()
    row = next(train.epochs(run))
    epoch_s = time.perf_counter() - t0
    handing = run.saving_seconds
    t1 = time.perf_counter()
    checkpoints.SAVER.wait()
    return {"save_share": round(handing / epoch_s, 5), "save_seconds": round(handing, 4), "epoch_seconds": round(epoch_s, 2),
            "epoch_images": len(run.train), "training_images_per_s": row["images_per_s"],
            "saver_background_s_after_the_epoch": round(time.perf_counter() - t1, 3),
            "files": sorted(p.name for p in run.dir.iterdir())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sync-steps", type=int, default=60, help="training steps of the sync probe's epoch")
    p.add_argument("--save-images", type=int, default=45_000, help="images in the save probe's epoch")
    p.add_argument("--optimizers", default="sgd,adamw")
    p.add_argument("--probes", default="syncs,compile,save", help="which probes to run (all three by default)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    device = runtime.pick_device(a.device)
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "backbone": a.backbone, "image_size": a.image_size, "batch_size": a.batch_size,
              "plan": runtime.resolve_plan(device).to_dict()}
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in a.optimizers.split(","):
            mine = result.setdefault(optimizer, {})
            for name, probe in (("syncs", sync_probe), ("compile", recompile_probe), ("save", save_probe)):
                if name not in a.probes.split(","):
                    continue
                t0 = time.perf_counter()
                mine.update(probe(a, device, optimizer) if name == "syncs" else probe(a, device, Path(tmp), optimizer))
                mine[f"{name}_probe_seconds"] = round(time.perf_counter() - t0, 1)
                out.write_text(json.dumps(result, indent=2) + "\n")  # kept if a later probe runs out of time
                print(f"{optimizer}: {name} probe done in {mine[f'{name}_probe_seconds']} s", flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
