"""Which process this is under torchrun: its rank, and whether it is the main one.

A module of its own, importing nothing of cifarlib, so that `errors` (whose notices only the
main process prints) and `runtime` (which starts the process group) can both use it without
importing each other. torch is imported only when it is already loaded: a tool that never
imports torch (the runs table) is never distributed.
"""

from __future__ import annotations

import os
import sys


def rank() -> int:
    """This process's rank under torchrun (from the environment before the process group
    starts); 0 when not distributed."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0
