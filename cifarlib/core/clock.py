"""When the command began: the moment a budget (`budget_minutes`) counts from.

A user's stopwatch starts when they press Enter, so a budget counts the whole command, Python's
start and the imports included. On the command line (`python -m cifarlib.train`) that is this
process's start. Under `python -m cifarlib.notebook` (`make train`) the training runs in a kernel
that papermill starts a few seconds later, so the runner leaves its own start for the kernel in
the environment (`COMMAND_STARTED`, a `time.time()` stamp). A notebook in JupyterLab has no
command: its kernel may have started hours before, and the budget counts from when the run is
prepared.
"""

from __future__ import annotations

import os
import time

COMMAND_STARTED = "CIFARLIB_COMMAND_STARTED"
KERNEL_START_S = 600  # a stamp older than this when the process began is another command's, inherited


def _process_start() -> float | None:
    """This process's start as a `time.time()` stamp, or None where psutil cannot tell."""
    try:
        import psutil
        return psutil.Process().create_time()
    except (ImportError, OSError):
        return None


def process_started() -> float:
    """When this process began, on the monotonic clock (now, where it cannot be told)."""
    began = _process_start()
    return time.monotonic() - max(0.0, time.time() - began) if began else time.monotonic()


def command_started() -> float:
    """When the command running this notebook began, on the monotonic clock: the stamp the
    notebook runner left, where this process began within `KERNEL_START_S` after it; else now."""
    try:
        stamp = float(os.environ.get(COMMAND_STARTED, ""))
    except ValueError:
        return time.monotonic()
    began = _process_start()
    if began is None or not stamp <= began + 1 <= stamp + KERNEL_START_S:
        return time.monotonic()
    return time.monotonic() - max(0.0, time.time() - stamp)


def mark_command_start() -> None:
    """Leave this process's start for the kernels it starts (the notebook runner's command)."""
    os.environ[COMMAND_STARTED] = repr(_process_start() or time.time())
