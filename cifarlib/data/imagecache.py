"""Image files decoded once, at `store_size`, into one uint8 tensor, and cached under `cache_dir`.

`load(root, paths, sizes, mtimes, picked, store_size, cache_dir)` gives the picked files' images
(N, 3, S, S) and, per file, why it could not be used ("" when it could). Each file goes through
`cifarlib.data.preprocess.cifar_like` at `store_size` (EXIF rotation, any mode to 8-bit RGB,
transparency on white, shorter side resized, centre cropped square): the rule for a user's
picture, so a photo is later shown to the model as its training images were.

The cache, `cache_dir/image-cache/<folder>-<hash>-<S>px.pt`, holds per file its path (relative
to the dataset's folder), size, modification time, and its image or why it failed. A picked file
is decoded only when the cache has no entry of that path, size and time; entries of files gone
or changed are dropped. It is written through a temporary file and a rename, read with
`weights_only=True` and memory-mapped (a cached load reads only the rows it needs); a cache from
another version, or a damaged one, is rebuilt with a notice. The failed files are listed beside
it, in `<cache>.skipped.txt`.

Decoding runs in a pool of one thread per core: PIL decodes and resizes outside the GIL, and
threads need no process fork (unsafe in a notebook kernel once torch has started its threads).

Memory: the files are decoded straight into the one tensor that is written to the cache and, on a
first load, handed out (failed files' rows are moved over in place), so a first load holds one
copy of the images at its peak; a load from the cache gathers the rows it needs once. (It was
three copies: decoded, merged, gathered.)
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import progress
from ..core.errors import UserError, notice, os_error
from ..core.files import write_atomically
from .preprocess import cifar_like

VERSION = 1
SHOWN = 5  # failed files named in the notice; all of them are in the .skipped.txt list


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def cache_file(root: Path, store_size: int, cache_dir: Path) -> Path:
    return cache_dir / "image-cache" / f"{root.name}-{digest(str(root))}-{store_size}px.pt"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decode(files: list[str], size: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str]]:
    """Images (N, 3, size, size) of `files`, written into `out` when given (so that a caller's
    tensor needs no second copy), and, per file, why it failed ("" if it did not; its row is then
    left as it was)."""
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

    start = time.perf_counter()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
    try:
        with progress.bar(total=n, unit="img", desc=f"decoding at {size} px") as bar:
            for done in pool.map(work, range(0, n, step)):
                bar.update(done)
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C, don't decode the rest first
    seconds = max(time.perf_counter() - start, 1e-9)
    notice(f"decoded {n:,} files in {seconds:.1f} s: {n / seconds:,.0f} images/s on {threads} threads")
    return images, reasons


@dataclass
class Cache:
    paths: list[str]
    sizes: list[int]
    mtimes: list[int]
    rows: list[int]            # row in `images`, or -1 for a file that failed
    reasons: list[str]         # why it failed, or ""
    images: torch.Tensor       # (usable files, 3, S, S) uint8


def _empty(size: int) -> Cache:
    return Cache([], [], [], [], [], torch.zeros((0, 3, size, size), dtype=torch.uint8))


def _read(path: Path, size: int) -> Cache | None:
    """The cache at `path`, or None (with a notice) when it is from another version or damaged."""
    if not path.is_file():
        return None
    try:
        c = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        notice(f"the image cache {path} is damaged ({type(e).__name__}); rebuilding it.")
        return None
    if not isinstance(c, dict) or c.get("version") != VERSION:
        notice(f"the image cache {path} was written by another version of cifarlib; rebuilding it.")
        return None
    try:
        n = len(c["sizes"])
        cache = Cache(c["paths"].split("\0") if n else [], c["sizes"].tolist(), c["mtimes"].tolist(),
                      c["rows"].tolist(), c["reasons"].split("\0") if n else [], c["images"])
        rows = torch.tensor(cache.rows, dtype=torch.int64)
        consistent = (c["store_size"] == size and cache.images.dtype == torch.uint8
                      and tuple(cache.images.shape[1:]) == (3, size, size)
                      and len(cache.paths) == len(cache.mtimes) == len(cache.reasons) == len(rows) == n
                      and torch.equal(rows[rows >= 0].sort().values, torch.arange(len(cache.images)))
                      and all((r < 0) == bool(why) for r, why in zip(cache.rows, cache.reasons)))
    except (KeyError, AttributeError, TypeError, ValueError, RuntimeError):
        consistent = False
    if not consistent:
        notice(f"the image cache {path} is damaged (its parts do not agree); rebuilding it.")
        return None
    return cache


def _write(path: Path, c: Cache) -> None:
    """Write the cache and its list of failed files; a failure to write costs only a notice."""
    failed = "".join(f"{p}\t{why}\n" for p, why in zip(c.paths, c.reasons) if why)
    record = {"version": VERSION, "store_size": c.images.shape[-1], "paths": "\0".join(c.paths),
              "sizes": torch.tensor(c.sizes, dtype=torch.int64), "mtimes": torch.tensor(c.mtimes, dtype=torch.int64),
              "rows": torch.tensor(c.rows, dtype=torch.int64), "reasons": "\0".join(c.reasons), "images": c.images}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: torch.save(record, f), full_disk_fix=None)  # streamed: no second copy
        if failed:
            write_atomically(path.with_suffix(".skipped.txt"), failed.encode(), full_disk_fix=None)
        else:
            path.with_suffix(".skipped.txt").unlink(missing_ok=True)
    except Exception as e:  # a full disk, a read-only cache_dir: the images are here all the same
        cause = os_error(e)  # torch.save raises a RuntimeError chained on the OSError
        if cause is None:
            raise
        notice(f"could not write the image cache {path} ({cause.strerror or cause}); the images are used all "
               "the same, and will be decoded again next time. Free some space, or choose another cache_dir.")


def _compact(images: torch.Tensor, reasons: list[str]) -> torch.Tensor:
    """The rows of `images` whose file decoded (`reasons[i]` empty), in order: moved down in place
    over the failed ones, so no second copy is made. The result is a view of `images`; the rows
    left over are zeroed (the cache file holds them too)."""
    k = 0
    for i, why in enumerate(reasons):
        if not why:
            if k != i:
                images[k] = images[i]
            k += 1
    images[k:].zero_()
    return images[:k]


def _rebuild(old: Cache, keep: list[int], root: Path, paths: list[str], sizes: list[int], mtimes: list[int],
             store_size: int) -> Cache:
    """The entries `keep` of `old`, then the files `paths` (relative to `root`) decoded. One
    tensor is allocated for the whole cache: the kept images are copied into its head and the
    new files decoded straight into its tail."""
    kept_rows = [old.rows[j] for j in keep if old.rows[j] >= 0]
    images = torch.empty((len(kept_rows) + len(paths), 3, store_size, store_size), dtype=torch.uint8)
    head, tail = images[:len(kept_rows)], images[len(kept_rows):]
    if kept_rows:
        torch.index_select(old.images, 0, torch.tensor(kept_rows, dtype=torch.int64), out=head)
    reasons = decode([os.path.join(root, p) for p in paths], store_size, out=tail)[1] if paths else []
    _compact(tail, reasons)
    reasons_all = [old.reasons[j] for j in keep] + reasons
    rows, n = [], 0
    for why in reasons_all:
        rows.append(-1 if why else n)
        n += not why
    return Cache([old.paths[j] for j in keep] + paths, [old.sizes[j] for j in keep] + sizes,
                 [old.mtimes[j] for j in keep] + mtimes, rows, reasons_all, images[:n])


def load(root: Path, paths: list[str], sizes: list[int], mtimes: list[int], picked: list[int],
         store_size: int, cache_dir: Path, may_write: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The images (M, 3, S, S) of the listed files `picked` that are usable, in the order of
    `picked` (indices into `paths`, which with `sizes` and `mtimes` list every file of the dataset
    at `root`), and per picked file why it is not ("" when it is; M counts those).

    On a first load (no entry of the cache is kept) the files are decoded into one tensor, which
    is both what is cached and what is returned: memory holds one copy of the images, not three.
    Otherwise the images are gathered from the cache, once.
    """
    path = cache_file(root, store_size, cache_dir)
    old = _read(path, store_size) or _empty(store_size)
    where = {p: j for j, p in enumerate(old.paths)}

    def cached(i: int) -> int | None:  # the old entry of listed file i, if it is still that file
        j = where.get(paths[i])
        return j if j is not None and old.sizes[j] == sizes[i] and old.mtimes[j] == mtimes[i] else None

    todo = [i for i in picked if cached(i) is None]
    keep = [j for j in map(cached, range(len(paths))) if j is not None]
    cache = old
    if todo or len(keep) != len(old.paths):
        cache = _rebuild(old, keep, root, [paths[i] for i in todo], [sizes[i] for i in todo],
                         [mtimes[i] for i in todo], store_size)
        if may_write:
            _write(path, cache)
    at = {p: k for k, p in enumerate(cache.paths)}
    entries = [at[paths[i]] for i in picked]
    why = [cache.reasons[k] for k in entries]
    rows = [cache.rows[k] for k in entries if cache.rows[k] >= 0]
    if not keep and todo == picked:  # a first load: the cache holds the picked files, in order
        out = cache.images
    else:  # one gather; the cache (memory-mapped when it was read) is let go
        out = cache.images.index_select(0, torch.tensor(rows, dtype=torch.int64))
    bad = [paths[i] for i, w in zip(picked, why) if w]
    if bad:
        listed = path.with_suffix(".skipped.txt")
        notice(f"{len(bad):,} of the {len(picked):,} picked files are not usable images and are skipped: "
               + ", ".join(bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
               + (f" (the full list, with reasons: {listed})" if listed.is_file() else ""))
    return out, why
