"""What a training run holds while it trains: `Run`, the stage under way (`StageRun`) and the
epoch under way (`Position`).

A module of its own so that `loop` (the steps), `runstate` (what is saved) and `train` (the
stages and epochs) all read the same state without importing one another. Each field changes in
one place in `cifarlib.training.train`, which its comment names.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.runtime import DevicePlan
from ..data.augment import BatchAugment
from ..data.datasets import CifarData, Split
from .config import Config, Stage
from .stopping import Patience


@dataclass(frozen=True)
class Progress:
    """Where training goes on: a stage, and the epoch within it."""
    stage: int = 0
    epoch: int = 0


@dataclass
class Position:
    """Where an epoch stands: enough to stop at any optimizer step's boundary and go on there."""
    epoch: int                                # the epoch's index in the run (0-based)
    order: torch.Tensor                       # its batch order (CPU), the same on every rank
    end: int                                  # the batch it ends at (the loader's length)
    step: int = 0                             # batches done
    loss_sum: torch.Tensor | float = 0.0      # sum of loss x images over the batches done (on the device)
    seen: int = 0                             # images trained on
    train_seconds: float = 0.0                # time spent in training steps (validation apart)
    seconds: float = 0.0                      # wall time of the epoch so far
    bad_step: int | None = None               # the first batch whose loss was not finite
    traced: tuple[float, int, int] = (0.0, 0, 0)  # loss sum, images and optimizer steps at the trace's last point
    x0: float = 0.0                           # epochs of data seen before this epoch (the curves' x)


@dataclass
class Trace:
    """The training loss, smoothed, and each layer group's learning rate, recorded at the loop's
    scheduled checks (whose host wait they share), for curves within epochs. `points` holds
    dicts: `x` (epochs, fractional), `stage`, `loss` and `lr_<group>` (0 while frozen). The loss
    is an exponential moving average per optimizer step (beta 0.98, debiased, as fastai's
    recorder smooths it) of the mean loss over each interval between recorded checks."""
    points: list[dict[str, Any]] = field(default_factory=list)
    ema: float = 0.0     # the moving average, before debiasing
    steps: int = 0       # optimizer steps averaged into it

    BETA = 0.98

    def add(self, x: float, stage: str, mean_loss: float, steps: int, rates: dict[str, float]) -> None:
        keep = self.BETA ** steps
        self.ema = keep * self.ema + (1 - keep) * mean_loss
        self.steps += steps
        loss = self.ema / (1 - self.BETA ** self.steps)
        self.points.append({"x": round(x, 6), "stage": stage, "loss": round(loss, 6), **rates})

    def state(self) -> dict[str, Any]:
        return {"points": list(self.points), "ema": self.ema, "steps": self.steps}


@dataclass
class StageRun:
    """A stage under way: what it trains through, and with what."""
    index: int
    stage: Stage
    net: nn.Module                            # the model, in DDP under torchrun, compiled if asked
    opt: torch.optim.Optimizer
    sched: Any                                # OneCycleLR over the stage's optimizer steps
    scaler: torch.amp.GradScaler
    patience: Patience = field(default_factory=Patience)  # train._end_epoch


@dataclass
class Run:
    """What a training run holds between epochs."""
    cfg: Config
    dir: Path
    plan: DevicePlan
    data: CifarData | None
    train: Split                  # this rank's shard of the training split
    val: Split                    # this rank's shard of the validation split
    model: nn.Module
    groups: dict[str, list[str]]
    aug: BatchAugment
    history: list[dict[str, Any]] = field(default_factory=list)  # train._end_epoch
    trace: Trace = field(default_factory=Trace)                  # loop.train_steps, at its checks
    at: Progress = field(default_factory=Progress)              # train._end_epoch
    best_val_loss: float = math.inf                              # train._end_epoch
    stage: StageRun | None = None         # the stage under way (train._stage)
    epoch: Position | None = None         # the epoch under way (train._epoch)
    saved: dict[str, Any] | None = None   # a resumed run's saved position, until its stage starts again
    broken: str | None = None             # why this Run can't go on in memory (train._failures)
    saving_seconds: float = 0.0           # time the loop spent handing its files to the saver
    last_save: float = field(default_factory=time.monotonic)
    memory_checked: bool = False
    started: float = field(default_factory=time.monotonic)  # the run's clock (monotonic), less time spent before a resume
    planned_at: float | None = None       # when a budget's plan was last made (prepare, at a stage's start)
    pace: dict[int, tuple[float, int, float, int]] = field(default_factory=dict)  # per stage, what this
    # process measured of it: training seconds, optimizer steps, validation seconds, rows (train._end_epoch)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def data_epochs(self) -> float:
        """Epochs of data trained on up to the last history row: a budgeted run's rows may each
        be part of an epoch (rows from before this column: one epoch each)."""
        return float(self.history[-1].get("data_epochs", len(self.history))) if self.history else 0.0
