"""What a training run saves, and restores to go on exactly where it stood.

A checkpoint's contents (`checkpoint_dict`: config, class names, normalisation, image size,
history, weights), the position to resume from (`resume_state`: optimizer, schedule, scaler,
stage, epoch, the step within it, the epoch's batch order and running sums, every random state),
and `submit`, which copies them to CPU memory and hands the writing of `best.pt`, `last.pt`,
`history.csv` and `loss_curves.png` to the background saver (`checkpoints.SAVER`). Used by
`cifarlib.training.train`, which decides when.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..core import runtime
from ..data.augment import mixes
from ..model import checkpoints
from .config import to_dict
from .run import Position, Run, StageRun


def checkpoint_dict(run: Run, model_state: dict, extra: dict[str, Any]) -> dict[str, Any]:
    d = run.data
    return {"format": checkpoints.FORMAT, "backbone": run.cfg.backbone, "dataset": d.name,
            "classes": list(d.classes), "superclasses": d.superclasses,
            "fine_to_coarse": None if d.fine_to_coarse is None else d.fine_to_coarse.tolist(),
            "mean": list(run.aug.mean), "std": list(run.aug.std), "image_size": run.aug.size,  # the stage's
            "store_size": run.cfg.store_size,
            "config": to_dict(run.cfg), "model": model_state, "history": list(run.history), "trace": run.trace.state(),
            **extra}


def rng_states(run: Run) -> dict[str, Any]:
    """Every random state that training draws from: each rank's augmentation generator (and
    device generator, where the device has its own), and the CPU's. Under torchrun, a collective."""
    ranks = runtime.gather_objects([run.aug.generator.get_state(), runtime.rng_state(run.device)])
    return {"augment": [r[0] for r in ranks], "device": [r[1] for r in ranks], "torch": torch.get_rng_state()}


def restore_rng(run: Run, rng: dict[str, Any], rank: int) -> None:
    states = rng["augment"]
    run.aug.generator.set_state(states[rank % len(states)])
    torch.set_rng_state(rng["torch"])
    device_states = rng.get("device", rng.get("cuda")) or [None]  # "cuda" in checkpoints before the device plan
    runtime.set_rng_state(run.device, device_states[rank % len(device_states)])


def resume_state(run: Run, st: StageRun, pos: Position | None) -> dict[str, Any]:
    """What `last.pt` needs to go on exactly where the run stands (`run.at`): after an epoch
    (`pos` None), or at `pos` inside one. Under torchrun a collective (random states, the
    epoch's sums)."""
    state = {"stage": st.index, "next_stage": run.at.stage, "next_epoch": run.at.epoch,
             "optimizer": st.opt.state_dict(), "scheduler": st.sched.state_dict(), "scaler": st.scaler.state_dict(),
             "stage_best": st.patience.best, "bad_epochs": st.patience.bad, "best_val_loss": run.best_val_loss,
             "rng": rng_states(run), "spent_s": time.monotonic() - run.started}
    if pos is not None:
        loss_sum, seen = runtime.sum_over_ranks(pos.loss_sum, pos.seen)
        # the trace's last point, as this rank's loss and images since it: the sums saved are every
        # rank's, while the trace follows this rank (rank 0) alone
        since = [float(pos.loss_sum) - pos.traced[0], pos.seen - pos.traced[1], pos.traced[2]]
        state.update(step=pos.step, order=pos.order, loss_sum=loss_sum, seen=int(seen),
                     train_seconds=pos.train_seconds, seconds=pos.seconds, traced=list(pos.traced), traced_since=since)
    return state


def submit(run: Run, last: dict[str, Any], best: dict[str, Any] | None, rows: bool) -> None:
    """Copy what is to be saved to CPU memory now; the background saver writes best.pt (when
    validation improved), last.pt and, after an epoch, history.csv and loss_curves.png."""
    from .curves import loss_curves  # matplotlib only where curves are drawn
    from ..core.figures import save_png

    t0 = time.perf_counter()
    state = run.model.state_dict()
    last = checkpoints.snapshot(checkpoint_dict(run, state, last))
    best = None if best is None else {k: v for k, v in last.items() if k != "resume"} | best
    history, folder, soft = last["history"], run.dir, mixes(run.aug.policy)

    def job() -> None:
        if best is not None:
            checkpoints.save(best, folder / "best.pt")
        checkpoints.save(last, folder / "last.pt")
        if rows:
            checkpoints.write_history(history, folder / "history.csv")
            save_png(loss_curves(history, last["trace"]["points"], soft), folder / "loss_curves.png")
    checkpoints.SAVER.submit(job)
    run.saving_seconds += time.perf_counter() - t0
    run.last_save = time.monotonic()


def save_position(run: Run, state: dict[str, Any]) -> None:
    if runtime.is_main_process():
        submit(run, {"metrics": run.history[-1] if run.history else None, "resume": state}, None, rows=False)


def save_due(run: Run) -> bool:
    """A periodic save is due (rank 0's clock decides; the check makes every rank agree)."""
    every = run.cfg.save_every_minutes * 60
    return (every > 0 and runtime.is_main_process() and time.monotonic() - run.last_save >= every
            and not checkpoints.SAVER.busy())
