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

What runs how on the device (precision, fused optimizers, memory layout, how often the loop
checks) is the run's device plan (`cifarlib.runtime.resolve_plan`), resolved once in `prepare`
from the settings of the same names, printed, and recorded in config.json and every checkpoint.
Under torchrun: DistributedDataParallel, each rank training on its own shard of the
device-resident data; only rank 0 writes files. The steps themselves, and their scheduled
checks, are in `cifarlib.loop`; the state they change, in `cifarlib.run`.

The loop reads from the top down, one level per function: `epochs` runs the stages, `_stage`
one stage's epochs, `_epoch` one epoch's steps (with a save or a stop wherever a check asks),
and `_end_epoch` the epoch's end (validation, early stopping, the history row, the save).

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
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import Any, Iterator

import torch
from torch import nn

from . import budget, checkpoints, guard, runstate, runtime, trial
from .augment import BatchAugment, make_policy
from .config import (PRESETS, Config, make_config, parse_value, resumed, stage_image_size, stage_rows,
                     stage_steps, to_dict)
from .data import Split, load_cifar
from .errors import UserError, cli_errors
from .loop import (apply_stage, load_optimizer_state, load_scaler_state, make_optimizer,  # noqa: F401
                   make_schedule, train_epoch, train_loader, train_mode, train_steps, validate)
from .model import GROUPS, build_model, layer_groups
from .preprocess import normalization
from .run import Position, Progress, Run, StageRun, Trace
from .stopping import Patience
from .trial import find_lr  # noqa: F401  (train.find_lr(run, stage=None))

COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile=True ("eager" counts graphs cheaply)


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


# --- before training -----------------------------------------------------------------------------

def prepare(cfg: Config, started: float | None = None, folder: bool = True) -> Run:
    """Resolve the device plan, load data and model, make or reopen the run folder, restore the
    state to resume, and plan a budgeted run. Every setting is checked, and the device plan
    resolved, before any data loads. `started`: when the run's clock started (`time.monotonic()`;
    default now), which a budget counts from. `folder=False` makes no run folder and writes
    nothing (the learning-rate finder's run)."""
    started = time.monotonic() if started is None else started
    rank, world = runtime.setup_distributed(cfg.device)
    checkpoints.SAVER.wait()  # a save of this process still being written (a notebook's last run)
    cfg, saved = _config(cfg)
    plan = runtime.resolve_plan(cfg.device, cfg.precision, cfg.fused, cfg.channels_last, cfg.check_every)
    budget_plan = (cfg.plan or {}).get("budget") if saved else None  # a resumed run keeps its plan
    cfg = replace(cfg, plan={**plan.to_dict(), **({"budget": budget_plan} if budget_plan else {})})
    if folder:
        checkpoints.check_writable(cfg.checkpoint_dir)  # on every rank: none may wait for one that failed
    torch.manual_seed(cfg.seed)
    data = load_cifar(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                      max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
                      verify_checksums=cfg.verify_checksums, device=plan.device, store_size=cfg.store_size,
                      cache_dir=cfg.cache_dir)
    if saved and list(saved["classes"]) != data.classes:
        raise UserError(f"cannot resume: the classes in {data.folder} are no longer the run's.\n"
                        f"  the run's:  {', '.join(saved['classes'])}\n  the data's: {', '.join(data.classes)}")
    model = build_model(cfg.backbone, num_classes=data.num_classes, weights="none" if saved else cfg.weights,
                        head_init=cfg.head_init)
    path = None
    if folder or cfg.resume:
        path = checkpoints.prepare_run_dir(cfg.run_name, resume=cfg.resume, overwrite=cfg.overwrite, root=cfg.checkpoint_dir)
    model.to(plan.device, memory_format=plan.memory_format)
    mean, std = normalization(cfg.backbone)
    aug = BatchAugment(make_policy(cfg.augmentation), cfg.image_size, mean, std, data.num_classes,
                       seed=cfg.seed + rank, channels_last=plan.channels_last)
    run = Run(cfg, path, plan, data, _shard(data.train, rank, world, "training", equal=True),
              _shard(data.val, rank, world, "validation"), model, layer_groups(model), aug, started=started)
    if runtime.is_main_process() and folder:
        print(plan.describe(), flush=True)
    if saved:
        _restore(run, saved, rank)
    elif cfg.budget_minutes and folder:
        run.cfg = _plan_budget(run)
    run.cfg = replace(run.cfg, stages=tuple(replace(st, epochs=stage_rows(st, steps_per_epoch(run))) if st.steps else st
                                            for st in run.cfg.stages))  # a stage in steps validates this often
    if runtime.is_main_process() and folder:
        _record_config(run.cfg, path / "config.json", resumed=saved is not None)
    return run


def _plan_budget(run: Run):
    """A budgeted run's stages, planned from its measured speed (`cifarlib.trial.probe`) to end
    near its budget, counted from `run.started`; printed, with the stages JSON that reproduces
    it. Rank 0 plans, and every rank takes its plan."""
    cfg, spe = run.cfg, steps_per_epoch(run)
    costs = trial.probe(run)
    save_s = trial.save_seconds(run)
    outcome: Any = None
    if runtime.is_main_process():
        spent = time.monotonic() - run.started
        try:
            outcome = budget.make_plan(costs, spe, cfg.budget_minutes * 60, spent, save_s)
        except budget.TooSmall as e:
            outcome = (f"budget_minutes={cfg.budget_minutes:g} is too small for this run: loading the data and the "
                       f"model and timing the stages took {spent:.0f} s, and the shortest run (one step of each stage, "
                       f"with its validation and saves) needs more than is left. The smallest budget that would work "
                       f"is budget_minutes={budget.minutes(e.minimum_s)}; or train for a number of epochs instead "
                       "(budget_minutes=0).")
    outcome = runtime.broadcast_object(outcome)
    if isinstance(outcome, str):
        raise UserError(outcome)
    if runtime.is_main_process():
        print(budget.describe(outcome), flush=True)
        print(f"the same stages without a budget: budget_minutes=0 stages='{budget.reproduce(cfg.stages, outcome)}'"
              + (f" (their rates include lr_scale={cfg.lr_scale:g}: leave it out)" if cfg.lr_scale != 1 else ""), flush=True)
    return _with_budget(cfg, outcome)


def _with_budget(cfg: Config, plan: budget.BudgetPlan) -> Config:
    stages = tuple(replace(st, steps=s["steps"]) for st, s in zip(cfg.stages, plan.stages))
    return replace(cfg, stages=stages, plan={**cfg.plan, "budget": plan.to_dict()})


def _record_config(cfg: Config, path, resumed: bool) -> None:
    """config.json: written when a run starts; rewritten when a resumed run continues under
    another device plan, keeping its modification time, which says when the run began (the runs
    table's `started`)."""
    if not resumed:
        checkpoints.write_json(to_dict(cfg), path)
        return
    try:
        began, before = path.stat().st_mtime_ns, checkpoints.read_json(path)
    except (OSError, ValueError):
        began, before = None, None
    if before is None or before.get("plan") != cfg.plan:
        checkpoints.write_json(to_dict(cfg), path)
        if began is not None:
            os.utime(path, ns=(began, began))


def _config(cfg: Config) -> tuple[Config, dict[str, Any] | None]:
    """The run's config, and for a resumed run its saved last.pt: its own recipe, where and how
    it runs now (`config.resumed`)."""
    if not cfg.resume:
        name = cfg.run_name or checkpoints.default_run_name(cfg.preset, cfg.backbone)
        return replace(cfg, run_name=runtime.broadcast_object(name)), None  # one name, whatever the ranks' clocks
    if not cfg.run_name:
        raise UserError("resume=True needs the run_name of the run to continue.")
    path = checkpoints.prepare_run_dir(cfg.run_name, resume=True, overwrite=False, root=cfg.checkpoint_dir)
    saved = checkpoints.load(path / "last.pt")
    return resumed(saved["config"], cfg), saved


def _restore(run: Run, saved: dict[str, Any], rank: int) -> None:
    """Put a resumed run where its last.pt left it: weights, history, progress, the epoch under
    way (if it stopped inside one) and every random state; the stage's optimizer, schedule and
    scaler wait in `run.saved` until the stage starts again."""
    run.model.load_state_dict(saved["model"])
    r = run.saved = saved["resume"]
    run.history, run.best_val_loss = list(saved["history"]), r["best_val_loss"]
    run.trace = Trace(**saved["trace"]) if "trace" in saved else Trace()
    run.started -= r.get("spent_s", 0.0)  # the time spent before counts against a budget
    run.at = Progress(r["next_stage"], r["next_epoch"])
    if r.get("step") is not None:
        lead = runtime.is_main_process()  # the saved sums are the ranks' total
        run.epoch = Position(len(run.history), r["order"], _epoch_end(run), r["step"],
                             r["loss_sum"] if lead else 0.0, r["seen"] if lead else 0, r["train_seconds"], r["seconds"],
                             traced=tuple(r.get("traced", (r["loss_sum"], r["seen"], r["step"] // run.cfg.accum_steps))))
    runstate.restore_rng(run, r["rng"], rank)


def steps_per_epoch(run: Run) -> int:
    return math.ceil(len(train_loader(run)) / run.cfg.accum_steps)


# --- training, from the top down -----------------------------------------------------------------

def epochs(run: Run) -> Iterator[dict[str, Any]]:
    """Train from where `run` stands; yields each epoch's history row once its files are handed
    to the background saver (they are complete when the generator ends, or is closed).

    Raises `guard.Interrupted` after a signal (its position saved; calling `epochs(run)` again
    continues there), and `UserError` for a non-finite loss or a lack of memory (nothing written
    after the last save; continue from it with `prepare(... resume=True)`).
    """
    if run.broken:
        raise UserError(run.broken)
    _check_memory(run)
    run.plan.tune()
    with guard.StopSignals() as stop, _failures(run):
        while run.at.stage < len(run.cfg.stages):
            yield from _stage(run, stop)
    _record_actual_time(run)


def _record_actual_time(run: Run) -> None:
    """A budgeted run's end: its last files written, config.json's plan gets the actual time."""
    if "budget" not in (run.cfg.plan or {}) or not runtime.is_main_process() or run.dir is None:
        return
    checkpoints.SAVER.wait()
    actual = round((time.monotonic() - run.started) / 60, 3)
    run.cfg = replace(run.cfg, plan={**run.cfg.plan, "budget": {**run.cfg.plan["budget"], "actual_minutes": actual}})
    _record_config(run.cfg, run.dir / "config.json", resumed=True)
    print(f"budget {run.cfg.budget_minutes:g} min: planned {run.cfg.plan['budget']['predicted_minutes']:.1f} min, "
          f"took {actual:.1f} min", flush=True)


def _stage(run: Run, stop: guard.StopSignals) -> Iterator[dict[str, Any]]:
    """The stage `run.at` points to, from its epoch under way until `run.at` moves on."""
    if run.stage is None or run.stage.index != run.at.stage:
        run.stage = _start_stage(run)
    while run.stage.index == run.at.stage:
        yield _epoch(run, stop)


def _start_stage(run: Run) -> StageRun:
    """A stage's layers made trainable, at its image size, with a fresh optimizer and one-cycle
    schedule, or those a resumed run saved inside this stage. A budgeted run first plans this
    stage and the rest again, from the speed it has measured so far."""
    si, saved = run.at.stage, run.saved
    run.saved = None
    if saved is None and si > 0 and "budget" in (run.cfg.plan or {}):
        run.cfg = _replan(run, si)
    cfg = run.cfg
    stage = cfg.stages[si]
    run.aug.size = stage_image_size(cfg, stage)
    params = apply_stage(run.model, run.groups, stage)
    opt = make_optimizer(cfg, params, run.plan.fused)
    st = StageRun(si, stage, _stage_model(run), opt, make_schedule(cfg, opt, stage, stage_steps(stage, steps_per_epoch(run))),
                  run.plan.scaler())
    if saved is not None and saved["stage"] == si:
        load_optimizer_state(opt, saved["optimizer"], run.plan.fused)
        st.sched.load_state_dict(saved["scheduler"])
        load_scaler_state(st.scaler, saved.get("scaler", {}))
        st.patience = Patience(saved["stage_best"], saved["bad_epochs"])
    return st


def _replan(run: Run, si: int) -> Config:
    """Stages `si` on planned again: the time left, and their step times scaled by how much
    slower (or faster) the stages so far ran than predicted. Rank 0 decides."""
    cfg, plan = run.cfg, budget.BudgetPlan(**run.cfg.plan["budget"])
    outcome = None
    if runtime.is_main_process():
        done = {s.name for s in cfg.stages[:si]}
        actual = sum(float(r["seconds"]) + plan.save_s for r in run.history if r["stage"] in done)
        predicted = sum(s["predicted_s"] for s in plan.stages[:si])
        pace = actual / predicted if predicted > 0 and actual > 0 else 1.0
        costs = [budget.StageCost(st.name, st.share, s["image_size"], s["step_s"] * pace, s["val_s"] * pace)
                 for st, s in zip(cfg.stages[si:], plan.stages[si:])]
        outcome = budget.replan(plan, si, costs, time.monotonic() - run.started)
    outcome = runtime.broadcast_object(outcome)
    if runtime.is_main_process():
        print(f"re-planned at stage {cfg.stages[si].name!r}: {budget.describe(outcome)}", flush=True)
    return _with_budget(cfg, outcome)


def _stage_model(run: Run) -> nn.Module:
    """What a stage trains through: the model, in DDP under torchrun, compiled if asked."""
    net = run.model
    if runtime.distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=runtime.ddp_device_ids(run.device))
    if run.cfg.compile:  # static shapes: training batches all have one size (drop_last)
        net = torch.compile(net, dynamic=False, backend=COMPILE_BACKEND)
    return net


def _epoch(run: Run, stop: guard.StopSignals) -> dict[str, Any]:
    """One epoch: its steps from where it stands, saving or stopping wherever a check asks; then
    its end."""
    if run.epoch is None:
        loader = train_loader(run)
        run.epoch = Position(len(run.history), loader.order(len(run.history)), _epoch_end(run))
    pos = run.epoch
    start = time.time() - pos.seconds
    while (event := _steps(run, pos, stop)) != "done":
        pos.seconds = time.time() - start
        _act_on(run, pos, event, stop)
    run.epoch = None
    return _end_epoch(run, pos, start)


def _steps(run: Run, pos: Position, stop: guard.StopSignals) -> str:
    """Training steps until the epoch's end or a check's event. A signal that came while no step
    ran (during validation, a save, or before a resumed epoch's first step) stops at once."""
    if runtime.any_rank(stop.signum is not None):
        return "stop"
    return train_steps(run, run.stage, pos, stop, lambda: runstate.save_due(run))


def _act_on(run: Run, pos: Position, event: str, stop: guard.StopSignals) -> None:
    """A check's event inside an epoch: a non-finite loss ends the run; a periodic save or a
    stop saves the exact position, and a stop then ends the run with how to continue."""
    st = run.stage
    if event == "non-finite":
        run.broken = str(guard.non_finite_error(pos.epoch + 1, pos.bad_step, st.stage.name, _rates(st.opt),
                                                run.plan.precision == "fp16", run.plan.check_every))
        raise UserError(run.broken)
    runstate.save_position(run, runstate.resume_state(run, st, pos))
    if event == "stop":
        checkpoints.SAVER.wait()  # on disk before the process may end
        raise guard.Interrupted(guard.interrupted_message(pos.epoch + 1, pos.step, run.cfg.run_name), stop.signum or 2)


def _end_epoch(run: Run, pos: Position, start: float) -> dict[str, Any]:
    """Validation, early stopping, the history row, where training goes on, and the save."""
    cfg, st = run.cfg, run.stage
    loss_sum, seen = runtime.sum_over_ranks(pos.loss_sum, pos.seen)
    val_loss, val_acc = validate(run, run.model)  # uncompiled: no recompile for eval mode or its last batch
    pos.seconds = time.time() - start
    train_loss = loss_sum / max(seen, 1)
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        run.broken = str(guard.non_finite_error(pos.epoch + 1, None if math.isfinite(train_loss) else pos.step,
                                                st.stage.name, _rates(st.opt), run.plan.precision == "fp16"))
        raise UserError(run.broken)
    st.patience = st.patience.after(val_loss)
    row = _row(run, st, pos, train_loss, val_loss, val_acc, seen)
    run.history.append(row)
    run.at = _next(run.at, stage_rows(st.stage, steps_per_epoch(run)), st.patience.exhausted(cfg.patience),
                   cfg.stop_ends_run, len(cfg.stages))
    improved = val_loss < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, val_loss)
    state = runstate.resume_state(run, st, None)
    if runtime.is_main_process():
        runstate.submit(run, {"metrics": row, "resume": state}, {"metrics": row} if improved else None, rows=True)
    return row


def _epoch_end(run: Run) -> int:
    """The batch the epoch `run.at` points to ends at: the loader's length, or fewer for the last
    epoch of a stage whose length in steps ends inside it."""
    n, spe = len(train_loader(run)), steps_per_epoch(run)
    left = stage_steps(run.cfg.stages[run.at.stage], spe) - run.at.epoch * spe
    return n if left >= spe else left * run.cfg.accum_steps


def _next(at: Progress, stage_epochs: int, stopped: bool, stop_ends_run: bool, stages: int) -> Progress:
    """Where training goes on after epoch `at`: the stage's next epoch, the next stage (at its
    end, or when early stopping cut it short), or the end (when a stop ends the run). A stage
    that ends inside an epoch ends there, after its row."""
    if stopped and stop_ends_run:
        return Progress(stages, 0)
    if stopped or at.epoch + 1 == stage_epochs:
        return Progress(at.stage + 1, 0)
    return Progress(at.stage, at.epoch + 1)


@contextmanager
def _failures(run: Run):
    """What ends training early, made into one clear message each; files are complete after."""
    try:
        yield
    except KeyboardInterrupt:  # a second Ctrl-C, inside a step: no consistent state to save
        run.broken = ("this run was stopped inside a step, so its model in memory is not a saved state. "
                      f"Continue with run_name={run.cfg.run_name} resume=True, from its last save.")
        raise
    except Exception as e:
        if not guard.is_out_of_memory(e):
            raise
        phase = "training" if run.epoch is not None else "validation"  # _epoch clears it before validating
        run.broken = str(guard.out_of_memory_error(run.device, run.cfg.batch_size, run.cfg.accum_steps, run.aug.size, phase))
        raise UserError(run.broken) from None
    finally:
        checkpoints.SAVER.wait()


def _check_memory(run: Run) -> None:
    """Where training memory is the host's, estimate a step's peak once and warn if it won't fit."""
    cfg = run.cfg
    if run.plan.watches_memory and not run.memory_checked and runtime.is_main_process():
        guard.warn_if_too_big(run.model, max(stage_image_size(cfg, s) for s in cfg.stages), cfg.batch_size, cfg.accum_steps)
        run.memory_checked = True


def _row(run: Run, st: StageRun, pos: Position, train_loss: float, val_loss: float, val_acc: float,
         seen: float) -> dict[str, Any]:
    rates = {f"lr_{g}": 0.0 for g in GROUPS}  # frozen groups: 0
    rates.update({f"lr_{g['name']}": round(g["lr"], 10) for g in st.opt.param_groups})
    return {"epoch": pos.epoch + 1, "stage": st.stage.name, "stage_epoch": run.at.epoch + 1, **rates,
            "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
            "seconds": round(pos.seconds, 2), "images_per_s": round(seen / max(pos.train_seconds, 1e-9), 1)}


def format_row(row: dict[str, Any], run: Run) -> str:
    """The one plain line per epoch that the CLI and notebook 03 print."""
    total = sum(stage_rows(s, steps_per_epoch(run)) for s in run.cfg.stages)
    return (f"epoch {row['epoch']}/{total} [{row['stage']}] train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.2%} lr_head {row['lr_head']:.2e} "
            f"{row['seconds']:.1f} s {row['images_per_s']:.0f} img/s")


def _rates(opt) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


# --- the command line ----------------------------------------------------------------------------

def _process_started() -> float:
    """When this process began, on the monotonic clock: on the command line a budget counts the
    whole command, Python's start and the imports included, as a user's stopwatch would."""
    try:
        import psutil
        return time.monotonic() - max(0.0, time.time() - psutil.Process().create_time())
    except (ImportError, OSError):
        return time.monotonic()


def _find_lr_command(cfg: Config) -> None:
    """`find_lr=True` on the command line: the range test on the run's first stage (or, with
    resume=True, the stage it is at), its suggestion printed and its plot written to runs/; no
    run folder is made, so the same command without find_lr=True then trains as usual."""
    from .plots import lr_finder, save_png

    run = prepare(cfg, folder=False)
    if runtime.is_main_process():
        curve = find_lr(run)
        out = runtime.resolve_path("runs") / f"lr_finder-{cfg.preset}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(lr_finder(curve), out)
        print(curve.advice())
        print(f"plot: {out}")


def _usage() -> str:
    lines = ["usage: python -m cifarlib.train [key=value ...]", "",
             "Train with a preset and overrides; values are read as papermill reads -p",
             "(True/False/None, then int, then float, else text). Settings and their values",
             "in the original preset (fast and cpu differ in the recipe settings):", ""]
    base = make_config("original")
    for f in fields(Config):
        if f.name not in ("stages", "plan", "given"):
            lines.append(f"  {f.name}={getattr(base, f.name)!r}")
    lines += ["  find_lr=False (the command line's own: run the learning-rate finder, print its suggestion, train nothing)",
              "", f"presets: {', '.join(PRESETS)}"]
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
            find = kv.pop("find_lr", False)  # a key of the command line only: it trains nothing
            cfg = make_config(kv.pop("preset", "original"), **kv)
            if find is True:
                return _find_lr_command(cfg)
            run = prepare(cfg, started=_process_started())
            for row in epochs(run):  # one line per epoch on stdout; the progress bar is on stderr
                if runtime.is_main_process():
                    print(format_row(row, run), flush=True)
            if runtime.is_main_process():
                print(f"run files: {run.dir}")
    finally:
        if runtime.distributed():
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
