"""Pictures read from a memory-mapped image cache file (`cifarlib.data.imagecache` writes it):
mapped read-only, gathered into batches with plain reads, asked of the disk ahead, or read
into memory whole.

A tensor of pictures is a view of a mapping made by `map_file`; `is_mapped` tells such a view
from pictures in memory, and every reader here falls back to (or leaves the caller) a plain
copy for those. The readers use the descriptor the mapping keeps open, not the file's name.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core import runtime
from ..core.errors import UserError

CHUNK_BYTES = 16 << 20  # `read`: bytes read a call
GAP_BYTES = 1 << 20     # `prefetch`: pictures closer than this in the file are read in one request

# The mapped caches, by the address their images start at: the map (while it lives) and its file.
# Each holds the file open: a cache rebuilt under the same name by another run (os.replace) leaves
# this one reading the pictures it mapped, not the new file's.
_MAPS: dict[int, tuple[weakref.ref, Path, int]] = {}


def _file_of(images: torch.Tensor) -> tuple[Path, int] | None:
    """The cache file that `images` is a view of, and a descriptor open on it; None in memory."""
    mapped = _MAPS.get(images.untyped_storage().data_ptr()) if runtime.is_host(images.device) else None
    return None if mapped is None or mapped[0]() is None else mapped[1:]


def map_file(f, path: Path, count: int, size: int) -> torch.Tensor:
    """The first `count` images of the open file `f` (of `path`), memory-mapped read-only, with
    a descriptor of that same file kept for the readers: mapping by the name could meet another
    file renamed there since `f` was read (another run rebuilding the cache). Read-only because Linux
    counts a writable private (copy-on-write) mapping against its memory commit limit, so one of
    a cache bigger than memory was refused (ENOMEM, found by bench_stream.py loader with a 36 GB
    cache on a 24 GB machine); nothing writes into the pictures (batches are copies)."""
    if count == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    try:
        mm = np.memmap(f, dtype=np.uint8, mode="r", shape=(count, 3, size, size))
    except OSError as e:
        raise UserError(f"could not map the image cache {path} ({e.strerror or e}).") from None
    with warnings.catch_warnings():  # torch warns of a read-only array: it is meant to be
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(mm)  # keeps `mm` alive as long as any view of it
    fd = os.dup(f.fileno())
    weakref.finalize(mm, os.close, fd)
    _MAPS[t.untyped_storage().data_ptr()] = (weakref.ref(mm), path, fd)
    return t


def is_mapped(images: torch.Tensor) -> bool:
    """Whether `images` is a view of a cache file's mapping (else it is in memory)."""
    return _file_of(images) is not None


def prefetch(images: torch.Tensor, rows: torch.Tensor) -> None:
    """Ask the kernel to read pictures `rows` (sorted) of `images`, a view of a cache file, into
    the page cache now, in as few large reads as their places allow (ranges closer than
    `GAP_BYTES` merged), so that gathering them later finds them there: a page fault reads only
    a little at a time. Nothing for pictures in memory, or where the system has no
    `posix_fadvise`."""
    mapped = _file_of(images) if len(rows) else None
    if mapped is None or not hasattr(os, "posix_fadvise"):
        return
    size, starts = images[0].nbytes, (images.storage_offset() + rows * images.stride(0)).tolist()
    ranges = [[starts[0], starts[0] + size]]
    for s in starts[1:]:
        if s - ranges[-1][1] < GAP_BYTES:
            ranges[-1][1] = s + size
        else:
            ranges.append([s, s + size])
    for start, end in ranges:
        os.posix_fadvise(mapped[1], start, end - start, os.POSIX_FADV_WILLNEED)


def gather(images: torch.Tensor, index: np.ndarray, out: np.ndarray) -> bool:
    """Pictures `index` of `images` into `out` (a C-contiguous uint8 array of `len(index)` rows),
    read from the cache file that `images` maps with `os.preadv`: the pictures in the file's
    order, each run of neighbours in one call, straight into their places in `out`. Plain reads
    because a gather through the mapping takes a page fault every 4 kB, which held the block
    order to a fifth of the disk's sequential speed (bench_stream.py loader). False, with
    nothing done, for pictures in memory (or without `preadv`): gather those otherwise."""
    mapped = _file_of(images) if len(index) else None
    if mapped is None or not hasattr(os, "preadv"):
        return False
    size, stride, base = images[0].nbytes, images.stride(0), images.storage_offset()
    turn = np.argsort(index, kind="stable")
    rows, flat = index[turn], out.reshape(len(out), -1)
    i = 0
    while i < len(rows):
        j = i + 1
        while (j < len(rows) and j - i < 512 and size * (j - i) < 1 << 28 and stride == size
               and rows[j] == rows[j - 1] + 1):
            j += 1
        at = base + int(rows[i]) * stride
        if os.preadv(mapped[1], [flat[turn[k]] for k in range(i, j)], at) != size * (j - i):
            for k in range(i, j):  # a short read (a network file system): each picture in full
                _read_fully(mapped, flat[turn[k]], at + (k - i) * stride)
        i = j
    return True


def _read_fully(mapped: tuple[Path, int], buf: np.ndarray, at: int) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = os.preadv(mapped[1], [view[done:]], at + done)
        if not got:
            raise UserError(f"the image cache {mapped[0]} was cut short while it was read; run again to rebuild it.")
        done += got


def read(images: torch.Tensor, alloc: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> torch.Tensor:
    """`images` copied into memory (into `alloc(shape)`, a uint8 tensor; plain memory by default).
    A contiguous view of a cache file is read from the file with plain reads, so that its pages
    are not counted a second time in this process's memory, as a copy through the mapping would
    be (the page cache holds them, and gives them back); anything else is copied."""
    out = alloc(tuple(images.shape)) if alloc else torch.empty(images.shape, dtype=torch.uint8)
    mapped = _file_of(images)
    if mapped is None or not images.is_contiguous() or not hasattr(os, "preadv"):
        return out.copy_(images)
    flat, start = out.numpy().reshape(-1), images.storage_offset()
    for done in range(0, len(flat), CHUNK_BYTES):
        _read_fully(mapped, flat[done:done + CHUNK_BYTES], start + done)
    return out
