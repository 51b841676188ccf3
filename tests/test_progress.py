"""Progress bars in logs: where stderr is not a terminal, a bar writes a line at most every 30 s,
not one per update (training, decoding and downloading all draw through `cifarlib.core.progress`)."""

import io
import re
import sys
from pathlib import Path

import tqdm.std

from cifarlib.core import progress

PACKAGE = Path(__file__).resolve().parents[1] / "cifarlib"


def test_a_bar_in_a_log_writes_at_most_every_30_seconds(monkeypatch):
    clock = iter(range(0, 10_000))  # one second passes at each look at the clock
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    for _ in progress.bar(range(300), desc="epoch 1", file=log):
        pass
    draws = log.getvalue().count("\r")
    assert 2 <= draws <= 300 // 30 + 3, draws  # the start, one every 30 s, the end


def test_every_bar_of_the_package_goes_through_it():
    users = sorted(p.stem for p in PACKAGE.rglob("*.py") if re.search(r"^\s*(from|import) tqdm", p.read_text(), re.M))
    assert users == ["progress"], users
    drawn = sorted(p.stem for p in PACKAGE.rglob("*.py") if "progress.bar(" in p.read_text())
    assert drawn == ["imagecache", "loop", "sources"], drawn
