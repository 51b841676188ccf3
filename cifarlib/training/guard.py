"""What can stop a training run, and how each stop reaches the user with nothing lost.

- Interrupts: SIGINT (Ctrl-C, or "interrupt kernel" in JupyterLab), SIGTERM (a cluster's
  pre-emption, a papermill timeout's shutdown). `StopSignals` turns them into a flag that the
  training loop reads at its scheduled checks: the step in progress finishes, the run saves its
  exact position, and `Interrupted` ends it with one line. A second Ctrl-C while the first is
  being handled raises KeyboardInterrupt at once, for a user who does not want to wait.
- A loss that is NaN or infinite: `non_finite_error` names where it happened and why it
  usually does, and nothing of it reaches a file.
- Out of memory: `out_of_memory_error` names the device's memory and the settings that fix it;
  `warn_if_too_big` estimates a CPU step's memory before training and warns.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch
from torch import nn

from ..core import runtime
from ..core.errors import UserError

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report


class Interrupted(UserError):
    """The run stopped on a signal after saving its exact position; `exit_status` is the CLI's."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = EXIT_STATUS.get(signum, 130)


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT and SIGTERM set `stop.signum` instead of
    stopping the process; the loop decides when to act on it. Handlers can only be set from the
    main thread: elsewhere this does nothing and signals keep their usual effect."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_STATUS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def in_notebook() -> bool:
    return "ipykernel" in sys.modules and "IPython" in sys.modules


def interrupted_message(epoch: int, step: int, run_name: str) -> str:
    line = f"interrupted at epoch {epoch} step {step}; continue with run_name={run_name} resume=True"
    if in_notebook():
        line += " (in a fresh kernel; in this one, running the training cell again continues from there too)"
    return line


def non_finite_error(epoch: int, step: int | None, stage: str, rates: dict[str, float], fp16: bool,
                     check_every: int = 1) -> UserError:
    """A NaN or infinite loss: the training loss at batch `step` of `epoch`, found at the loop's
    next scheduled check (every `check_every` optimizer steps), or (`step` None) the validation
    loss at the end of `epoch`."""
    lrs = ", ".join(f"{k} {v:.3g}" for k, v in rates.items())
    if step is None:
        what, applied = f"the validation loss became NaN or infinite after epoch {epoch}", ""
    else:
        what = f"the training loss became NaN or infinite at epoch {epoch}, step {step}"
        applied = ("That step was not applied, and n" if check_every == 1 else
                   f"It was found at the next scheduled check (every {check_every} optimizer steps), so the weights "
                   f"in memory may have taken up to {check_every - 1} bad step(s); the run continues from its last save, "
                   "which has none of them. N")
    return UserError(
        f"{what}, in stage {stage!r} (learning rates: {lrs}). " + (applied or "N")
        + "othing since the last save was written: best.pt, last.pt and history.csv are as they were. Likely causes: a learning "
        "rate too high for this batch size (lower the stage's rates, or the batch size with them), "
        "bad input data (images or labels out of range)"
        + (", or fp16 overflow (a smaller learning rate usually cures it, or precision=bf16 where the device has it)" if fp16 else "")
        + ". Continue from the last save with resume=True once the cause is fixed.")


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _remedies(batch_size: int, accum_steps: int) -> str:
    half = max(1, batch_size // 2)
    return (f"Remedies: batch_size={half} with accum_steps={accum_steps * batch_size // half} keeps the recipe "
            "(the same images per optimizer step), or a smaller image_size.")


def out_of_memory_error(device: torch.device, batch_size: int, accum_steps: int, image_size: int, what: str) -> UserError:
    return UserError(
        f"out of memory on {device} ({runtime.memory_text(device)}) during {what}, at batch_size={batch_size}, "
        f"image_size={image_size}. {_remedies(batch_size, accum_steps)} Nothing already "
        "saved is lost: best.pt and last.pt hold the last saved state.")


def step_memory(model: nn.Module, image_size: int, batch_size: int, optimizer_states: int = 2) -> int:
    """Estimated peak bytes of a CPU training step at `batch_size`: one forward and backward at
    batch 2, whose saved activations are counted and scaled, plus the parameters, their gradients
    and the optimizer's state. The model's weights, buffers and the random state are left as
    they were."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # BatchNorm's statistics
    params = list(model.parameters())
    was_training, needs = model.training, [p.requires_grad for p in params]
    device = params[0].device
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()
            for p in params:
                p.requires_grad_(True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(torch.randn(2, 3, image_size, image_size, device=device))
            out.float().sum().backward()
    finally:
        for p, n in zip(params, needs):
            p.grad = None
            p.requires_grad_(n)
        model.load_state_dict(buffers, strict=False)
        model.train(was_training)
    weights = sum(p.numel() * p.element_size() for p in params)
    inputs = 3 * image_size * image_size * 4 * 3  # the batch in float, its augmented copy, the grid
    return int(sum(saved.values()) / 2 * batch_size + inputs * batch_size + weights * (2 + optimizer_states))


def warn_if_too_big(model: nn.Module, image_size: int, batch_size: int, accum_steps: int) -> int | None:
    """On the CPU, before training: warn (training still starts) when a step will likely need
    more memory than is available. Returns the estimate in bytes."""
    need, have = step_memory(model, image_size, batch_size), runtime.available_memory(torch.device("cpu"))
    if have is not None and need > have:
        print(f"warning: a training step at batch_size={batch_size}, image_size={image_size} needs about "
              f"{need / 2**30:.1f} GiB, and {have / 2**30:.1f} GiB is available: it may swap or be killed. "
              f"{_remedies(batch_size, accum_steps)}", file=sys.stderr, flush=True)
    return need
