"""Staged progressive fine-tuning: plain functions, and a generator that yields one row per epoch.

    run = prepare(make_config("original", epochs=100))
    for row in epochs(run):      # trains; each row is also in run.history and history.csv
        print(row)

Each stage trains its layer groups (everything else frozen) with its own optimizer and a
one-cycle schedule sized to its exact number of optimizer steps. Frozen groups are fully frozen:
their BatchNorm layers stay in eval mode, so their running statistics keep the pretrained values
rather than drifting towards CIFAR's upsampled images while nothing else in them can adapt (and
the head-only stage then costs a forward pass of the backbone, no backward). Early stopping
watches the validation loss, with its counter reset at each stage.

On CUDA: bf16 autocast (fp16 with a gradient scaler where bf16 is missing), channels_last,
fused optimizers, optional torch.compile. Under torchrun: DistributedDataParallel, each rank
training on its own shard of the device-resident data; only rank 0 writes files.

    python -m cifarlib.train preset=fast epochs=20 backbone=resnet50
    torchrun --nproc_per_node=4 -m cifarlib.train preset=fast
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import checkpoints, runtime
from .augment import BatchAugment, make_policy
from .config import PRESETS, Config, Stage, from_dict, make_config, parse_value, to_dict
from .data import Batches, CifarData, Split, load_cifar
from .errors import UserError, cli_errors
from .model import build_model, layer_groups
from .preprocess import evaluation_inputs, normalization


@dataclass
class Run:
    """What a training run holds between epochs."""
    cfg: Config
    dir: Path
    device: torch.device
    data: CifarData
    train: Split                  # this rank's shard of the training split
    val: Split                    # this rank's shard of the validation split
    model: nn.Module
    groups: dict[str, list[str]]
    aug: BatchAugment
    history: list[dict[str, Any]] = field(default_factory=list)
    next_stage: int = 0           # where training goes on: stage index ...
    next_epoch: int = 0           # ... and epoch within it
    best_val_loss: float = math.inf
    resume_state: dict[str, Any] | None = None
    in_epoch: bool = False        # True while an epoch runs: an interrupt leaves it set


def setup_distributed() -> tuple[int, int]:
    """Join the torchrun process group if there is one; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _shard(split: Split, rank: int, world: int, equal: bool = False) -> Split:
    """Every `world`-th sample from `rank`; `equal` drops the last few so that every rank gets
    the same number of batches (the training step's collectives must line up)."""
    n = len(split) // world * world if equal else len(split)
    return split if world == 1 else split.subset(torch.arange(rank, n, world))


def prepare(cfg: Config) -> Run:
    """Load data and model, make or reopen the run folder, and restore the state to resume."""
    rank, world = setup_distributed()
    saved = None
    if cfg.resume:
        if not cfg.run_name:
            raise UserError("resume=True needs the run_name of the run to continue.")
        path = checkpoints.prepare_run_dir(cfg.run_name, resume=True, overwrite=False, root=cfg.checkpoint_dir)
        saved = checkpoints.load(path / "last.pt")
        # the run's own recipe; where things are and what runs them may have changed
        keep = {k: getattr(cfg, k) for k in ("device", "compile", "data_dir", "cache_dir", "checkpoint_dir", "verify_checksums")}
        cfg = replace(from_dict(saved["config"]), resume=True, **keep)
    else:
        name = [cfg.run_name or checkpoints.default_run_name(cfg.preset, cfg.backbone)]
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)  # one name, even if the ranks' clocks differ
        cfg = replace(cfg, run_name=name[0])
    torch.manual_seed(cfg.seed)
    device = runtime.pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    data = load_cifar(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                      max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
                      verify_checksums=cfg.verify_checksums, device=device, store_size=cfg.store_size,
                      cache_dir=cfg.cache_dir)
    if saved and list(saved["classes"]) != data.classes:
        raise UserError(f"cannot resume: the classes in {data.folder} are no longer the run's.\n"
                        f"  the run's:  {', '.join(saved['classes'])}\n  the data's: {', '.join(data.classes)}")
    model = build_model(cfg.backbone, num_classes=data.num_classes, weights="none" if saved else cfg.weights)
    path = checkpoints.prepare_run_dir(cfg.run_name, resume=cfg.resume, overwrite=cfg.overwrite, root=cfg.checkpoint_dir)
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    mean, std = normalization(cfg.backbone)
    aug = BatchAugment(make_policy(cfg.augmentation), cfg.image_size, mean, std, data.num_classes, seed=cfg.seed + rank)
    run = Run(cfg, path, device, data, _shard(data.train, rank, world, equal=True), _shard(data.val, rank, world),
              model, layer_groups(model), aug)
    if saved:
        model.load_state_dict(saved["model"])
        r = saved["resume"]
        run.history, run.best_val_loss = list(saved["history"]), r["best_val_loss"]
        run.next_stage, run.next_epoch, run.resume_state = r["next_stage"], r["next_epoch"], r
        states = r["rng"]["augment"]
        aug.generator.set_state(states[rank % len(states)])
        torch.set_rng_state(r["rng"]["torch"])
    elif runtime.is_main_process():
        checkpoints.write_json(to_dict(cfg), path / "config.json")
    return run


def apply_stage(model: nn.Module, groups: dict[str, list[str]], stage: Stage) -> list[dict[str, Any]]:
    """Make exactly the stage's groups trainable; returns the optimizer's parameter groups."""
    params = dict(model.named_parameters())
    trainable = {n for g in stage.groups for n in groups[g]}
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    return [{"params": [params[n] for n in groups[g]], "lr": lr, "name": g} for g, lr in zip(stage.groups, stage.lr)]


def train_mode(model: nn.Module) -> None:
    """model.train(), except BatchNorm layers whose parameters are all frozen."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def make_optimizer(cfg: Config, param_groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay, **fused)


def steps_per_epoch(run: Run) -> int:
    return math.ceil(len(Batches(run.train, run.cfg.batch_size, drop_last=True)) / run.cfg.accum_steps)


def make_schedule(cfg: Config, opt: torch.optim.Optimizer, stage: Stage, steps: int):
    """OneCycleLR over exactly `steps` optimizer steps (at least 2, which it needs)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=list(stage.lr), total_steps=max(steps, 2), pct_start=stage.warmup,
        anneal_strategy=stage.anneal, cycle_momentum=cfg.cycle_momentum and cfg.optimizer == "sgd")


def _autocast(device: torch.device):
    """bf16 autocast on CUDA GPUs that have it natively (compute capability 8.0 and up), fp16
    (with a gradient scaler) on older ones; no autocast elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext(), torch.float32
    dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


def train_epoch(run: Run, model: nn.Module, opt, sched, scaler, epoch: int) -> float:
    """One epoch over this rank's shard; returns the mean training loss (soft targets)."""
    cfg, accum = run.cfg, run.cfg.accum_steps
    train_mode(model)
    loader = Batches(run.train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed)
    total, seen = torch.zeros((), device=run.device), 0
    bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}", leave=False,
               disable=not runtime.is_main_process())
    autocast, _ = _autocast(run.device)
    for i, (x, y) in enumerate(bar):
        inputs, targets = run.aug(x, y)
        if run.device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(model(inputs).float(), targets)
        scaler.scale(loss / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == len(loader):
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
        total += loss.detach() * len(x)
        seen += len(x)
    return _all_sum(total, seen)


def _all_sum(total: torch.Tensor, count: int) -> float:
    t = torch.stack([total.float(), torch.tensor(float(count), device=total.device)])
    if dist.is_initialized():
        dist.all_reduce(t)
    return (t[0] / t[1].clamp_min(1)).item()


@torch.no_grad()
def validate(run: Run, model: nn.Module) -> tuple[float, float]:
    """Loss and top-1 accuracy on the validation split, through the evaluation path."""
    model.eval()
    mean, std = run.aug.mean, run.aug.std
    loss, correct, seen = torch.zeros((), device=run.device), torch.zeros((), device=run.device), 0
    autocast, _ = _autocast(run.device)
    for x, y in Batches(run.val, run.cfg.eval_batch_size).epoch(0):
        with autocast:
            logits = model(evaluation_inputs(x, run.cfg.image_size, mean, std)).float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return _all_sum(loss, seen), _all_sum(correct, seen)


def _checkpoint(run: Run, model_state: dict, extra: dict[str, Any]) -> dict[str, Any]:
    d = run.data
    return {"format": checkpoints.FORMAT, "backbone": run.cfg.backbone, "dataset": d.name,
            "classes": list(d.classes), "superclasses": d.superclasses,
            "fine_to_coarse": None if d.fine_to_coarse is None else d.fine_to_coarse.tolist(),
            "mean": list(run.aug.mean), "std": list(run.aug.std), "image_size": run.cfg.image_size,
            "store_size": run.cfg.store_size,
            "config": to_dict(run.cfg), "model": model_state, "history": list(run.history), **extra}


def _rng_states(run: Run) -> list[torch.Tensor]:
    state = run.aug.generator.get_state()
    if not dist.is_initialized():
        return [state]
    states = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather_object(states, state)
    return states


def epochs(run: Run) -> Iterator[dict[str, Any]]:
    """Train from where `run` stands; yields each epoch's history row after saving it."""
    from .plots import loss_curves, save_png  # matplotlib only where curves are drawn

    cfg, raw = run.cfg, run.model
    if run.in_epoch:
        raise UserError("this run was interrupted in the middle of an epoch, so its model is no longer "
                        "that of its last saved epoch. Continue it with resume=True (prepare it again), "
                        "which goes on from the last completed epoch.")
    model = torch.compile(raw) if cfg.compile else raw
    spe = steps_per_epoch(run)
    for si in range(run.next_stage, len(cfg.stages)):
        stage = cfg.stages[si]
        params = apply_stage(raw, run.groups, stage)
        net = model
        if dist.is_initialized():
            net = nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
        opt = make_optimizer(cfg, params, run.device)
        sched = make_schedule(cfg, opt, stage, spe * stage.epochs)
        scaler = torch.amp.GradScaler("cuda", enabled=_autocast(run.device)[1] == torch.float16)
        stage_best, bad = math.inf, 0
        r = run.resume_state
        if r is not None and r["stage"] == si:
            opt.load_state_dict(r["optimizer"])
            sched.load_state_dict(r["scheduler"])
            scaler.load_state_dict(r.get("scaler", {}))
            stage_best, bad = r["stage_best"], r["bad_epochs"]
        run.resume_state = None
        stopped = False
        for e in range(run.next_epoch, stage.epochs):
            start, epoch = time.time(), len(run.history)
            run.in_epoch = True
            train_loss = train_epoch(run, net, opt, sched, scaler, epoch)
            val_loss, val_acc = validate(run, net)
            run.in_epoch = False
            improved_stage = val_loss < stage_best
            stage_best, bad = (val_loss, 0) if improved_stage else (stage_best, bad + 1)
            stopped = bad >= cfg.patience
            row = {"epoch": epoch + 1, "stage": stage.name, "stage_epoch": e + 1, "train_loss": round(train_loss, 6),
                   "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
                   "lr": round(opt.param_groups[-1]["lr"], 8), "seconds": round(time.time() - start, 2)}
            run.history.append(row)
            done = stopped or e + 1 == stage.epochs
            run.next_stage = (len(cfg.stages) if stopped and cfg.stop_ends_run else si + 1) if done else si
            run.next_epoch = 0 if done else e + 1
            rng = _rng_states(run)
            if runtime.is_main_process():
                state = raw.state_dict()
                if val_loss < run.best_val_loss:
                    run.best_val_loss = val_loss
                    checkpoints.save(_checkpoint(run, state, {"metrics": row}), run.dir / "best.pt")
                checkpoints.save(_checkpoint(run, state, {"metrics": row, "resume": {
                    "stage": si, "next_stage": run.next_stage, "next_epoch": run.next_epoch,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "stage_best": stage_best,
                    "bad_epochs": bad, "best_val_loss": run.best_val_loss,
                    "rng": {"augment": rng, "torch": torch.get_rng_state()}}}), run.dir / "last.pt")
                checkpoints.write_history(run.history, run.dir / "history.csv")
                save_png(loss_curves(run.history), run.dir / "loss_curves.png")
            yield row
            if stopped:
                break
        run.next_epoch = 0
        if stopped and cfg.stop_ends_run:
            break


def _usage() -> str:
    lines = ["usage: python -m cifarlib.train [key=value ...]", "",
             "Train with a preset and overrides; values are read as papermill reads -p",
             "(True/False/None, then int, then float, else text). Settings and their values",
             "in the original preset (fast and cpu differ in the recipe settings):", ""]
    base = make_config("original")
    for f in fields(Config):
        if f.name != "stages":
            lines.append(f"  {f.name}={getattr(base, f.name)!r}")
    lines += ["", f"presets: {', '.join(PRESETS)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(_usage())
        return
    with cli_errors("python -m cifarlib.train"):
        bad = [a for a in argv if "=" not in a]
        if bad:
            raise UserError(f"expected key=value, got {' '.join(bad)} (see --help).")
        kv = {k: parse_value(v) for k, v in (a.split("=", 1) for a in argv)}
        run = prepare(make_config(kv.pop("preset", "original"), **kv))
        for row in epochs(run):
            if runtime.is_main_process():
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if runtime.is_main_process():
            print(f"run files: {run.dir}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
