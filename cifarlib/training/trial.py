"""Trial steps that leave no trace: the budget's speed probe, and the learning-rate finder.

Both train a few steps for real, and afterwards everything is as it was (`untouched`): the
parameters and buffers (BatchNorm's statistics), which parameters train, each module's train or
eval mode, every random state (the CPU's, the device's, the augmentation's), the augmentation's
image size and the run's trace. The data order needs no restoring: each epoch's order is a pure
function of the seed and the epoch.

- `probe(run)`: the seconds of an optimizer step of each stage (its image size, its trainable
  layers, with augmentation, through the training loop's own steps) and of a validation pass at
  its size, for `cifarlib.training.budget`.
- `find_lr(run, stage)`: the learning-rate range test that fastai's `lr_find` made popular
  (Smith, "Cyclical Learning Rates", 2017): the stage's rates, kept in proportion, rise
  exponentially from 1e-4 of its peaks, over 20 steps a decade, until the smoothed loss diverges
  (4 times its lowest) or 1,000 times the peaks; each step is an optimizer step of the run's
  effective batch (`accum_steps` micro-batches). fastai sweeps absolute rates from 1e-7 to 10;
  here, where the stage's peaks are known, the sweep runs relative to them and far enough past
  them to see the loss turn (the README's first sweep, from 1e-7 to 10 times the peaks, ended
  before it turned). On a head that starts at zero its first decades are still flat, which the
  valley's tolerance keeps the suggestion off (`valley`). The suggestion is fastai's `valley` on the curve trimmed as
  `lr_find` trims it (its first tenth and last 5 points): in simulations of noisy losses, the
  steepest slope over the whole curve picked one of the first 10 steps in over 80% of trials,
  the trimmed valley in none. Beside it, the rate at the smoothed loss's minimum divided by 10.
  Written here rather than taken from fastai (which would bring its own training loop and data
  API) or torch-lr-finder (which wants a DataLoader and saves and restores only the model and
  optimizer, not the random states and BatchNorm modes this run holds).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import runtime
from ..data.datasets import Batches
from ..model.inference import logits
from .budget import StageCost
from .config import stage_image_size
from .loop import apply_stage, stage_model, train_loader, train_mode, train_steps
from .optimizer import make_optimizer, make_schedule
from .run import Position, Run, StageRun, Trace


@contextmanager
def untouched(run: Run):
    """Within the block, train as you like; afterwards the run is as it was."""
    model = run.model
    state = copy.deepcopy(model.state_dict())
    needs = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = (torch.get_rng_state(), run.aug.generator.get_state(), runtime.rng_state(run.device))
    size, trace = run.aug.size, Trace(**copy.deepcopy(run.trace.state()))
    try:
        yield
    finally:
        model.load_state_dict(state)
        for p, n in zip(model.parameters(), needs):
            p.requires_grad_(n)
            p.grad = None
        for m, mode in zip(model.modules(), modes):
            m.training = mode
        torch.set_rng_state(rng[0])
        run.aug.generator.set_state(rng[1])
        runtime.set_rng_state(run.device, rng[2])
        run.aug.size, run.trace = size, trace


def _stage_run(run: Run, si: int, schedule_steps: int) -> StageRun:
    stage = run.cfg.stages[si]
    run.aug.size = stage_image_size(run.cfg, stage)
    opt = make_optimizer(run.cfg, apply_stage(run.model, run.groups, stage), run.plan.fused)
    return StageRun(si, stage, stage_model(run), opt, make_schedule(run.cfg, opt, stage, schedule_steps), run.plan.scaler())


def _validation_seconds(run: Run, size: int, batches: int = 3) -> float:
    """One validation pass at `size`: the median time of `batches` full batches (after one of
    warm-up), times the number of batches the split makes."""
    if not len(run.val):
        return 0.0
    x = next(iter(Batches(run.val, run.cfg.eval_batch_size).epoch(0)))[0]  # on the device, wherever the pictures live
    run.model.eval()
    times = []
    for _ in range(batches + 1):
        t0 = time.perf_counter()
        logits(run.model, x, size, run.aug.mean, run.aug.std, plan=run.plan).sum().item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * len(run.val) / len(x)


def probe(run: Run, stages: range | None = None, steps: int = 8, warmup: int = 2) -> list[StageCost]:
    """The cost of each stage in `stages` (default: all): an optimizer step's seconds, and a
    validation pass's at the stage's size, each through the model as the stage trains it (in DDP,
    compiled: `loop.stage_model`) and with the plan's kernels tuned as training tunes them. Leaves
    no trace (`untouched`). Under torchrun every rank probes; rank 0's times count."""
    costs = []
    run.plan.tune()  # cuDNN's autotuning, as in training: the probe times the kernels it will run
    with untouched(run):
        for si in stages if stages is not None else range(len(run.cfg.stages)):
            stage = run.cfg.stages[si]
            step_s = _step_seconds(run, si, steps, warmup)
            costs.append(StageCost(stage.name, stage.share, run.aug.size, step_s, _validation_seconds(run, run.aug.size)))
    return runtime.broadcast_object(costs)


def _step_seconds(run: Run, si: int, steps: int, warmup: int) -> float:
    """The mean time of `steps` optimizer steps of `stage`, each timed alone after `warmup`
    untimed ones (the first steps at a new shape pay for allocations and the kernels' set-up,
    and were seen to take up to ten times longer), through `loop.train_steps` (augmentation,
    the plan's precision and checks). The mean, not the median: single steps on the 2-core CPU
    varied from 0.72 to 1.19 s, and the slow ones count in a run's time too (the median of 5
    steps predicted an epoch 14% short)."""
    loader, accum = train_loader(run), run.cfg.accum_steps
    st = _stage_run(run, si, warmup + steps)
    pos = Position(0, loader.order(0), end=0)
    times = []
    for _ in range(warmup + steps):
        if pos.end >= len(loader):
            break
        pos.end = min(len(loader), pos.end + accum)
        t0 = time.perf_counter()
        train_steps(run, st, pos)
        times.append(time.perf_counter() - t0)
    return statistics.mean(times[warmup:] or times[-1:])


@dataclass
class LRCurve:
    """The range test: for each step, its scale of the stage's peak rates and the smoothed loss.
    Scales are relative to the peaks the run has now, which include its `lr_scale`."""
    stage: str
    groups: tuple[str, ...]
    peaks: tuple[float, ...]       # the stage's peak rates (the preset's, times lr_scale)
    scales: list[float]
    losses: list[float]
    valley: float                  # the suggestion: fastai's valley on the trimmed curve
    minimum_tenth: float           # the scale at the smoothed loss's minimum, divided by 10
    lr_scale: float = 1.0          # the run's lr_scale, already in `peaks`

    def rates(self, scale: float) -> dict[str, float]:
        return {g: p * scale for g, p in zip(self.groups, self.peaks)}

    def advice(self) -> str:
        head = lambda s: ", ".join(f"{g} {r:.2g}" for g, r in self.rates(s).items())  # noqa: E731
        now = f"lr_scale={self.lr_scale:g}" if self.lr_scale != 1 else "the preset's (lr_scale=1)"
        return (f"learning-rate finder, stage {self.stage!r}: the valley is at {self.valley:.3g} times this run's rates "
                f"({head(self.valley)}); the minimum / 10 at {self.minimum_tenth:.3g} times. This run's rates are "
                f"{now}. To train with the suggestion, set lr_scale={self.lr_scale * self.valley:.3g} (it multiplies "
                "every stage's rates, keeping their ratios).")


def find_lr(run: Run, stage: int | str | None = None, start: float = 1e-4, end: float = 1e3, per_decade: int = 20,
            beta: float = 0.98) -> LRCurve:
    """The learning-rate range test for `stage` (an index or a name; None: the stage the run is
    at) on this run's data, model and plan (see the module docstring): from `start` to `end`
    times the stage's peaks, `per_decade` optimizer steps a decade, until the loss diverges. The
    run is left exactly as it was."""
    names = [s.name for s in run.cfg.stages]
    si = run.at.stage if stage is None else names.index(stage) if isinstance(stage, str) else stage
    si = min(si, len(names) - 1)
    steps = max(2, round(math.log10(end / start) * per_decade) + 1)
    micro = _micro_batches(run)
    scales, losses = [], []
    with untouched(run):
        st = _stage_run(run, si, steps)
        peaks = list(run.cfg.stages[si].lr)  # the stage's peaks (the schedule moved the groups' rates to its start)
        train_mode(run.model, run.cfg.frozen_bn)
        avg, best = 0.0, math.inf
        for i in range(steps):
            scale = start * (end / start) ** (i / (steps - 1))
            for g, peak in zip(st.opt.param_groups, peaks):
                g["lr"] = peak * scale
            value = _finder_step(run, st, micro)
            if not math.isfinite(value):
                break
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (i + 1))
            scales.append(scale)
            losses.append(smooth)
            best = min(best, smooth)
            if i > 10 and smooth > 4 * best:  # diverged
                break
    return _suggest(names[si], tuple(run.cfg.stages[si].groups), tuple(peaks), scales, losses, steps, run.cfg.lr_scale)


def _micro_batches(run: Run):
    """The training split's batches, in one epoch's order after another, for as long as asked."""
    loader, epoch = train_loader(run), 1000
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def _finder_step(run: Run, st: StageRun, micro) -> float:
    """One optimizer step of the effective batch (`accum_steps` micro-batches), as training
    takes it; the mean loss of its micro-batches."""
    total, accum = 0.0, run.cfg.accum_steps
    for _ in range(accum):
        x, y = next(micro)
        inputs, targets = run.aug(x, y)
        with run.plan.autocast():
            loss = F.cross_entropy(run.model(inputs).float(), targets)
        st.scaler.scale(loss / accum).backward()
        total += loss.item()  # a read every micro-batch: the finder's own loop, not training's
    st.scaler.step(st.opt)
    st.scaler.update()
    st.opt.zero_grad(set_to_none=True)
    return total / accum


def valley(losses: list[float], tol: float = 0.0) -> int:
    """fastai's `valley`: the index half-way into the longest valley of `losses` (its longest
    decreasing subsequence), a third and a sixth of the way from its start, as fastai computes
    it; a point extends a valley only where it lies more than `tol` below the one before it.

    Why `tol`: a new head that starts at zero gives every batch the same first loss, ln(classes),
    so the sweep's first decades are a curve that falls smoothly by tiny amounts, without noise;
    fastai's rule counted them as valley and, on the real photos, suggested 0.07 times the
    preset's rates, far to the left of where the loss started to fall (fastai's own heads start
    noisy, and its noise breaks such a run of points)."""
    n = len(losses)
    lds, start, end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] - tol and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[end] < lds[i]:
                end, start = i, i - lds[i]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def _suggest(stage, groups, peaks, scales, losses, steps: int, lr_scale: float) -> LRCurve:
    """The suggestion on the curve trimmed as fastai's `lr_find` trims it: its first tenth of the
    planned steps (the smoothed loss of the first points is noise) and its last 5 points; the
    valley counts falls of at least 1% of the trimmed curve's range (`valley`)."""
    lo, hi = steps // 10, len(losses) - 5
    minimum = scales[min(range(len(losses)), key=losses.__getitem__)] / 10 if losses else 0.1
    if hi - lo < 3:  # too short a curve to trim: the minimum / 10
        return LRCurve(stage, groups, peaks, scales, losses, minimum, minimum, lr_scale)
    trimmed = losses[lo:hi]
    tol = 0.01 * (max(trimmed) - min(trimmed))  # a fall of 1% of the curve's range counts; less does not
    return LRCurve(stage, groups, peaks, scales, losses, scales[lo + valley(trimmed, tol)], minimum, lr_scale)


def save_seconds(run: Run) -> float:
    """What one history row's files cost to write: best.pt (the weights) and last.pt (with the
    optimizer's state: one or two tensors per weight), serialised in memory once to time them,
    and the curves drawn once."""
    import io

    from ..core import figures
    from ..model import checkpoints
    from . import curves
    t0 = time.perf_counter()
    torch.save(checkpoints.snapshot(run.model.state_dict()), io.BytesIO())
    weights = time.perf_counter() - t0
    rows = [{"epoch": 1, "stage": "a", "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5, "lr_head": 1e-3}]
    t0 = time.perf_counter()
    figures.png_bytes(curves.loss_curves(rows))
    curves = time.perf_counter() - t0
    return weights * (3 + (run.cfg.optimizer == "adamw")) + curves
