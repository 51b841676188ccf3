"""Files written all or nothing: a temporary file beside the target, then a rename.

Every file the package writes goes through `write_atomically` (checkpoints, histories, figures, the
image cache, exports), so that a crash or a full disk never leaves a truncated file where the last
good one was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import disk_full


def write_atomically(path: Path, data: bytes | Callable[[Any], Any],
                     full_disk_fix: str | None = "Free some space and resume the run.") -> None:
    """Write `data` (bytes, or a function that writes to the open file, for data too large to
    hold twice in memory) to `path` via a temporary file and a rename: all or nothing. A full
    disk is a `UserError` ending with `full_disk_fix`; with None, the error itself."""
    kept = "the previous version, if any, is untouched"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:  # a disk so full that not even an empty file fits
        full = full_disk_fix and disk_full(e, path, kept, full_disk_fix)
        if full:
            raise full from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data) if isinstance(data, (bytes, bytearray, memoryview)) else data(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; make it like any other file
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C mid-write: leave no temporary file
        Path(tmp).unlink(missing_ok=True)
        full = full_disk_fix and disk_full(e, path, kept, full_disk_fix)
        if full:
            raise full from None
        raise
