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
fused optimizers, cuDNN autotuning, optional torch.compile. Under torchrun:
DistributedDataParallel, each rank training on its own shard of the device-resident data; only
rank 0 writes files.

The host never waits for the GPU inside a training step: augmentation parameters travel in one
non-blocking copy, and nothing reads a device value back. It waits only at the scheduled checks:
every `check_every` steps (50 on a GPU, where each wait costs the queue of launched work; every
step on the CPU, where it costs nothing) and at the end of the epoch, for its loss. Saving is
done by a background thread (`checkpoints.SAVER`) from a copy in CPU memory.

`compile=True` compiles the model with static shapes: once for the first stage, and once more at
each stage that changes which layers train. Validation runs the uncompiled model (its last batch
is smaller). Compiling ResNet-50 costs a minute or two per stage, so it pays only for runs of
several epochs per stage on a GPU; short runs and CPU runs should leave it off.

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

CHECK_EVERY_GPU = 50  # steps between scheduled checks on a GPU (the only host waits of an epoch)
COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile=True ("eager" counts graphs cheaply)


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
    saving_seconds: float = 0.0   # time the loop spent handing its files to the saver


def _shard(split: Split, rank: int, world: int, what: str, equal: bool = False) -> Split:
    """Every `world`-th sample from `rank`; `equal` drops the last few so that every rank gets
    the same number of batches (the training step's collectives must line up). A rank left with
    nothing would fall out of step with the others' collectives, so that is refused."""
    if len(split) < world:
        raise UserError(f"the {what} split has {len(split)} image(s) for {world} processes: each needs at "
                        f"least one. Raise {'max_train_samples' if what == 'training' else 'max_eval_samples'} "
                        f"to {world} or more, or start fewer processes.")
    n = len(split) // world * world if equal else len(split)
    return split if world == 1 else split.subset(torch.arange(rank, n, world))


def prepare(cfg: Config) -> Run:
    """Load data and model, make or reopen the run folder, and restore the state to resume."""
    rank, world = runtime.setup_distributed(cfg.device)
    checkpoints.SAVER.wait()  # a save of this process still being written (a notebook's last run)
    saved = None
    if cfg.resume:
        if not cfg.run_name:
            raise UserError("resume=True needs the run_name of the run to continue.")
        path = checkpoints.prepare_run_dir(cfg.run_name, resume=True, overwrite=False, root=cfg.checkpoint_dir)
        saved = checkpoints.load(path / "last.pt")
        # the run's own recipe; where things are and what runs them may have changed
        keep = {k: getattr(cfg, k) for k in ("device", "compile", "data_dir", "checkpoint_dir", "verify_checksums")}
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
    model = build_model(cfg.backbone, num_classes=100 if cfg.dataset != "cifar10" else 10, weights="none" if saved else cfg.weights)
    data = load_cifar(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                      max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
                      verify_checksums=cfg.verify_checksums, device=device)
    path = checkpoints.prepare_run_dir(cfg.run_name, resume=cfg.resume, overwrite=cfg.overwrite, root=cfg.checkpoint_dir)
    model.to(device, memory_format=runtime.memory_format(device))
    mean, std = normalization(cfg.backbone)
    aug = BatchAugment(make_policy(cfg.augmentation), cfg.image_size, mean, std, data.num_classes, seed=cfg.seed + rank)
    run = Run(cfg, path, device, data, _shard(data.train, rank, world, "training", equal=True),
              _shard(data.val, rank, world, "validation"), model, layer_groups(model), aug)
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


def make_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled where autocast runs in fp16 (GPUs without bf16), whose small
    gradients would otherwise underflow; a disabled one, which does nothing, elsewhere."""
    return torch.amp.GradScaler(device.type, enabled=runtime.autocast(device)[1] == torch.float16)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A run saved on the CPU or a bf16 GPU holds a disabled scaler's `{}`, which an enabled
    scaler (fp16, on a pre-Ampere GPU) refuses; it then starts afresh, as any new run does."""
    if state:
        scaler.load_state_dict(state)


def check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else CHECK_EVERY_GPU


def train_epoch(run: Run, model: nn.Module, opt, sched, scaler, epoch: int) -> float:
    """One epoch over this rank's shard; returns the mean training loss (soft targets).

    With gradient accumulation, DDP all-reduces the gradients only at the last micro-batch of
    each optimizer step (`no_sync` for the others).
    """
    cfg, accum = run.cfg, run.cfg.accum_steps
    train_mode(model)
    loader = Batches(run.train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed)
    total, seen, n = torch.zeros((), device=run.device), 0, len(loader)
    bar = tqdm(loader.epoch(epoch), total=n, desc=f"epoch {epoch + 1}", leave=False,
               disable=not runtime.is_main_process())
    autocast, _ = runtime.autocast(run.device)
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
    for i, (x, y) in enumerate(bar):
        inputs, targets = run.aug(x, y)
        stepping = (i + 1) % accum == 0 or i + 1 == n
        with contextlib.nullcontext() if stepping or not ddp else inner.no_sync():
            with autocast:
                loss = F.cross_entropy(model(inputs).float(), targets)
            scaler.scale(loss / accum).backward()
        if stepping:
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
    autocast, _ = runtime.autocast(run.device)
    layout = runtime.memory_format(run.device)
    for x, y in Batches(run.val, run.cfg.eval_batch_size).epoch(0):
        with autocast:
            logits = model(evaluation_inputs(x, run.cfg.image_size, mean, std).to(memory_format=layout)).float()
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
            "config": to_dict(run.cfg), "model": model_state, "history": list(run.history), **extra}


def _rng_states(run: Run) -> list[torch.Tensor]:
    state = run.aug.generator.get_state()
    if not dist.is_initialized():
        return [state]
    states = [torch.empty_like(state) for _ in range(dist.get_world_size())]
    dist.all_gather_object(states, state)
    return states


def _save_epoch(run: Run, row: dict[str, Any], improved: bool, resume: dict[str, Any]) -> None:
    """Copy the epoch's state to CPU memory, then let the background saver write best.pt (if
    validation improved), last.pt, history.csv and loss_curves.png, in that order."""
    from .plots import loss_curves, save_png  # matplotlib only where curves are drawn

    state = run.model.state_dict()
    last = checkpoints.snapshot(_checkpoint(run, state, {"metrics": row, "resume": resume}))
    best = {k: v for k, v in last.items() if k != "resume"} if improved else None
    history, folder = last["history"], run.dir

    def job() -> None:
        if best is not None:
            checkpoints.save(best, folder / "best.pt")
        checkpoints.save(last, folder / "last.pt")
        checkpoints.write_history(history, folder / "history.csv")
        save_png(loss_curves(history), folder / "loss_curves.png")
    checkpoints.SAVER.submit(job)


def _stage_model(run: Run) -> nn.Module:
    """What a stage trains through: the model, in DDP under torchrun, compiled if asked."""
    net = run.model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:  # static shapes: training batches all have one size (drop_last)
        net = torch.compile(net, dynamic=False, backend=COMPILE_BACKEND)
    return net


def epochs(run: Run) -> Iterator[dict[str, Any]]:
    """Train from where `run` stands; yields each epoch's history row once its files are handed
    to the background saver. The files are complete when the generator ends (or is closed)."""
    cfg, raw = run.cfg, run.model
    if run.in_epoch:
        raise UserError("this run was interrupted in the middle of an epoch, so its model is no longer "
                        "that of its last saved epoch. Continue it with resume=True (prepare it again), "
                        "which goes on from the last completed epoch.")
    runtime.tune_for_fixed_shapes(run.device)
    spe = steps_per_epoch(run)
    try:
        for si in range(run.next_stage, len(cfg.stages)):
            stage = cfg.stages[si]
            params = apply_stage(raw, run.groups, stage)
            net = _stage_model(run)
            opt = make_optimizer(cfg, params, run.device)
            sched = make_schedule(cfg, opt, stage, spe * stage.epochs)
            scaler = make_scaler(run.device)
            stage_best, bad = math.inf, 0
            r = run.resume_state
            if r is not None and r["stage"] == si:
                opt.load_state_dict(r["optimizer"])
                sched.load_state_dict(r["scheduler"])
                load_scaler_state(scaler, r.get("scaler", {}))
                stage_best, bad = r["stage_best"], r["bad_epochs"]
            run.resume_state = None
            stopped = False
            for e in range(run.next_epoch, stage.epochs):
                start, epoch = time.time(), len(run.history)
                run.in_epoch = True
                train_loss = train_epoch(run, net, opt, sched, scaler, epoch)
                val_loss, val_acc = validate(run, raw)  # uncompiled: no recompile for eval mode or its last batch
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
                    improved = val_loss < run.best_val_loss
                    run.best_val_loss = min(run.best_val_loss, val_loss)
                    t0 = time.perf_counter()
                    _save_epoch(run, row, improved, {
                        "stage": si, "next_stage": run.next_stage, "next_epoch": run.next_epoch,
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                        "stage_best": stage_best, "bad_epochs": bad, "best_val_loss": run.best_val_loss,
                        "rng": {"augment": rng, "torch": torch.get_rng_state()}})
                    run.saving_seconds += time.perf_counter() - t0
                yield row
                if stopped:
                    break
            run.next_epoch = 0
            if stopped and cfg.stop_ends_run:
                break
    finally:
        checkpoints.SAVER.wait()


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
