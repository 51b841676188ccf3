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
checks) is the run's device plan (`cifarlib.core.runtime.resolve_plan`), resolved once in `prepare`
from the settings of the same names, printed, and recorded in config.json and every checkpoint.
Under torchrun: DistributedDataParallel, each rank training on its own shard of the
training pictures (wherever they live); only rank 0 writes files. The steps themselves, and their scheduled
checks, are in `cifarlib.training.loop`; the state they change, in `cifarlib.training.run`.

The loop reads from the top down, one level per function: `epochs` runs the stages, `_stage`
one stage's epochs, `_epoch` one epoch's steps (with a save or a stop wherever a check asks),
and `_end_epoch` the epoch's end (validation, early stopping, the history row, the save).

Nothing is lost when a run stops (see `cifarlib.training.guard`): on SIGINT, SIGTERM or a notebook's
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
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Iterator

from ..core import clock, runtime
from ..core.errors import UserError, cli_errors
from ..model import checkpoints
from ..model.backbones import GROUPS
from . import guard, runstate
from .config import (AUTO_BUDGET_MINUTES, PRESETS, Config, make_config, parse_value, stage_image_size, stage_rows,
                     stage_steps)
from .loop import (apply_stage, epoch_end, stage_model, steps_per_epoch, train_epoch, train_loader,  # noqa: F401
                   train_mode, train_steps, validate)
from .optimizer import load_optimizer_state, load_scaler_state, make_optimizer, make_schedule, resize_schedule  # noqa: F401
from .prepare import prepare, record_actual_time, refit, replan
from .run import Position, Progress, Run, StageRun
from .stopping import Patience
from .trial import find_lr  # noqa: F401  (train.find_lr(run, stage=None))

REPLAN_AFTER_S = 2.0  # a pause longer than this between a budget's plan and its first step is planned for


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
    if run.dir is None:  # the learning-rate finder's run (prepare(folder=False)): nothing to write to
        return
    _check_memory(run)
    run.plan.tune()
    with guard.StopSignals() as stop, _failures(run):
        while run.at.stage < len(run.cfg.stages):
            yield from _stage(run, stop)
    record_actual_time(run)


def _stage(run: Run, stop: guard.StopSignals) -> Iterator[dict[str, Any]]:
    """The stage `run.at` points to, from its epoch under way until `run.at` moves on."""
    if run.stage is None or run.stage.index != run.at.stage:
        run.stage = _start_stage(run)
    while run.stage.index == run.at.stage:
        yield _epoch(run, stop)


def _refits(run: Run) -> bool:
    """Whether a budgeted run fits its last stage again at this epoch boundary inside it: where
    this process has measured that stage's pace (see `prepare.refit`)."""
    si = run.at.stage
    return ("budget" in (run.cfg.plan or {}) and run.stage.index == si == len(run.cfg.stages) - 1
            and si in run.pace and run.at.epoch > 0)


def _refit_stage(run: Run) -> None:
    """The last stage's length planned again under way: its schedule resized from where it stands,
    and the stage ended here where no further epoch's row pays."""
    run.cfg = refit(run)
    st, spe = run.stage, steps_per_epoch(run)
    st.stage = run.cfg.stages[st.index]
    steps = stage_steps(st.stage, spe)
    if steps <= run.at.epoch * spe:
        run.at = Progress(st.index + 1, 0)
    else:
        st.sched = resize_schedule(run.cfg, st.opt, st.stage, st.sched, steps)


def _start_stage(run: Run) -> StageRun:
    """A stage's layers made trainable, at its image size, with a fresh optimizer and one-cycle
    schedule, or those a resumed run saved inside this stage. A budgeted run first plans this
    stage and the rest again (`_replans`)."""
    si, saved = run.at.stage, run.saved
    run.saved = None
    if saved is not None and not _trained_inside(saved, si):
        saved = None  # stopped before its first step: the stage starts afresh, and may be planned again
    if _replans(run, si, saved):
        run.cfg = replan(run, si)
    cfg = run.cfg
    stage = cfg.stages[si]
    run.aug.size = stage_image_size(cfg, stage)
    params = apply_stage(run.model, run.groups, stage)
    opt = make_optimizer(cfg, params, run.plan.fused)
    st = StageRun(si, stage, stage_model(run), opt, make_schedule(cfg, opt, stage, stage_steps(stage, steps_per_epoch(run))),
                  run.plan.scaler())
    if saved is not None:
        load_optimizer_state(opt, saved["optimizer"], run.plan.fused)
        st.sched.load_state_dict(saved["scheduler"])
        load_scaler_state(st.scaler, saved.get("scaler", {}))
        st.patience = Patience(saved["stage_best"], saved["bad_epochs"])
    return st


def _trained_inside(saved: dict[str, Any], si: int) -> bool:
    """Whether a resumed run's save is from inside stage `si`, after some of its steps. A stop
    that comes as a stage ends saves the next stage's fresh state at its step 0."""
    return saved["stage"] == si and (saved["next_epoch"] > 0 or bool(saved.get("step")))


def _replans(run: Run, si: int, saved: dict[str, Any] | None) -> bool:
    """Whether a budgeted run plans again as stage `si` starts: at every stage that starts afresh
    (not one a resumed run saved inside: its one-cycle schedule is under way), a resumed run's
    first included, so that the time of its restart is won back; at the first stage only where
    time has passed since the plan was made (the finder's cell of notebook 03, a pause), which the
    plan did not count."""
    if "budget" not in (run.cfg.plan or {}) or saved is not None:
        return False
    return si > 0 or run.planned_at is None or time.monotonic() - run.planned_at > REPLAN_AFTER_S


def _epoch(run: Run, stop: guard.StopSignals) -> dict[str, Any]:
    """One epoch: its steps from where it stands, saving or stopping wherever a check asks; then
    its end."""
    if run.epoch is None:
        loader = train_loader(run)
        run.epoch = Position(len(run.history), loader.order(len(run.history)), epoch_end(run), x0=run.data_epochs)
    pos = run.epoch
    start = time.time() - pos.seconds
    began = (pos.step, pos.train_seconds)  # what this process trains of the epoch: the budget's measured pace
    while (event := _steps(run, pos, stop)) != "done":
        pos.seconds = time.time() - start
        _act_on(run, pos, event, stop)
    run.epoch = None
    return _end_epoch(run, pos, start, began)


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


def _end_epoch(run: Run, pos: Position, start: float, began: tuple[int, float]) -> dict[str, Any]:
    """Validation, early stopping, the history row, the pace measured, where training goes on (a
    budget's last stage fitted again), and the save."""
    cfg, st = run.cfg, run.stage
    loss_sum, seen = runtime.sum_over_ranks(pos.loss_sum, pos.seen)
    t0 = time.perf_counter()
    val_loss, val_acc = validate(run, run.model)  # uncompiled: no recompile for eval mode or its last batch
    _keep_pace(run, st.index, -(-(pos.step - began[0]) // cfg.accum_steps), pos.train_seconds - began[1],
               time.perf_counter() - t0)
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
    if _refits(run):  # before the save: it holds the refitted plan, schedule and where training goes on
        _refit_stage(run)
    improved = val_loss < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, val_loss)
    state = runstate.resume_state(run, st, None)
    if runtime.is_main_process():
        runstate.submit(run, {"metrics": row, "resume": state}, {"metrics": row} if improved else None, rows=True)
    return row


def _keep_pace(run: Run, stage: int, steps: int, train_s: float, val_s: float) -> None:
    """Add an epoch's optimizer steps, training seconds and validation seconds, as this process
    measured them, to its stage's (what a budget's next plan scales the probe by)."""
    t, n, v, rows = run.pace.get(stage, (0.0, 0, 0.0, 0))
    run.pace[stage] = (t + train_s, n + steps, v + val_s, rows + 1)


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
    return {"epoch": pos.epoch + 1, "stage": st.stage.name, "stage_epoch": run.at.epoch + 1,
            "data_epochs": round(pos.x0 + pos.end / len(train_loader(run)), 6), **rates,
            "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6), "val_acc": round(val_acc, 6),
            "seconds": round(pos.seconds, 2), "images_per_s": round(seen / max(pos.train_seconds, 1e-9), 1)}


def format_row(row: dict[str, Any], run: Run) -> str:
    """The one plain line per epoch that the CLI and notebook 03 print."""
    total = sum(stage_rows(s, steps_per_epoch(run)) for s in run.cfg.stages)
    return (f"epoch {row['epoch']}/{total} [{row['stage']}] train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.2%} lr_head {row['lr_head']:.2e} "
            f"{row['seconds']:.1f} s {row['images_per_s']:.0f} img/s")


def summary(run: Run) -> str:
    """Notebook 03's last lines: the best epoch and where the run's files are, or, for the
    finder's run (no folder), that nothing was trained."""
    if run.dir is None:
        return "find_lr=True: nothing was trained and no run folder made; set find_lr=False to train."
    if not run.history:
        return f"no epoch trained yet; run files: {run.dir}"
    best = min(run.history, key=lambda r: r["val_loss"])
    return (f"best validation loss {best['val_loss']:.4f} (accuracy {best['val_acc']:.2%}) at epoch {best['epoch']}; "
            f"saved in {run.dir / 'best.pt'}\nrun files: {run.dir}")


def _rates(opt) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


# --- the command line ----------------------------------------------------------------------------

def _find_lr_command(cfg: Config) -> None:
    """`find_lr=True` on the command line: the range test on the run's first stage (or, with
    resume=True, the stage it is at), its suggestion printed and its plot written to runs/; no
    run folder is made, so the same command without find_lr=True then trains as usual."""
    from .curves import lr_finder
    from ..core.figures import save_png

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
    lines += ["  stages='[{\"name\": \"head\", \"share\": 1, \"groups\": [\"head\"], \"lr\": [0.001], \"steps\": 200}, ...]'",
              "    (the preset's stages replaced: a JSON list, each with name, share, groups, lr and optionally",
              "    warmup, anneal, image_size, steps; a budget's plan prints the one that trains its stages)",
              "  find_lr=False (the command line's own: run the learning-rate finder, print its suggestion, train nothing)",
              "", f"presets: {', '.join(PRESETS)}, and auto (the default): original on a CUDA GPU; elsewhere cpu, with",
              f"budget_minutes={AUTO_BUDGET_MINUTES:g} unless epochs or budget_minutes is given"]
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
            if not isinstance(find, bool):  # checked as every setting is: find_lr=1 once trained in full
                raise UserError(f"find_lr must be True or False, not {find!r}.")
            cfg = make_config(kv.pop("preset", "auto"), **kv)
            if find:
                return _find_lr_command(cfg)
            run = prepare(cfg, started=clock.process_started())  # the command's start
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
