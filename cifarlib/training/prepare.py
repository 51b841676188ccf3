"""A run ready to train: `prepare(cfg)` resolves the device plan, loads data and model, makes or
reopens the run folder, restores what a resumed run saved, and plans a budgeted run's stages
(with `replan` at each stage boundary). `cifarlib.training.train` trains it.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

import torch

from ..core import clock, placement, runtime
from ..core.errors import UserError
from ..data.augment import BatchAugment, make_policy
from ..data.datasets import Split, load_cifar
from ..data.preprocess import normalization
from ..model import checkpoints
from ..model.backbones import build_model, layer_groups
from . import budget, runstate, trial
from .config import Config, resumed, stage_rows, to_dict
from .loop import epoch_end, steps_per_epoch
from .run import Position, Progress, Run, Trace


def _shard(split: Split, rank: int, world: int, what: str, equal: bool = False) -> Split:
    """Every `world`-th sample from `rank`; `equal` drops the last few so that every rank gets
    the same number of batches (the training step's collectives must line up). A rank left with
    nothing would fall out of step with the others' collectives, so that is refused."""
    if len(split) < world:
        raise UserError(f"the {what} split has {len(split)} image(s) for {world} processes: each needs at "
                        f"least one. Raise {'max_train_samples' if what == 'training' else 'max_eval_samples'} "
                        f"to {world} or more, or start fewer processes.")
    n = len(split) // world * world if equal else len(split)
    return split if world == 1 else split.every(rank, n, world)  # views: pictures on disk stay there


# --- before training -----------------------------------------------------------------------------

def prepare(cfg: Config, started: float | None = None, folder: bool = True) -> Run:
    """Resolve the device plan, load data and model, make or reopen the run folder, restore the
    state to resume, and plan a budgeted run. Every setting is checked, and the device plan
    resolved, before any data loads. `started`: when the run's clock started (`time.monotonic()`),
    which a budget counts from; by default the start of the command running this notebook
    (`cifarlib.core.clock`), else now. `folder=False` makes no run folder and writes nothing (the
    learning-rate finder's run)."""
    started = clock.command_started() if started is None else started
    checkpoints.SAVER.wait()  # a save of this process still being written (a notebook's last run)
    saved = _saved(cfg)
    if saved:
        cfg = resumed(saved["config"], cfg)  # its device too: the process group's backend follows it
    rank, world = runtime.setup_distributed(cfg.device)
    if not saved:
        name = cfg.run_name or checkpoints.default_run_name(cfg.preset, cfg.backbone)
        cfg = replace(cfg, run_name=runtime.broadcast_object(name))  # one name, whatever the ranks' clocks
    plan = runtime.resolve_plan(cfg.device, cfg.precision, cfg.fused, cfg.channels_last, cfg.check_every)
    budget_plan = (cfg.plan or {}).get("budget") if saved else None  # a resumed run keeps its plan
    order = (cfg.plan or {}).get("order") if saved and cfg.order == "auto" else None  # and its batches' order
    cfg = replace(cfg, plan={**plan.to_dict(), **({"budget": budget_plan} if budget_plan else {})})
    if folder:
        checkpoints.check_writable(cfg.checkpoint_dir)  # on every rank: none may wait for one that failed
    torch.manual_seed(cfg.seed)
    data = load_cifar(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed,
                      max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
                      verify_checksums=cfg.verify_checksums, device=plan.device, store_size=cfg.store_size,
                      cache_dir=cfg.cache_dir, data_on=cfg.data_on)
    plan = replace(plan, data_on=data.data_on, data_why=data.data_why,
                   order=order or placement.resolve_order(cfg.order, data.data_on, data.nbytes))
    cfg = replace(cfg, plan={**cfg.plan, **plan.to_dict()})
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
    """A budgeted run's stages, planned from its measured speed (`cifarlib.training.trial.probe`) to end
    near its budget, counted from `run.started`; printed, with the stages JSON that reproduces
    it. Rank 0 plans, and every rank takes its plan."""
    cfg, spe = run.cfg, steps_per_epoch(run)
    costs = trial.probe(run)
    save_s = trial.save_seconds(run)
    outcome: Any = None
    if runtime.is_main_process():
        spent = time.monotonic() - run.started
        try:
            outcome = budget.make_plan(costs, spe, cfg.budget_minutes * 60, spent, save_s, budget.EXIT_S)
        except budget.TooSmall as e:
            outcome = (f"budget_minutes={cfg.budget_minutes:g} is too small for this run: loading the data and the "
                       f"model and timing the stages took {spent:.0f} s, and the shortest run (one step of each stage, "
                       f"with its validation and saves) needs more than is left. The smallest budget that would work "
                       f"is budget_minutes={budget.minutes(e.minimum_s)}; or train for a number of epochs instead "
                       "(budget_minutes=0).")
    outcome = runtime.broadcast_object(outcome)
    if isinstance(outcome, str):
        raise UserError(outcome)
    run.planned_at = time.monotonic()
    if runtime.is_main_process():
        began = time.time() - (time.monotonic() - run.started)  # the budget's start, on the wall clock
        end = time.strftime("%H:%M:%S", time.localtime(began + cfg.budget_minutes * 60))
        print(f"{budget.describe(outcome)}; the run ends by {end} ({cfg.budget_minutes:g} min after "
              f"{time.strftime('%H:%M:%S', time.localtime(began))})", flush=True)
        print(f"the same stages without a budget: budget_minutes=0 stages='{budget.reproduce(cfg.stages, outcome)}'"
              + (f" (their rates include lr_scale={cfg.lr_scale:g}: leave it out)" if cfg.lr_scale != 1 else ""), flush=True)
    return _with_budget(cfg, outcome)


def _with_budget(cfg: Config, plan: budget.BudgetPlan) -> Config:
    """The stages as planned: their steps, and their epochs (the rows, validations, each writes),
    which the runs table replays early stopping from."""
    stages = tuple(replace(st, steps=s["steps"], epochs=stage_rows(replace(st, steps=s["steps"]), plan.steps_per_epoch))
                   for st, s in zip(cfg.stages, plan.stages))
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


def _saved(cfg: Config) -> dict[str, Any] | None:
    """A resumed run's last.pt (every rank reads it), whose config is the run's own recipe with
    where and how it runs now (`config.resumed`); None for a new run. No collective: the process
    group is set up after, for the device the merged config names."""
    if not cfg.resume:
        return None
    if not cfg.run_name:
        raise UserError("resume=True needs the run_name of the run to continue.")
    path = checkpoints.prepare_run_dir(cfg.run_name, resume=True, overwrite=False, root=cfg.checkpoint_dir)
    return checkpoints.load(path / "last.pt")


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
        lead = runtime.is_main_process()  # the saved sums are the ranks' total, which rank 0 carries on
        loss_sum, seen = (r["loss_sum"], r["seen"]) if lead else (0.0, 0)
        run.epoch = Position(len(run.history), r["order"], epoch_end(run), r["step"], loss_sum, seen,
                             r["train_seconds"], r["seconds"], traced=_traced(r, loss_sum, seen, run.cfg.accum_steps),
                             x0=run.data_epochs)
    runstate.restore_rng(run, r["rng"], rank)


def _traced(r: dict[str, Any], loss_sum: float, seen: int, accum: int) -> tuple[float, int, int]:
    """The trace's last point for a resumed epoch, against the sums it resumes with: rank 0's loss
    and images since that point were saved (`traced_since`), so that the next point's mean is
    rank 0's alone, as it is in a run never stopped, though the sums carried on are every rank's.
    Saves from before it hold the point itself, right for one process."""
    if "traced_since" in r:
        loss_since, seen_since, step = r["traced_since"]
        return loss_sum - loss_since, seen - seen_since, step
    return tuple(r.get("traced", (r["loss_sum"], r["seen"], r["step"] // accum)))


def replan(run: Run, si: int) -> Config:
    """Stages `si` on planned again, as a stage starts, with the time left and what the run has
    measured (`_costs_now`). Rank 0 decides."""
    plan = budget.BudgetPlan(**run.cfg.plan["budget"])
    costs, basis = _costs_now(run, plan, si)
    outcome = budget.replan(plan, si, costs, time.monotonic() - run.started, basis) if runtime.is_main_process() else None
    outcome = runtime.broadcast_object(outcome)
    run.planned_at = time.monotonic()
    cfg = _with_budget(run.cfg, outcome)
    if runtime.is_main_process():
        print(f"re-planned at stage {run.cfg.stages[si].name!r} ({basis}): {budget.describe(outcome)}", flush=True)
        if run.dir is not None:  # the runs table reads the stages' rows from it, the run stopped or not
            _record_config(cfg, run.dir / "config.json", resumed=True)
    return cfg


def refit(run: Run) -> Config:
    """The last stage, at one of its epoch boundaries, made as long as the time left allows at
    the pace measured in it (`budget.refit_last`). Rank 0 decides."""
    si, plan = run.at.stage, budget.BudgetPlan(**run.cfg.plan["budget"])
    train_s, steps, val_s, rows = run.pace[si]
    stage = run.cfg.stages[si]
    cost = budget.StageCost(stage.name, stage.share, plan.stages[si]["image_size"], train_s / steps, val_s / rows)
    done = run.at.epoch * plan.steps_per_epoch
    outcome = budget.refit_last(plan, done, cost, time.monotonic() - run.started) if runtime.is_main_process() else None
    outcome = runtime.broadcast_object(outcome)
    cfg = _with_budget(run.cfg, outcome)
    if runtime.is_main_process():
        print(f"re-planned inside stage {stage.name!r} (its own pace): {budget.describe(outcome)}", flush=True)
        if run.dir is not None:
            _record_config(cfg, run.dir / "config.json", resumed=True)
    return cfg


def _costs_now(run: Run, plan: budget.BudgetPlan, si: int) -> tuple[list[budget.StageCost], str]:
    """What stages `si` on will cost, and on what it rests: the pace this process measured on the
    stage before, for a stage of the same image size and layers; the probe's figures for sizes and
    layers not yet run. A pace does not carry over between them: on the real photos the head stage
    (64 px, the head alone) ran at 0.80-0.81 of its probe's step time, the full stage (88 px, every
    layer) at 0.94-1.00 of its own, so scaling the one by the other planned the full stage 14-30%
    too long. Where the run has measured nothing (resumed at a stage boundary, maybe on another
    machine), the stages are probed again; before the first stage, the plan's probe stands. The
    last stage is fitted again under way at its own pace (`refit`)."""
    stages, probed = run.cfg.stages[si:], plan.stages[si:]
    if si and si - 1 not in run.pace:
        return trial.probe(run, range(si, len(run.cfg.stages))), "probed again"
    costs = [budget.StageCost(st.name, st.share, p["image_size"], p["step_s"], p["val_s"]) for st, p in zip(stages, probed)]
    if not si:
        return costs, "the probe's"
    train_s, steps, val_s, rows = run.pace[si - 1]
    before, done = plan.stages[si - 1], run.cfg.stages[si - 1]
    step_k = (train_s / max(steps, 1)) / max(before["step_s"], 1e-9)
    val_k = (val_s / max(rows, 1)) / max(before["val_s"], 1e-9)
    alike = lambda st, p: st.groups == done.groups and p["image_size"] == before["image_size"]  # noqa: E731
    costs = [replace(c, step_s=c.step_s * step_k, val_s=c.val_s * val_k) if alike(st, p) else c
             for c, st, p in zip(costs, stages, probed)]
    return costs, f"the probe's, after the time spent (stage {done.name!r} ran at {step_k:.2f}x its probe)"


def record_actual_time(run: Run) -> None:
    """A budgeted run's end: its last files written, config.json's plan gets the actual time."""
    if "budget" not in (run.cfg.plan or {}) or not runtime.is_main_process() or run.dir is None:
        return
    checkpoints.SAVER.wait()
    actual = round((time.monotonic() - run.started) / 60, 3)
    run.cfg = replace(run.cfg, plan={**run.cfg.plan, "budget": {**run.cfg.plan["budget"], "actual_minutes": actual}})
    _record_config(run.cfg, run.dir / "config.json", resumed=True)
    print(f"budget {run.cfg.budget_minutes:g} min: planned {run.cfg.plan['budget']['predicted_minutes']:.1f} min, "
          f"took {actual:.1f} min", flush=True)
