"""The steps of an epoch, and validation: the part of training that runs on the device.

`train_steps` trains from a `Position` (an epoch's batch order, the batches done, the running
sums) until the epoch ends or one of its scheduled checks asks the caller to save or to stop.
The host never waits for the GPU inside a step: nothing reads a device value back. It waits
only at the scheduled checks: every `check_every` steps (50 on a GPU, where each wait drains
the queue of launched work; every step on the CPU, where it costs nothing) and at the epoch's
end. A check all-reduces, in one small tensor, the stop flag that signals set, the earliest
step whose loss was not finite, and whether a periodic save is due, so that under torchrun
every rank acts at the same step.

A non-finite loss never reaches the weights: on CUDA the fused optimizer (or, with fp16, the
gradient scaler) skips that step on the device (`found_inf`), and the flag is read at the next
check; elsewhere (the CPU, where it costs nothing; Apple's MPS, which has neither) it is read
before the step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runtime
from .config import Config, Stage
from .data import Batches
from .evaluate import logits

if TYPE_CHECKING:
    from .guard import StopSignals
    from .train import Run

CHECK_EVERY_GPU = 50  # steps between scheduled checks on a GPU (the only host waits of an epoch)
NO_BAD_STEP = 1 << 30


@dataclass
class Position:
    """Where an epoch stands: enough to stop after any step and go on from there."""
    epoch: int                                # the epoch's index in the run (0-based)
    order: torch.Tensor                       # its batch order (CPU), the same on every rank
    step: int = 0                             # batches done
    loss_sum: torch.Tensor | float = 0.0      # sum of loss x images over the batches done
    seen: int = 0                             # images trained on
    train_seconds: float = 0.0                # time spent in training steps (validation apart)
    seconds: float = 0.0                      # wall time of the epoch so far
    bad_step: int | None = None               # the first step whose loss was not finite


def apply_stage(model: nn.Module, groups: dict[str, list[str]], stage: Stage) -> list[dict[str, Any]]:
    """Make exactly the stage's groups trainable; returns the optimizer's parameter groups."""
    params = dict(model.named_parameters())
    trainable = {n for g in stage.groups for n in groups[g]}
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    return [{"params": [params[n] for n in groups[g]], "lr": lr, "name": g} for g, lr in zip(stage.groups, stage.lr)]


def train_mode(model: nn.Module, frozen_bn: str = "eval") -> None:
    """model.train(); with `frozen_bn="eval"`, BatchNorm layers whose parameters are all frozen
    stay in eval mode and keep their (pretrained) statistics, while with "train" they go on
    updating them, as a plain `model.train()` does."""
    model.train()
    for m in model.modules():
        if frozen_bn == "eval" and isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters()):
            m.eval()


def make_optimizer(cfg: Config, param_groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay, **fused)


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


def train_loader(run: Run) -> Batches:
    return Batches(run.train, run.cfg.batch_size, shuffle=True, drop_last=True, seed=run.cfg.seed)


def scheduled_check(device: torch.device, first_bad: torch.Tensor, stop: bool, save_due: bool) -> tuple[bool, int | None, bool]:
    """The loop's one host wait between epoch ends: (stop, first non-finite step or None, save),
    agreed by every rank in one all-reduce."""
    code = torch.where(first_bad >= 0, NO_BAD_STEP - first_bad, 0).reshape(1).float()
    flags = torch.cat([code, torch.tensor([float(stop), float(save_due)]).to(device)])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop_, save = flags.tolist()
    return stop_ > 0, (NO_BAD_STEP - int(bad)) if bad > 0 else None, save > 0


def train_steps(run: Run, model: nn.Module, opt, sched, scaler, pos: Position,
                stop: StopSignals | None = None, save_due=lambda: False) -> str:
    """Train from `pos` (which advances) to the epoch's end: returns "done", or earlier "stop"
    (a signal came), "save" (a periodic save is due) or "non-finite" (`pos.bad_step` says where).

    With gradient accumulation, DDP all-reduces the gradients only at the last micro-batch of
    each optimizer step (`no_sync` for the others).
    """
    accum, dev = run.cfg.accum_steps, run.device
    train_mode(model, run.cfg.frozen_bn)
    loader = train_loader(run)
    n, every = len(loader), check_every(dev)
    autocast, _ = runtime.autocast(dev)
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    ddp = isinstance(inner, nn.parallel.DistributedDataParallel)
    skip_on_device = getattr(opt, "_step_supports_amp_scaling", False) and not scaler.is_enabled()
    total = torch.as_tensor(pos.loss_sum, dtype=torch.float32).to(dev)
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)
    step_bad = None
    bar = tqdm(loader.epoch(pos.epoch, pos.order, pos.step), initial=pos.step, total=n, desc=f"epoch {pos.epoch + 1}",
               leave=False, disable=not runtime.is_main_process())
    started, event = time.perf_counter(), "done"
    try:
        for i, (x, y) in enumerate(bar, start=pos.step):
            inputs, targets = run.aug(x, y)
            stepping = (i + 1) % accum == 0 or i + 1 == n
            with contextlib.nullcontext() if stepping or not ddp else inner.no_sync():
                with autocast:
                    loss = F.cross_entropy(model(inputs).float(), targets)
                scaler.scale(loss / accum).backward()
            bad = ~torch.isfinite(loss.detach())
            step_bad = bad if step_bad is None else step_bad | bad
            if stepping:
                if skip_on_device:  # the fused kernels skip the update where found_inf is set
                    opt.grad_scale, opt.found_inf = None, step_bad.float().reshape(1)
                elif dev.type in ("cpu", "mps") and step_bad.item():  # no fused skip there: look now
                    pos.bad_step = i + 1
                    return "non-finite"  # not applied: the weights are as after the last good step
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if sched.last_epoch + 1 < sched.total_steps:
                    sched.step()
                first_bad = torch.where((first_bad < 0) & step_bad, i + 1, first_bad)
                step_bad = None
            total += loss.detach() * len(x)
            pos.seen += len(x)
            pos.step = i + 1
            if pos.step % every == 0 or pos.step == n:
                stopping, bad_step, save = scheduled_check(dev, first_bad, bool(stop and stop.signum), save_due())
                if bad_step is not None:
                    pos.bad_step = bad_step
                    return "non-finite"
                if stopping or save:
                    event = "stop" if stopping else "save"
                    break
    finally:
        pos.loss_sum = total
        pos.train_seconds += time.perf_counter() - started
        if hasattr(opt, "found_inf"):
            del opt.found_inf, opt.grad_scale
        bar.close()
    return event


def world_sums(*values: torch.Tensor | float) -> list[float]:
    """Each value summed over the ranks (one all-reduce), as floats: an epoch-end host wait."""
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_epoch(run: Run, model: nn.Module, opt, sched, scaler, epoch: int) -> float:
    """One whole epoch over this rank's shard; returns the mean training loss (soft targets).
    (What the benchmarks time; `cifarlib.train.epochs` runs `train_steps` with its checks.)"""
    pos = Position(epoch, train_loader(run).order(epoch))
    train_steps(run, model, opt, sched, scaler, pos)
    total, seen = world_sums(pos.loss_sum, pos.seen)
    return total / max(seen, 1)


@torch.no_grad()
def validate(run: Run, model: nn.Module) -> tuple[float, float]:
    """Loss and top-1 accuracy on the validation split, through the one evaluation path."""
    model.eval()
    mean, std = run.aug.mean, run.aug.std
    loss, correct, seen = torch.zeros((), device=run.device), torch.zeros((), device=run.device), 0
    for x, y in Batches(run.val, run.cfg.eval_batch_size).epoch(0):
        scores = logits(model, x, run.aug.size, mean, std)  # the stage's size
        loss += F.cross_entropy(scores, y, reduction="sum")
        correct += (scores.argmax(1) == y).sum()
        seen += len(y)
    total_loss, total_correct, count = world_sums(loss, correct, seen)
    return total_loss / max(count, 1), total_correct / max(count, 1)
