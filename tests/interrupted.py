"""A run stopped by SIGTERM mid-epoch, for the tests that resume one (under another plan, device
or placement of its pictures)."""

import os
import signal

import pytest

from cifarlib.data.augment import BatchAugment
from cifarlib.training import train


def stopped_at_batch(cfg, batch: int):
    """`cfg`'s run, stopped by a SIGTERM sent as its `batch`-th batch (counted from 1 over the
    whole run) is augmented; the loop stops at its next check. Returns the run."""
    calls, real = [], BatchAugment.__call__

    def augment(self, x, y):
        calls.append(1)
        if len(calls) == batch:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x, y)
    BatchAugment.__call__ = augment
    try:
        run = train.prepare(cfg)
        with pytest.raises(train.guard.Interrupted):
            list(train.epochs(run))
    finally:
        BatchAugment.__call__ = real
    return run
