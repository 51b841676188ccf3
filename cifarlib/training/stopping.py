"""Early stopping: the one rule, used by training (`cifarlib.training.train`) and by the runs table
(`cifarlib.evaluation.runs`, which replays it over a history and must run without torch).

In each stage, count the validation rows since the stage's best (lowest) validation loss; when
the count reaches `patience`, the stage ends, and with `stop_ends_run` the whole run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Patience:
    """A stage's early-stopping state: its best validation loss, and the rows since."""
    best: float = math.inf
    bad: int = 0

    def after(self, val_loss: float) -> Patience:
        return Patience(val_loss, 0) if val_loss < self.best else Patience(self.best, self.bad + 1)

    def exhausted(self, patience: int) -> bool:
        return self.bad >= patience


def replay(val_loss: list[float], stages: list[int], patience: int, stop_ends_run: bool) -> tuple[str, int]:
    """The status of a history of validation losses, one per row, under a plan of `stages` (rows
    per stage): "finished" (every stage ran all its rows), "stopped early" (complete, but the
    rule cut a stage short or ended the run) or "unfinished"; and how many rows the plan covers.
    (history.csv rounds losses to 6 decimals, so two losses equal there but not in training
    could in principle be replayed differently.)"""
    i, cut = 0, False
    for s, rows in enumerate(stages):
        state = Patience()
        for e in range(rows):
            if i == len(val_loss):
                return "unfinished", i
            state = state.after(val_loss[i])
            i += 1
            if state.exhausted(patience):
                if stop_ends_run:
                    return ("stopped early" if e + 1 < rows or s + 1 < len(stages) else "finished"), i
                cut = cut or e + 1 < rows
                break
    return ("stopped early" if cut else "finished"), i
