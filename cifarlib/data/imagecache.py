"""Image files decoded once, at `store_size`, into a cache file on disk that training reads from.

`load(root, paths, sizes, mtimes, picked, store_size, cache_dir)` gives the picked files' images
(N, 3, S, S) as a memory-mapped view of the cache file (nothing is read until it is used), and,
per file, why it could not be used ("" when it could). Each file goes through
`cifarlib.data.preprocess.cifar_like` at `store_size` (EXIF rotation, any mode to 8-bit RGB,
transparency on white, shorter side resized, centre cropped square): the rule for a user's
picture, so a photo is later shown to the model as its training images were.

The cache, `cache_dir/image-cache/<folder>-<hash>-<S>px.u8`, is a raw file: the usable images,
uint8, one after the other, then a JSON trailer that lists per file its path (relative to the
dataset's folder), size, modification time, and its row or why it failed, then the trailer's
length and a magic string. A raw file rather than a `torch.save` file because it can be written a
picture at a time: the cache is built in one streaming pass, in chunks of about `CHUNK_BYTES`,
so that a first load's memory stays bounded whatever the folder's size, and it is read back
memory-mapped (`cifarlib.data.mapped`), so that pictures bigger than memory stream from it.
The picked files lie in the order asked for, so each split is one run of rows; a pick that
does not is laid out again, by copying (`contiguous=True`), or gathered into memory.

A picked file is decoded only when the cache has no entry of that path, size and time; entries
of files gone or changed are dropped. A cache is written through a temporary file and a rename;
one from another version, or a damaged one, is rebuilt with a notice, and one in the old
`torch.save` format (`.pt`, before the raw file) is rebuilt once from its own images, with no
decoding. A cache that would not fit on the disk is refused before decoding, naming the space it
needs, unless the images may be held in memory instead (`contiguous=False`); a write that fails
costs the same: the images are decoded into memory with a notice, or refused. The failed files
are listed beside the cache, in `<cache>.skipped.txt`.

Decoding runs in a pool of one thread per core: PIL decodes and resizes outside the GIL, and
threads need no process fork (unsafe in a notebook kernel once torch has started its threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core import progress, runtime
from ..core.errors import UserError, notice, os_error
from ..core.files import write_atomically
from . import mapped
from .preprocess import cifar_like

VERSION = 2
MAGIC = b"cifarlib-images\n"  # the file's last 16 bytes; the 8 before them: the trailer's length
CHUNK_BYTES = 16 << 20  # images decoded, or copied, and written at a time
SHOWN = 5  # failed files named in the notice; all of them are in the .skipped.txt list


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cache_file(root: Path, store_size: int, cache_dir: Path) -> Path:
    return cache_dir / "image-cache" / f"{root.name}-{digest(str(root))}-{store_size}px.u8"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decode(files: list[str], size: int, out: torch.Tensor | None = None,
           bar=None) -> tuple[torch.Tensor, list[str]]:
    """Images (N, 3, size, size) of `files`, written into `out` when given (so that a caller's
    tensor needs no second copy), and, per file, why it failed ("" if it did not; its row is then
    left as it was). Progress goes to `bar`, or a bar of its own."""
    n, threads = len(files), cores()
    images = torch.zeros((n, 3, size, size), dtype=torch.uint8) if out is None else out
    reasons = [""] * n
    step = max(1, min(256, n // (8 * threads)))

    def work(start: int) -> int:
        end = min(start + step, n)
        for i in range(start, end):
            try:
                image = cifar_like(files[i], size)
            except Exception as e:  # noqa: BLE001 - whatever a damaged file makes PIL raise, it is skipped
                reasons[i] = str(e) if isinstance(e, UserError) else f"not a usable image ({type(e).__name__}: {e})"
            else:
                images[i] = image
        return end - start

    pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
    own = bar is None
    try:
        bar = progress.bar(total=n, unit="img", desc=f"decoding at {size} px") if own else bar
        for done in pool.map(work, range(0, n, step)):
            bar.update(done)
    finally:
        if own and bar is not None:
            bar.close()
        pool.shutdown(cancel_futures=True)  # after Ctrl-C, don't decode the rest first
    return images, reasons


@dataclass
class Cache:
    paths: list[str]
    sizes: list[int]
    mtimes: list[int]
    rows: list[int]            # row in `images`, or -1 for a file that failed
    reasons: list[str]         # why it failed, or ""
    images: torch.Tensor       # (usable files, 3, S, S) uint8: memory-mapped, or in memory


def _empty(size: int) -> Cache:
    return Cache([], [], [], [], [], torch.zeros((0, 3, size, size), dtype=torch.uint8))


def _consistent(c: Cache, size: int) -> bool:
    whole = lambda xs: all(type(x) is int for x in xs)  # noqa: E731 - a crafted trailer may hold anything
    if not (whole(c.rows) and whole(c.sizes) and whole(c.mtimes) and all(isinstance(x, str) for x in c.paths + c.reasons)):
        return False
    n, rows = len(c.paths), torch.tensor(c.rows, dtype=torch.int64)
    return (c.images.dtype == torch.uint8 and tuple(c.images.shape[1:]) == (3, size, size)
            and len(c.sizes) == len(c.mtimes) == len(c.reasons) == len(rows) == n
            and torch.equal(rows[rows >= 0].sort().values, torch.arange(len(c.images)))
            and all((r < 0) == bool(why) for r, why in zip(c.rows, c.reasons)))


def _read(path: Path, size: int, same_as: tuple[int, int] | None = None) -> Cache | None:
    """The cache at `path`, or None (with a notice) when it is from another version or damaged.
    Its list and its pictures come from one open file. `same_as`: the (device, inode) of the
    file this process just wrote; another file found there (a rebuild by another run, renamed
    over it since) is read all the same, as it is consistent in itself."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            total = f.seek(0, os.SEEK_END)
            f.seek(max(total - 24, 0))
            tail = f.read(24)
            length = int.from_bytes(tail[:8], "little")
            if len(tail) < 24 or tail[8:] != MAGIC or length > total - 24:
                raise ValueError("no trailer")
            f.seek(total - 24 - length)
            c = json.loads(f.read(length))
            if not isinstance(c, dict) or c.get("version") != VERSION:
                notice(f"the image cache {path} was written by another version of cifarlib; rebuilding it.")
                return None
            count = c["count"]
            if c["store_size"] != size or count * 3 * size * size != total - 24 - length:
                raise ValueError("sizes")
            cache = Cache(c["paths"], c["sizes"], c["mtimes"], c["rows"], c["reasons"],
                          mapped.map_file(f, path, count, size))
            if same_as and (os.fstat(f.fileno()).st_dev, os.fstat(f.fileno()).st_ino) != same_as:
                notice(f"the image cache {path} was rebuilt by another process meanwhile; its pictures are used.")
        if not _consistent(cache, size):
            raise ValueError("parts")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        notice(f"the image cache {path} is damaged ({type(e).__name__}: {e}); rebuilding it.")
        return None
    return cache


def _read_old(path: Path, size: int) -> Cache | None:
    """A cache in the format before the raw file (a `torch.save` file, `.pt`), or None."""
    if not path.is_file():
        return None
    try:
        c = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        n = len(c["sizes"])
        cache = Cache(c["paths"].split("\0") if n else [], c["sizes"].tolist(), c["mtimes"].tolist(),
                      c["rows"].tolist(), c["reasons"].split("\0") if n else [], c["images"])
        if c["store_size"] != size or not _consistent(cache, size):
            raise ValueError("parts")
    except Exception:  # noqa: BLE001 - a truncated or foreign file fails in many ways: decode afresh
        return None
    return cache


@dataclass
class Entry:
    """One file of a cache being built: from the old cache (`row`, or its `reason`), or decoded."""
    path: str
    size: int
    mtime: int
    row: int | None = None     # its row in the old cache; None: decode `file`
    reason: str = ""           # why it failed (an old entry)
    file: str = ""             # the file to decode


def _fill(entries: list[Entry], old: Cache, size: int, sink: Callable[[torch.Tensor], None]) -> tuple[list[str], float]:
    """Hand `sink` the usable images of `entries`, in order, a chunk at a time (copied from the
    old cache, or decoded); returns per entry why it failed, and the seconds spent decoding.
    One chunk's buffer is reused throughout: a fresh one a chunk grew the heap (glibc kept the
    freed ones), so that the peak grew with the folder."""
    reasons, per, seconds = [e.reason for e in entries], max(1, CHUNK_BYTES // (3 * size * size)), 0.0
    todo = sum(e.row is None and not e.reason for e in entries)
    whole_buf = torch.empty((min(per, len(entries)), 3, size, size), dtype=torch.uint8)
    with progress.bar(total=todo, unit="img", desc=f"decoding at {size} px", **({} if todo else {"disable": True})) as bar:
        for start in range(0, len(entries), per):
            chunk = entries[start:start + per]
            buf = whole_buf[:len(chunk)]
            copied = [i for i, e in enumerate(chunk) if e.row is not None]
            if copied:  # read from the old file, in its order (not a page fault every 4 kB)
                got = np.empty((len(copied), 3, size, size), dtype=np.uint8)
                rows = np.array([chunk[i].row for i in copied], dtype=np.int64)
                buf[copied] = torch.from_numpy(got) if mapped.gather(old.images, rows, got) else old.images[rows]
            new = [i for i, e in enumerate(chunk) if e.row is None and not e.reason]
            if new:
                t0 = time.perf_counter()
                whole = len(new) == len(chunk)  # a first build: decoded straight into the chunk
                images, why = decode([chunk[i].file for i in new], size, out=buf if whole else None, bar=bar)
                seconds += time.perf_counter() - t0
                if not whole:
                    buf[new] = images
                for i, w in zip(new, why):
                    reasons[start + i] = w
            keep = [i for i in range(len(chunk)) if not reasons[start + i]]
            sink(buf if len(keep) == len(chunk) else buf[keep])
    return reasons, seconds


def _cache_of(entries: list[Entry], reasons: list[str], images: torch.Tensor) -> Cache:
    rows, n = [], 0
    for why in reasons:
        rows.append(-1 if why else n)
        n += not why
    return Cache([e.path for e in entries], [e.size for e in entries], [e.mtime for e in entries], rows, reasons, images)


def _write(path: Path, entries: list[Entry], old: Cache, size: int) -> tuple[Cache, float]:
    """Build the cache file at `path` in one streaming pass, and map it."""
    box: dict = {}

    def stream(f) -> None:
        count = [0]

        def sink(t: torch.Tensor) -> None:
            f.write(memoryview(t.contiguous().numpy()).cast("B"))
            count[0] += len(t)
        reasons, box["seconds"] = _fill(entries, old, size, sink)
        box["cache"] = c = _cache_of(entries, reasons, torch.zeros(0))
        trailer = json.dumps({"version": VERSION, "store_size": size, "count": count[0], "paths": c.paths,
                              "sizes": c.sizes, "mtimes": c.mtimes, "rows": c.rows, "reasons": c.reasons}).encode()
        f.write(trailer + len(trailer).to_bytes(8, "little") + MAGIC)
        st = os.fstat(f.fileno())
        box["file"] = (st.st_dev, st.st_ino)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, stream, full_disk_fix=None)
    c = box["cache"]
    failed = "".join(f"{p}\t{why}\n" for p, why in zip(c.paths, c.reasons) if why)
    listed = path.with_suffix(".skipped.txt")
    try:
        write_atomically(listed, failed.encode(), full_disk_fix=None) if failed else listed.unlink(missing_ok=True)
    except OSError as e:  # the cache itself is written: a missing list costs a notice
        notice(f"could not write the list of skipped files {listed} ({e.strerror or e}).")
    written = _read(path, size, same_as=box["file"])  # mapped from one open file, whoever wrote it last
    if written is None:
        raise UserError(f"the image cache {path} could not be read back after it was written; run again.")
    return written, box["seconds"]


def _in_memory(entries: list[Entry], old: Cache, size: int) -> tuple[Cache, float]:
    """The same images as `_write`, in memory, for a cache that cannot be written."""
    images = torch.empty((sum(not e.reason for e in entries), 3, size, size), dtype=torch.uint8)
    count = [0]

    def sink(t: torch.Tensor) -> None:
        images[count[0]:count[0] + len(t)] = t
        count[0] += len(t)
    reasons, seconds = _fill(entries, old, size, sink)
    return _cache_of(entries, reasons, images[:count[0]]), seconds


def disk_needed(n: int, size: int) -> int:
    """Bytes a cache of `n` images at `size` px takes (the trailer is small beside them)."""
    return n * 3 * size * size + (1 << 20)


def _room(path: Path, need: int) -> int | None:
    """The bytes free where `path` goes, if fewer than `need`; None when there is room (or the
    folder cannot be made, which the write then reports)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return None
    return free if free < need else None


def load(root: Path, paths: list[str], sizes: list[int], mtimes: list[int], picked: list[int],
         store_size: int, cache_dir: Path, may_write: bool = True,
         contiguous: bool = False) -> tuple[torch.Tensor, list[str]]:
    """The images (M, 3, S, S) of the listed files `picked` that are usable, in the order of
    `picked` (indices into `paths`, which with `sizes` and `mtimes` list every file of the dataset
    at `root`), and per picked file why it is not ("" when it is; M counts those).

    The images are a memory-mapped view of the cache when the picked files lie there in order;
    else, with `contiguous`, the cache is laid out again so that they do, and without it they
    are gathered into memory. `contiguous=True` (pictures that stay on disk) also refuses a cache
    that cannot be written, where `False` decodes into memory with a notice.
    """
    path = cache_file(root, store_size, cache_dir)
    old, legacy = _read(path, store_size), False
    if old is None and path.with_suffix(".pt").is_file():
        legacy = True
        old = _read_old(path.with_suffix(".pt"), store_size)
        notice(f"the image cache {path.with_suffix('.pt')} is in the format before {path.suffix} files; rebuilding "
               "it once" + (" from its own images (no decoding)." if old else " (it is unreadable)."))
    old = old or _empty(store_size)
    where = {p: j for j, p in enumerate(old.paths)}

    def cached(i: int) -> int | None:  # the old entry of listed file i, if it is still that file
        j = where.get(paths[i])
        return j if j is not None and old.sizes[j] == sizes[i] and old.mtimes[j] == mtimes[i] else None

    def entry(i: int) -> Entry:
        j = cached(i)
        if j is None:
            return Entry(paths[i], sizes[i], mtimes[i], file=os.path.join(root, paths[i]))
        return Entry(paths[i], sizes[i], mtimes[i], old.rows[j] if old.rows[j] >= 0 else None, old.reasons[j])

    keep = [i for i in range(len(paths)) if cached(i) is not None]
    rows = [old.rows[cached(i)] if cached(i) is not None else None for i in picked]
    usable = [r for r in rows if r is not None and r >= 0]
    in_order = (None not in rows and (not usable or usable == list(range(usable[0], usable[0] + len(usable)))))
    cache = old
    if not legacy and not in_order and not contiguous and None not in rows and len(keep) == len(old.paths):
        pass  # every picked file is cached, out of order: gathered into memory below, no rewrite
    elif legacy or not in_order or len(keep) != len(old.paths):
        others = sorted(set(keep) - set(picked))
        entries = [entry(i) for i in picked] + [entry(i) for i in others]
        todo = sum(e.row is None and not e.reason for e in entries)
        need = disk_needed(sum(not e.reason for e in entries), store_size)
        free = _room(path, need) if may_write else None
        if free is not None and contiguous:
            raise UserError(f"the image cache of {len(entries):,} pictures at store_size={store_size} needs "
                            f"{need / 1e9:.2f} GB on disk at {path.parent}, which has {free / 1e9:.2f} GB free. "
                            "Free some space, choose another cache_dir, lower store_size, or pick fewer images with "
                            "max_train_samples.")
        if contiguous and not may_write:
            raise UserError(f"the image cache {path} is not up to date: the main process (rank 0) did not provide it, "
                            "and the pictures are too big to decode into memory here.")
        cache, seconds = None, 0.0
        if may_write and free is None:
            try:
                cache, seconds = _write(path, entries, old, store_size)
                path.with_suffix(".pt").unlink(missing_ok=True)
            except Exception as e:  # a full disk, a read-only cache_dir: the images may be held in memory
                cause = os_error(e)
                if cause is None:
                    raise
                if contiguous:
                    raise UserError(f"could not write the image cache {path} ({cause.strerror or cause}), which the "
                                    "pictures are read from when they stay on disk (data_on). Free some space, or "
                                    "choose another cache_dir.") from None
                notice(f"could not write the image cache {path} ({cause.strerror or cause}); the images are used "
                       "all the same, and will be decoded again next time. Free some space, or choose another cache_dir.")
        elif may_write:
            notice(f"the image cache needs {need / 1e9:.2f} GB at {path.parent}, which has {free / 1e9:.2f} GB free: the "
                   "images are decoded into memory and will be decoded again next time.")
        if cache is None:  # held in memory: only the picked files
            entries = entries[:len(picked)]
            cache, seconds = _in_memory(entries, old, store_size)
        if todo:
            notice(f"decoded {todo:,} files in {seconds:.1f} s: {todo / max(seconds, 1e-9):,.0f} images/s on "
                   f"{cores()} threads")
    at = {p: k for k, p in enumerate(cache.paths)}
    entries_at = [at[paths[i]] for i in picked]
    why = [cache.reasons[k] for k in entries_at]
    rows_at = [cache.rows[k] for k in entries_at if cache.rows[k] >= 0]
    first = rows_at[0] if rows_at else 0
    if rows_at == list(range(first, first + len(rows_at))):
        out = cache.images[first:first + len(rows_at)]  # a view: nothing read yet
    else:  # one gather into memory (allowed: not `contiguous`)
        out = cache.images[torch.tensor(rows_at, dtype=torch.int64)]
    bad = [paths[i] for i, w in zip(picked, why) if w]
    if bad:
        listed = path.with_suffix(".skipped.txt")
        notice(f"{len(bad):,} of the {len(picked):,} picked files are not usable images and are skipped: "
               + ", ".join(bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
               + (f" (the full list, with reasons: {listed})" if listed.is_file() else ""))
    return out, why
