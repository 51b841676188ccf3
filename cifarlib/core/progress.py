"""Progress bars: one place decides how they show.

In a terminal or a notebook, tqdm's bar, redrawn as usual. When stderr is not a terminal (a log
file, `make demo`, CI, a cluster job), every redraw of a bar becomes a line of its own, hundreds
an epoch; there a bar is written at most once every `LOG_INTERVAL` seconds (and when it ends),
which keeps a log readable and still shows that the job is alive. Only the main process draws.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from .ranks import is_main_process

LOG_INTERVAL = 30.0  # seconds between a bar's lines where stderr is not a terminal


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced, or closed
        return False


def bar(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, drawn by the main process only, and at most once every
    `LOG_INTERVAL` seconds where stderr is neither a terminal nor a notebook's."""
    kwargs.setdefault("disable", not is_main_process())
    if not _terminal() and "ipykernel" not in sys.modules:
        kwargs.update(mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL)
    return tqdm(iterable, **kwargs)
