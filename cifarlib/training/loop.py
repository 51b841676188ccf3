"""The steps of an epoch, and validation: the part of training that runs on the device.

`train_steps` trains from a `Position` (an epoch's batch order, the batches done, the running
sums) until the epoch ends or one of its scheduled checks asks the caller to save or to stop.
The host never waits for the device inside a step: nothing reads a device value back (but the
gradient scaler of a plan forced to fp16 with an unfused optimizer, which its printed plan says:
`DevicePlan.scaler_waits`). It waits only at the scheduled checks, every `plan.check_every`
optimizer steps (50 on a GPU, where each wait drains the queue of launched work; every step on
the CPU, where it costs nothing) and at the epoch's end. A check reads, in one small tensor all-reduced over the ranks, the stop flag
that signals set, the first batch whose loss was not finite, and whether a periodic save is
due, so that under torchrun every rank acts at the same step. Checks, stops and saves fall only
on optimizer steps' boundaries, so that no partial accumulation of gradients is ever lost.

A non-finite loss: the first such batch is kept in a device tensor, updated without a host wait,
and read at the next check, which comes before that check's optimizer step is applied. So with a
check every step no bad step is ever applied; with a longer interval, up to `check_every - 1`
of them may be, in memory only (nothing is saved after the first: saves happen at checks).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core import progress, runtime
from ..data.datasets import Batches
from ..model.backbones import GROUPS
from ..model.inference import logits
from .config import Stage, stage_steps
from .run import Position, Run, StageRun

if TYPE_CHECKING:
    from .guard import StopSignals

COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile=True ("eager" counts graphs cheaply)
NO_BAD_STEP = 1 << 62  # first bad batch b is carried as NO_BAD_STEP - b, so that a MAX finds the first
AHEAD = 4  # batches gathered ahead on the host, for pictures off the device
TRACE_POINTS = 200  # at most about this many points of the trace an epoch (at checks, so every few checks)


def apply_stage(model: nn.Module, groups: dict[str, list[str]], stage: Stage) -> list[dict[str, Any]]:
    """Make exactly the stage's groups trainable; returns the optimizer's parameter groups."""
    params = dict(model.named_parameters())
    trainable = {n for g in stage.groups for n in groups[g]}
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    return [{"params": [params[n] for n in groups[g]], "lr": lr, "name": g} for g, lr in zip(stage.groups, stage.lr)]


def stage_model(run: Run) -> nn.Module:
    """What a stage trains through, and what the budget's probe times: the model, in DDP under
    torchrun, compiled if asked. Compiling the same model again finds dynamo's graphs for the same
    trainable layers (a second `torch.compile` of a module started in 1 ms on the CPU, against 24 s
    the first time), so the probe pays each stage's compilation once, before the plan is made."""
    net = run.model
    if runtime.distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=runtime.ddp_device_ids(run.device))
    if run.cfg.compile:  # static shapes: training batches all have one size (drop_last)
        net = torch.compile(net, dynamic=False, backend=COMPILE_BACKEND)
    return net


def train_mode(model: nn.Module, frozen_bn: str = "eval") -> None:
    """model.train(); with `frozen_bn="eval"`, BatchNorm layers whose parameters are all frozen
    stay in eval mode and keep their (pretrained) statistics, while with "train" they go on
    updating them, as a plain `model.train()` does."""
    model.train()
    for m in model.modules():
        if frozen_bn == "eval" and isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()):
            m.eval()


def ahead(run: Run) -> int:
    """Batches gathered ahead by a background thread: AHEAD for pictures that live off the
    device (the host's memory, the disk), none for pictures on the device (a batch is a slice)."""
    return 0 if run.plan.data_on == "device" else AHEAD


def train_loader(run: Run) -> Batches:
    return Batches(run.train, run.cfg.batch_size, shuffle=True, drop_last=True, seed=run.cfg.seed,
                   block=run.plan.order == "block", ahead=ahead(run))


def steps_per_epoch(run: Run) -> int:
    return -(-len(train_loader(run)) // run.cfg.accum_steps)


def epoch_end(run: Run) -> int:
    """The batch the epoch `run.at` points to ends at: the loader's length, or fewer for the last
    epoch of a stage whose length in steps ends inside it."""
    n, spe = len(train_loader(run)), steps_per_epoch(run)
    left = stage_steps(run.cfg.stages[run.at.stage], spe) - run.at.epoch * spe
    return n if left >= spe else left * run.cfg.accum_steps


class Check(NamedTuple):
    stop: bool                # a signal came, on some rank
    bad_step: int | None      # the first batch whose loss was not finite, on any rank
    save: bool                # a periodic save is due
    loss_sum: float           # this rank's running loss sum (for the trace)


def scheduled_check(first_bad: torch.Tensor, stop: bool, save_due: bool,
                    loss_sum: torch.Tensor | None = None) -> Check:
    """The loop's one host wait between epoch ends, agreed by every rank in one all-reduce.
    `first_bad` is an int64 device tensor, -1 for none. The running loss is read after the wait,
    which has drained the queue: that adds a copy of a finished value, not a wait."""
    code = torch.where(first_bad >= 0, NO_BAD_STEP - first_bad, 0)
    flags = torch.stack([code, code.new_tensor(int(stop)), code.new_tensor(int(save_due))])
    bad, stop_, save = runtime.all_reduce(flags, "max").tolist()
    loss = float(loss_sum) if loss_sum is not None else math.nan
    return Check(stop_ > 0, (NO_BAD_STEP - bad) if bad > 0 else None, save > 0, loss)


def _record(run: Run, st: StageRun, pos: Position, loss_sum: float, step: int) -> None:
    """A point of the trace: the mean loss since its last point, and each group's rate."""
    last_loss, last_seen, last_step = pos.traced
    rates = {f"lr_{g}": 0.0 for g in GROUPS} | {f"lr_{g['name']}": g["lr"] for g in st.opt.param_groups}
    mean = (loss_sum - last_loss) / max(pos.seen - last_seen, 1)
    run.trace.add(pos.x0 + pos.step / len(train_loader(run)), st.stage.name, mean, step - last_step, rates)
    pos.traced = (loss_sum, pos.seen, step)


def train_steps(run: Run, st: StageRun, pos: Position, stop: StopSignals | None = None, save_due=lambda: False) -> str:
    """Train from `pos` (which advances) to `pos.end`: returns "done", or earlier "stop" (a
    signal came), "save" (a periodic save is due) or "non-finite" (`pos.bad_step` says where;
    the optimizer step it belongs to was not applied).

    With gradient accumulation, DDP all-reduces the gradients only at the last micro-batch of
    each optimizer step (`no_sync` for the others).
    """
    accum, plan, opt = run.cfg.accum_steps, run.plan, st.opt
    train_mode(st.net, run.cfg.frozen_bn)
    inner = getattr(st.net, "_orig_mod", st.net)  # under torch.compile
    ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
    if not isinstance(pos.loss_sum, torch.Tensor):  # made on the device: torch.tensor would copy it there and wait
        pos.loss_sum = torch.full((), float(pos.loss_sum), dtype=torch.float32, device=run.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)
    steps_here = -(-pos.end // accum)  # optimizer steps in this epoch
    record_every = plan.check_every * -(-steps_here // (TRACE_POINTS * plan.check_every))
    bar = progress.bar(train_loader(run).epoch(pos.epoch, pos.order, pos.step, pos.end), initial=pos.step, total=pos.end,
                       desc=f"epoch {pos.epoch + 1}", leave=False)
    started, event = time.perf_counter(), "done"
    try:
        for i, (x, y) in enumerate(bar, start=pos.step):
            inputs, targets = run.aug(x, y)
            stepping = (i + 1) % accum == 0 or i + 1 == pos.end
            with contextlib.nullcontext() if stepping or not ddp else inner.no_sync():
                with plan.autocast():
                    loss = F.cross_entropy(st.net(inputs).float(), targets)
                st.scaler.scale(loss / accum).backward()
            loss = loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i + 1, first_bad)
            pos.loss_sum += loss * len(x)
            pos.seen += len(x)
            if not stepping:
                continue
            step = -(-(i + 1) // accum)  # this optimizer step's number in the epoch
            check = step % plan.check_every == 0 or i + 1 == pos.end
            if check:
                c = scheduled_check(first_bad, bool(stop and stop.signum), save_due(), pos.loss_sum)
                if c.bad_step is not None:
                    pos.bad_step = c.bad_step
                    opt.zero_grad(set_to_none=True)
                    return "non-finite"
            st.scaler.step(opt)
            st.scaler.update()
            opt.zero_grad(set_to_none=True)
            if st.sched.last_epoch + 1 < st.sched.total_steps:
                st.sched.step()
            pos.step = i + 1
            if check and (step % record_every == 0 or i + 1 == pos.end):
                _record(run, st, pos, c.loss_sum, step)
            if check and (c.stop or c.save):
                event = "stop" if c.stop else "save"
                break
    finally:
        pos.train_seconds += time.perf_counter() - started
        bar.close()
    return event


def train_epoch(run: Run, st: StageRun, epoch: int) -> float:
    """One whole epoch over this rank's shard; returns the mean training loss (soft targets).
    (What the benchmarks time; `cifarlib.training.train` runs `train_steps` with its checks.)"""
    loader = train_loader(run)
    pos = Position(epoch, loader.order(epoch), len(loader))
    train_steps(run, st, pos)
    total, seen = runtime.sum_over_ranks(pos.loss_sum, pos.seen)
    return total / max(seen, 1)


@torch.no_grad()
def validate(run: Run, model: nn.Module) -> tuple[float, float]:
    """Loss and top-1 accuracy on the validation split, through the one evaluation path, under
    the run's plan."""
    model.eval()
    mean, std = run.aug.mean, run.aug.std
    loss, correct, seen = torch.zeros((), device=run.device), torch.zeros((), device=run.device), 0
    for x, y in Batches(run.val, run.cfg.eval_batch_size, ahead=ahead(run)).epoch(0):
        scores = logits(model, x, run.aug.size, mean, std, plan=run.plan)  # the stage's size
        loss += F.cross_entropy(scores, y, reduction="sum")
        correct += (scores.argmax(1) == y).sum()
        seen += len(y)
    total_loss, total_correct, count = runtime.sum_over_ranks(loss, correct, seen)
    return total_loss / max(count, 1), total_correct / max(count, 1)
