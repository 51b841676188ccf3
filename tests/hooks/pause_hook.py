"""Test-only: a run stops itself at a known point, so that a test acts on it there instead of
polling a file and racing the run (a quick machine finished the tiny runs before a poll saw what
it waited for; a slow one, the other way round).

`install(target, when, signum)`: once `target` has been renamed into place (every file cifarlib
writes ends with `os.replace`, in `cifarlib.core.files.write_atomically`), and with
when="mid-epoch" only once it holds a save from inside an epoch, this process sends
itself `signum`: SIGSTOP freezes it there for the test to kill or signal, SIGINT is what a
notebook's interrupt button sends. Once only. It is installed in processes the tests start by
`sitecustomize.py` beside this file (PYTHONPATH=tests/hooks, CIFARLIB_TEST_PAUSE_AT=path), and
in the suite's shared kernel by calling `install` (and `uninstall` after).
"""

import os
import signal

_REAL = os.replace


def _mid_epoch(path: str) -> bool:
    import torch
    return bool(torch.load(path, weights_only=True)["resume"].get("step"))


def install(target: str, when: str = "written", signum: int = signal.SIGSTOP) -> None:
    target, fired = os.path.realpath(target), []

    def replace(src, dst, *args, **kwargs):
        _REAL(src, dst, *args, **kwargs)
        if not fired and os.path.realpath(dst) == target and (when != "mid-epoch" or _mid_epoch(target)):
            fired.append(True)
            os.kill(os.getpid(), signum)
    os.replace = replace


def uninstall() -> None:
    os.replace = _REAL
