"""Staged progressive fine-tuning: plain functions, and a generator that yields one row per epoch.

    run = prepare(make_config("original", epochs=100))
    for row in epochs(run):      # trains; each row is also in run.history and history.csv
        print(format_row(row, run))

Each stage trains its layer groups (everything else frozen) at its own image size, with its own
optimizer and a one-cycle schedule sized to its exact number of optimizer steps. Frozen groups
get no gradient (the head-only stage costs a forward pass of the backbone, no backward); with
`frozen_bn="eval"` (every preset but `original`) their BatchNorm layers stay in eval mode and
keep the pretrained statistics, with "train" they go on updating them, as a plain
`model.train()` does. Early stopping watches the validation loss, with its counter reset at
each stage.

On CUDA: bf16 autocast (fp16 with a gradient scaler where bf16 is missing), channels_last,
fused optimizers, cuDNN autotuning, optional torch.compile. Under torchrun:
DistributedDataParallel, each rank training on its own shard of the device-resident data; only
rank 0 writes files. The steps themselves, and their scheduled checks, are in `cifarlib.loop`.

Nothing is lost when a run stops (see `cifarlib.guard`): on SIGINT, SIGTERM or a notebook's
interrupt, the step in progress finishes, `last.pt` gets the exact position (model, optimizer,
schedule, scaler, stage, epoch, step, the epoch's batch order and running sums, every random
state), and `Interrupted` says how to continue: `resume=True` in a new process, or running
`epochs(run)` again in the same one, goes on from that step and ends as the uninterrupted run
would have. `save_every_minutes` writes the same position while training, for kills that give
no warning. Files are written by a background thread (`checkpoints.SAVER`) from a copy in CPU
memory, so training does not wait for them.

`compile=True` compiles the model with static shapes: once for the first stage, and once more at
each stage that changes which layers train. Validation runs the uncompiled model (its last batch
is smaller). Compiling ResNet-50 costs a minute or two per stage, so it pays only for runs of
several epochs per stage on a GPU; short runs and CPU runs should leave it off.

    python -m cifarlib.train preset=fast epochs=20 backbone=resnet50
    torchrun --nproc_per_node=4 -m cifarlib.train preset=fast
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoints, guard, runstate, runtime
from .augment import BatchAugment, make_policy
from .config import PRESETS, Config, from_dict, make_config, parse_value, stage_image_size, to_dict
from .data import CifarData, Split, load_cifar
from .errors import UserError, cli_errors
from .loop import (CHECK_EVERY_GPU, Position, apply_stage, load_scaler_state,  # noqa: F401
                   make_optimizer, make_scaler, make_schedule, train_epoch, train_loader, train_mode,
                   train_steps, validate, world_sums)
from .model import GROUPS, build_model, layer_groups
from .preprocess import normalization

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
    resume_state: dict[str, Any] | None = None  # optimizer, schedule, position... to continue from
    broken: str | None = None     # why this Run can't go on in memory (it stopped inside a step)
    saving_seconds: float = 0.0   # time the loop spent handing its files to the saver
    last_save: float = field(default_factory=time.monotonic)
    memory_checked: bool = False


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
    model = build_model(cfg.backbone, num_classes=data.num_classes, weights="none" if saved else cfg.weights,
                        head_init=cfg.head_init)
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
        runstate.restore_rng(run, r["rng"], rank)
    elif runtime.is_main_process():
        checkpoints.write_json(to_dict(cfg), path / "config.json")
    return run


def steps_per_epoch(run: Run) -> int:
    return math.ceil(len(train_loader(run)) / run.cfg.accum_steps)


def _stage_model(run: Run) -> nn.Module:
    """What a stage trains through: the model, in DDP under torchrun, compiled if asked."""
    net = run.model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:  # static shapes: training batches all have one size (drop_last)
        net = torch.compile(net, dynamic=False, backend=COMPILE_BACKEND)
    return net


def _agree(run: Run, flag: bool) -> bool:
    """True on every rank if it is True on any (one all-reduce under torchrun)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)]).to(run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _row(run: Run, stage, e: int, pos: Position, opt, train_loss: float, val_loss: float, val_acc: float, seen: float) -> dict[str, Any]:
    rates = {f"lr_{g}": 0.0 for g in GROUPS}  # frozen groups: 0
    rates.update({f"lr_{g['name']}": round(g["lr"], 10) for g in opt.param_groups})
    return {"epoch": pos.epoch + 1, "stage": stage.name, "stage_epoch": e + 1, **rates,
            "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
            "seconds": round(pos.seconds, 2), "images_per_s": round(seen / max(pos.train_seconds, 1e-9), 1)}


def format_row(row: dict[str, Any], run: Run) -> str:
    """The one plain line per epoch that the CLI and notebook 03 print."""
    total = sum(s.epochs for s in run.cfg.stages)
    return (f"epoch {row['epoch']}/{total} [{row['stage']}] train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.2%} lr_head {row['lr_head']:.2e} "
            f"{row['seconds']:.1f} s {row['images_per_s']:.0f} img/s")


def epochs(run: Run) -> Iterator[dict[str, Any]]:
    """Train from where `run` stands; yields each epoch's history row once its files are handed
    to the background saver (they are complete when the generator ends, or is closed).

    Raises `guard.Interrupted` after a signal (its position saved; calling `epochs(run)` again
    continues there), and `UserError` for a non-finite loss or a lack of memory (nothing written
    after the last save; continue from it with `prepare(... resume=True)`).
    """
    if run.broken:
        raise UserError(run.broken)
    cfg, raw = run.cfg, run.model
    runtime.tune_for_fixed_shapes(run.device)
    if run.device.type == "cpu" and not run.memory_checked and runtime.is_main_process():
        guard.warn_if_too_big(raw, max(stage_image_size(cfg, s) for s in cfg.stages), cfg.batch_size, cfg.accum_steps)
        run.memory_checked = True
    spe = steps_per_epoch(run)
    phase = "training"
    with guard.StopSignals() as stop:
        try:
            for si in range(run.next_stage, len(cfg.stages)):
                stage = cfg.stages[si]
                run.aug.size = stage_image_size(cfg, stage)
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
                stopped = False
                for e in range(run.next_epoch, stage.epochs):
                    r, run.resume_state = run.resume_state, None
                    if r is not None and r.get("step") is not None and r["stage"] == si:
                        lead = runtime.is_main_process()  # the saved sums are the ranks' total
                        pos = Position(len(run.history), r["order"], r["step"], r["loss_sum"] if lead else 0.0,
                                       r["seen"] if lead else 0, r["train_seconds"], r["seconds"])
                    else:
                        pos = Position(len(run.history), train_loader(run).order(len(run.history)))
                    start, phase = time.time() - pos.seconds, "training"
                    while True:
                        if _agree(run, stop.signum is not None):
                            event = "stop"
                        else:
                            event = train_steps(run, net, opt, sched, scaler, pos, stop, lambda: runstate.save_due(run))
                        pos.seconds = time.time() - start
                        if event == "done":
                            break
                        if event == "non-finite":
                            run.broken = str(guard.non_finite_error(pos.epoch + 1, pos.bad_step, stage.name, _rates(opt),
                                                                    runtime.autocast(run.device)[1] == torch.float16))
                            raise UserError(run.broken)
                        run.next_stage, run.next_epoch = si, e
                        state = runstate.resume_state(run, si, pos, opt, sched, scaler, stage_best, bad)
                        runstate.save_position(run, state)
                        if event == "stop":
                            checkpoints.SAVER.wait()  # on disk before the process may end
                            run.resume_state = state
                            raise guard.Interrupted(guard.interrupted_message(pos.epoch + 1, pos.step, cfg.run_name),
                                                    stop.signum or 2)
                    phase = "validation"
                    loss_sum, seen = world_sums(pos.loss_sum, pos.seen)
                    val_loss, val_acc = validate(run, raw)  # uncompiled: no recompile for eval mode or its last batch
                    pos.seconds = time.time() - start
                    train_loss = loss_sum / max(seen, 1)
                    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                        fp16 = runtime.autocast(run.device)[1] == torch.float16
                        run.broken = str(guard.non_finite_error(pos.epoch + 1, None if math.isfinite(train_loss) else pos.step,
                                                                stage.name, _rates(opt), fp16))
                        raise UserError(run.broken)
                    stage_best, bad = (val_loss, 0) if val_loss < stage_best else (stage_best, bad + 1)
                    stopped = bad >= cfg.patience
                    row = _row(run, stage, e, pos, opt, train_loss, val_loss, val_acc, seen)
                    run.history.append(row)
                    done = stopped or e + 1 == stage.epochs
                    run.next_stage = (len(cfg.stages) if stopped and cfg.stop_ends_run else si + 1) if done else si
                    run.next_epoch = 0 if done else e + 1
                    state = runstate.resume_state(run, si, None, opt, sched, scaler, stage_best, bad)
                    if runtime.is_main_process():
                        improved = val_loss < run.best_val_loss
                        run.best_val_loss = min(run.best_val_loss, val_loss)
                        state["best_val_loss"] = run.best_val_loss
                        runstate.submit(run, {"metrics": row, "resume": state}, {"metrics": row} if improved else None, rows=True)
                    yield row
                    if stopped:
                        break
                run.next_epoch = 0
                if stopped and cfg.stop_ends_run:
                    break
        except KeyboardInterrupt:  # a second Ctrl-C, inside a step: no consistent state to save
            run.broken = ("this run was stopped inside a step, so its model in memory is not a saved state. "
                          f"Continue with run_name={cfg.run_name} resume=True, from its last save.")
            raise
        except Exception as e:
            if not guard.is_out_of_memory(e):
                raise
            run.broken = str(guard.out_of_memory_error(run.device, cfg.batch_size, cfg.accum_steps, run.aug.size, phase))
            raise UserError(run.broken) from None
        finally:
            checkpoints.SAVER.wait()


def _rates(opt) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


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
    try:
        with cli_errors("python -m cifarlib.train", quiet=not runtime.is_main_process()):
            bad = [a for a in argv if "=" not in a]
            if bad:
                raise UserError(f"expected key=value, got {' '.join(bad)} (see --help).")
            kv = {k: parse_value(v) for k, v in (a.split("=", 1) for a in argv)}
            run = prepare(make_config(kv.pop("preset", "original"), **kv))
            for row in epochs(run):  # one line per epoch on stdout; the progress bar is on stderr
                if runtime.is_main_process():
                    print(format_row(row, run), flush=True)
            if runtime.is_main_process():
                print(f"run files: {run.dir}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
