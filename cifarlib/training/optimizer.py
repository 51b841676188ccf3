"""A stage's optimizer, its schedule and its gradient scaler: made for the run's device plan, and
restored from a save under whatever plan made it.

A run may continue under another plan than the one that saved it: a laptop's run resumed on a
GPU, a fused bf16 channels_last run resumed unfused on another GPU, `channels_last` given on
resume. `Optimizer.load_state_dict` casts each saved state tensor to its parameter's device and
dtype but keeps the saved memory layout, and it moves the `step` counters to the parameters'
device only where the *saved* group was fused or capturable. Left so, a CPU-saved AdamW state
crashes fused AdamW at its first step on CUDA (its counters stay on the CPU); moments saved
channels_last make a fused kernel pair the wrong elements of contiguous parameters (silently on
the CPU; CUDA refuses them), and the other way round; and counters saved fused on a GPU make
unfused AdamW read each one back (`.item()`), a host wait per parameter at every step.

So a loaded state is laid out as a fresh optimizer of this run's plan lays out its own
(`expected`, the table of what it keeps), whatever plan saved it, and checked once after.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import UserError
from .config import Config, Stage


def make_optimizer(cfg: Config, param_groups: list[dict[str, Any]], fused: bool) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay, fused=fused)


def make_schedule(cfg: Config, opt: torch.optim.Optimizer, stage: Stage, steps: int):
    """OneCycleLR over exactly `steps` optimizer steps (at least 2, which it needs). A warm-up of
    exactly one step would end at step 0 and divide by zero in OneCycleLR; it is made a hair
    longer."""
    total = max(steps, 2)
    warmup = stage.warmup * (1 + 1e-6) if stage.warmup * total == 1 else stage.warmup
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=list(stage.lr), total_steps=total, pct_start=warmup,
        anneal_strategy=stage.anneal, cycle_momentum=cfg.cycle_momentum and cfg.optimizer == "sgd")


def resize_schedule(cfg: Config, opt: torch.optim.Optimizer, stage: Stage, old, steps: int):
    """The stage's one-cycle schedule over `steps` optimizer steps instead, from where `old` stands:
    a budget that re-plans a stage under way (its warm-up is over by then: its rate follows the
    anneal of the new length from the same point)."""
    new = make_schedule(cfg, opt, stage, steps)
    done = min(old.last_epoch, new.total_steps - 1)
    new.last_epoch = done - 1
    new.step()  # the rate for step `done` of the new length
    return new


def layout(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's memory order: its strides along the dimensions longer than 1 (the others' strides
    are arbitrary: SGD's momentum buffer for a 1x1 convolution in channels_last is (C, 1, 1, 1)
    where its weight is (C, 1, C, C), the same order)."""
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def expected(p: torch.Tensor, key: str, value: torch.Tensor, group: dict[str, Any]):
    """Where a fresh optimizer of `group`'s plan keeps state `key` of parameter `p`: its device,
    dtype and memory order (`layout`; None: any). For torch's AdamW and SGD (2.4 to 2.14), and
    checked against fresh optimizers in the tests:
    - `step` (AdamW): a float32 scalar, on the parameter's device where the group is fused or
      capturable (the kernels take it there), else on the CPU (the unfused step reads it);
    - anything shaped like the parameter (AdamW's moments, SGD's momentum buffer): the
      parameter's device, dtype and memory order, as `torch.zeros_like(p)` makes it."""
    if key == "step":
        on_device = group.get("fused") or group.get("capturable")
        return (p.device if on_device else torch.device("cpu")), torch.float32, ()
    if value.shape == p.shape:
        return p.device, (p.dtype if p.is_floating_point() else value.dtype), layout(p)
    return p.device, value.dtype, None


def lay_out(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Every state tensor of `opt` as `expected` says a fresh optimizer would keep it, made from
    the saved state (`saved`, an `Optimizer.state_dict()` read on the CPU) rather than from what
    `load_state_dict` made of it: a counter it moved to the device is not read back from there."""
    for group, saved_group in zip(opt.param_groups, saved["param_groups"]):
        for p, pid in zip(group["params"], saved_group["params"]):
            state = opt.state.get(p)
            for key, value in saved["state"].get(pid, {}).items():
                if state is None or not torch.is_tensor(value):
                    continue
                device, dtype, order = expected(p, key, value, group)
                if order is None or key == "step":
                    state[key] = value.to(device=device, dtype=dtype)
                else:  # the parameter's layout: `.to` would keep the saved one
                    state[key] = torch.empty_like(p, dtype=dtype).copy_(value)


def misplaced(opt: torch.optim.Optimizer) -> list[str]:
    """The state tensors that are not where `expected` says, each in words."""
    out = []
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    device, dtype, order = expected(p, key, value, group)
                    if value.device != device or value.dtype != dtype or order not in (None, layout(value)):
                        out.append(f"group {group.get('name', gi)} parameter {pi} {key}: {value.device} {value.dtype} "
                                   f"order {layout(value)}, where {device} {dtype} order {order}")
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, fused: bool) -> None:
    """Load a saved optimizer state under this run's plan, whatever plan saved it: the plan's
    `fused` on every group (`load_state_dict` copies the saved groups' flags back), then every
    state tensor laid out as this plan's fresh optimizer keeps it, and checked."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group["fused"] = fused
        if fused:
            group["foreach"] = None  # fused and foreach exclude each other
    lay_out(opt, state)
    wrong = misplaced(opt)
    if wrong:
        raise UserError("the saved optimizer state could not be laid out for this run's plan (a bug: please report "
                        f"it); {len(wrong)} state tensor(s) are not where a fresh optimizer keeps them, first: {wrong[0]}. "
                        "Resuming under the plan that saved the run (its config.json's plan) avoids it.")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A run saved without fp16 holds a disabled scaler's `{}`, which an enabled scaler refuses;
    it then starts afresh, as any new run does."""
    if state:
        scaler.load_state_dict(state)
