"""Run folders and checkpoints: self-describing, written atomically, read with weights_only=True.

Each run writes to `checkpoints/<run_name>/`: `config.json`, `history.csv`, `best.pt` (lowest
validation loss), `last.pt` (everything needed to resume) and `loss_curves.png`. Every file is
written to a temporary name beside it and renamed into place, so a crash or a full disk never
leaves a truncated file where the last good one was. A checkpoint holds only tensors, numbers,
strings, lists and dicts, so `torch.load(..., weights_only=True)` reads it and nothing in it can
run code.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import runtime
from .errors import UserError

FORMAT = 1


def default_run_name(preset: str, backbone: str) -> str:
    return f"{preset}-{backbone}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(run_name: str, resume: bool, overwrite: bool, root: str = "checkpoints") -> Path:
    """The run's folder, created; refuses to overwrite silently, or to resume from nothing.
    Under torchrun rank 0 decides first; the others then see the same folder and agree."""
    with runtime.main_process_first():
        return _prepare_run_dir(runtime.resolve_path(root) / run_name, resume, overwrite)


def _prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> Path:
    if resume:
        if not (path / "last.pt").is_file():
            raise UserError(f"cannot resume: {path / 'last.pt'} does not exist. Check run_name, "
                            "or start a new run with resume=False.")
        return path
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"the run folder {path} already exists. Pass resume=True to continue it, "
                            "overwrite=True to replace it, or choose another run_name.")
        if runtime.is_main_process():
            shutil.rmtree(path)
    if runtime.is_main_process():
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename: all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; make it like any other file
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C mid-write: leave no temporary file
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the disk to write {path}; the previous version, if "
                            "any, is untouched. Free some space and resume the run.") from None
        raise


def save(obj: dict[str, Any], path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomically(path, buf.getvalue())


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
