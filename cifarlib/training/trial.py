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
  exponentially from 1e-7 to 10 times its peaks over about 100 steps, or until the smoothed loss
  diverges; the suggestion is where the smoothed loss falls fastest, with the rate at its minimum
  divided by 10 beside it. Written here rather than taken from fastai (which would bring its own
  training loop and data API) or torch-lr-finder (which wants a DataLoader and saves and restores
  only the model and optimizer, not the random states and BatchNorm modes this run holds).
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
    x = run.val.images[: run.cfg.eval_batch_size]
    if not len(x):
        return 0.0
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
    """The range test: for each step, its scale of the stage's peak rates and the smoothed loss."""
    stage: str
    groups: tuple[str, ...]
    peaks: tuple[float, ...]       # the stage's peak rates (the preset's, times lr_scale)
    scales: list[float]
    losses: list[float]
    steepest: float                # the scale where the smoothed loss falls fastest: the suggestion
    minimum_tenth: float           # the scale at the smoothed loss's minimum, divided by 10

    def rates(self, scale: float) -> dict[str, float]:
        return {g: p * scale for g, p in zip(self.groups, self.peaks)}

    def advice(self) -> str:
        head = lambda s: ", ".join(f"{g} {r:.2g}" for g, r in self.rates(s).items())  # noqa: E731
        return (f"learning-rate finder, stage {self.stage!r}: the loss falls fastest at lr_scale={self.steepest:.3g} "
                f"({head(self.steepest)}); the minimum / 10 is at lr_scale={self.minimum_tenth:.3g}. The preset's "
                f"rates are lr_scale=1. To train with the suggestion, add lr_scale={self.steepest:.3g} (it multiplies "
                "every stage's rates, keeping their ratios).")


def find_lr(run: Run, stage: int | str | None = None, steps: int = 100, start: float = 1e-7, end: float = 10.0,
            beta: float = 0.98) -> LRCurve:
    """The learning-rate range test for `stage` (an index or a name; None: the stage the run is
    at) on this run's data, model and plan (see the module docstring). The run is left exactly as
    it was."""
    names = [s.name for s in run.cfg.stages]
    si = run.at.stage if stage is None else names.index(stage) if isinstance(stage, str) else stage
    si = min(si, len(names) - 1)
    loader = train_loader(run)
    batches, epoch, scales, losses = iter(()), 0, [], []
    with untouched(run):
        st = _stage_run(run, si, steps)
        peaks = list(run.cfg.stages[si].lr)  # the stage's peaks (the schedule moved the groups' rates to its start)
        train_mode(run.model, run.cfg.frozen_bn)
        avg, best = 0.0, math.inf
        for i in range(steps):
            scale = start * (end / start) ** (i / max(steps - 1, 1))
            for g, peak in zip(st.opt.param_groups, peaks):
                g["lr"] = peak * scale
            try:
                x, y = next(batches)
            except StopIteration:  # a small split: go on through the next epoch's order
                batches, epoch = iter(loader.epoch(1000 + epoch)), epoch + 1
                x, y = next(batches)
            inputs, targets = run.aug(x, y)
            with run.plan.autocast():
                loss = F.cross_entropy(run.model(inputs).float(), targets)
            st.scaler.scale(loss).backward()
            st.scaler.step(st.opt)
            st.scaler.update()
            st.opt.zero_grad(set_to_none=True)
            value = loss.item()  # a read every step: the finder's own loop, not training's
            if not math.isfinite(value):
                break
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (i + 1))
            scales.append(scale)
            losses.append(smooth)
            best = min(best, smooth)
            if i > 10 and smooth > 4 * best:  # diverged
                break
    return _suggest(names[si], tuple(run.cfg.stages[si].groups), tuple(peaks), scales, losses)


def _suggest(stage, groups, peaks, scales, losses) -> LRCurve:
    if len(losses) < 3:
        return LRCurve(stage, groups, peaks, scales, losses, scales[-1] if scales else 1.0, (scales[-1] if scales else 1.0) / 10)
    logs = [math.log10(s) for s in scales]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(losses) - 1)]
    steepest = scales[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    minimum = scales[min(range(len(losses)), key=losses.__getitem__)]
    return LRCurve(stage, groups, peaks, scales, losses, steepest, minimum / 10)


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
