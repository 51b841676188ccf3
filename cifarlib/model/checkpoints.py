"""Run folders and checkpoints: self-describing, written atomically, read with weights_only=True.

Each run writes to `checkpoints/<run_name>/`: `config.json`, `history.csv`, `best.pt` (lowest
validation loss), `last.pt` (everything needed to resume) and `loss_curves.png`. Every file is
written to a temporary name beside it and renamed into place, so a crash or a full disk never
leaves a truncated file where the last good one was. A checkpoint holds only tensors, numbers,
strings, lists and dicts, so `torch.load(..., weights_only=True)` reads it and nothing in it can
run code.

Training does not wait for its files: it copies what it saves to CPU memory (`snapshot`) and
hands the writing, and the drawing of the curves, to `SAVER`, one background thread.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from ..core import runtime
from ..core.errors import UserError, disk_full
from ..core.files import write_atomically

FORMAT = 1


def default_run_name(preset: str, backbone: str) -> str:
    return f"{preset}-{backbone}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(run_name: str, resume: bool, overwrite: bool, root: str = "checkpoints") -> Path:
    """The run's folder, created; refuses to overwrite silently, or to resume from nothing.

    Under torchrun rank 0 alone looks and decides, and sends the outcome (the folder, or the
    error) to the others: a slower rank that looked for itself could find rank 0's first file
    already there and refuse the folder as "already exists".
    """
    path = runtime.resolve_path(root) / run_name
    outcome: list[Any] = [None]
    if runtime.is_main_process():
        try:
            _prepare_run_dir(path, resume, overwrite)
        except UserError as e:
            outcome[0] = str(e)
    outcome = [runtime.broadcast_object(outcome[0])]
    if outcome[0] is not None:
        raise UserError(outcome[0])
    return path


def _prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (path / "last.pt").is_file():
            raise UserError(f"cannot resume: {path / 'last.pt'} does not exist. Check run_name, "
                            "or start a new run with resume=False.")
        check_writable(path)
        return
    try:
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise UserError(f"the run folder {path} already exists. Pass resume=True to continue it, "
                                "overwrite=True to replace it, or choose another run_name.")
            shutil.rmtree(path)
    except OSError as e:
        raise _unwritable(path, e) from None
    check_writable(path)


def _unwritable(path: Path, e: OSError) -> UserError:
    return UserError(f"the checkpoint folder {path} cannot be created or written ({e.strerror or e}). "
                     "Choose another checkpoint_dir, on a disk you can write to.")


def check_writable(root: str | os.PathLike) -> None:
    """Make the folder `root` (a checkpoint_dir, or a run folder in it) if it is missing, and
    write and delete a file there; a folder that cannot be made or written (a read-only disk, a
    file in its place, a path under /proc) is one `UserError` naming it. Call it before any data
    loads, so that a run does not find out at its first save."""
    path = runtime.resolve_path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        full = disk_full(e, path, "nothing was written", "Free some space, or choose another checkpoint_dir.")
        raise (full or _unwritable(path, e)) from None


def snapshot(obj: Any) -> Any:
    """A copy of `obj` whose tensors are in CPU memory, detached and owned (training may go on
    changing the originals in place while the copy is written)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Saver:
    """Runs save jobs one at a time in a background thread, so that training never waits for a
    disk or for matplotlib.

    A plain thread rather than an executor: one job at a time, in order, and an error must reach
    the training loop. `submit` first waits for the job before (so files land in order and at
    most one snapshot waits in memory); `wait` waits for the last job and raises its error, if it
    had one (a full disk, say); the process waits for the last job before it exits.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        atexit.register(self._wait_at_exit)

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # kept for `wait`, which raises it in the training loop
                self._error = e
        self._thread = threading.Thread(target=run, name="cifarlib-saver", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        """Whether a job is still being written."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _wait_at_exit(self) -> None:
        try:
            self.wait()
        except Exception as e:
            print(f"error: the last save did not complete: {e}", file=sys.stderr)


SAVER = Saver()


def save(obj: dict[str, Any], path: Path) -> None:
    write_atomically(path, lambda f: torch.save(obj, f))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; a missing, truncated or foreign file is a clear error."""
    path = runtime.resolve_path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle refusing a global, ...
        raise UserError(f"{path} is not a readable checkpoint, perhaps truncated ({type(e).__name__}: {e}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise UserError(f"{path} is not a cifarlib checkpoint (format {FORMAT}).")
    return ckpt


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(obj: Any, path: Path) -> None:
    write_atomically(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    """history.csv, rewritten whole from the history (the copy in last.pt is the authority)."""
    if not history:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    write_atomically(path, buf.getvalue().encode())


def read_history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
