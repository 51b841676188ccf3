"""Datasets as uint8 tensors (on the device, in the host's memory or mapped from disk): `Split` and `CifarData`, and how splits are cut
(stratified, seeded) and capped.

A module of its own, below both `cifarlib.data.datasets` (CIFAR, and the entry point for every dataset)
and `cifarlib.data.folders` (your pictures), so that neither imports the other's way up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..core import runtime
from . import mapped

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Images (N, 3, S, S) uint8 (S = 32 for CIFAR), fine labels (N,) int64 and, for CIFAR-100,
    coarse labels."""
    images: torch.Tensor
    labels: torch.Tensor
    coarse_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return Split(pick(self.images), pick(self.labels), pick(self.coarse_labels))

    def to(self, device: str | torch.device) -> Split:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Split(move(self.images), move(self.labels), move(self.coarse_labels))

    def every(self, start: int, stop: int, step: int) -> Split:
        """Samples `start`, `start + step`, ... before `stop`, as views: a shard of pictures that
        stay on disk stays there."""
        pick = lambda t: None if t is None else t[start:stop:step]  # noqa: E731
        return Split(pick(self.images), pick(self.labels), pick(self.coarse_labels))

    def place(self, data_on: str, device: torch.device) -> Split:
        """The labels on `device`; the images on it too (`data_on="device"`), in the host's
        memory (`"host"`), or left where they are (`"disk"`: the memory-mapped image cache, or
        memory where the cache could not be written). Images are read from a cache file with
        plain reads (`mapped.read`), never twice in memory at once. Nothing is pinned here: a
        whole split in pinned memory would be rounded up to a power of two and kept by torch's
        caching host allocator; batches are gathered into pinned buffers instead."""
        images = mapped.read(self.images) if mapped.is_mapped(self.images) and data_on != "disk" else self.images
        if data_on == "device":
            images = images.to(device)
        elif data_on == "host":
            images = images.to("cpu")
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Split(images, move(self.labels), move(self.coarse_labels))


@dataclass(frozen=True)
class CifarData:
    name: str                      # "cifar100", "cifar10", "synthetic" or "folder"
    folder: Path                   # the extracted folder the files were read from
    classes: list[str]
    superclasses: list[str] | None  # None for CIFAR-10
    train: Split
    val: Split
    test: Split
    fine_to_coarse: torch.Tensor | None = field(default=None, repr=False)  # (num_classes,)
    skipped: tuple[str, ...] = field(default=(), repr=False)  # image folders: "path: reason"
    data_on: str = "device"        # where the pictures live: "device", "host" or "disk" (`cifarlib.core.placement`)
    data_why: str = ""             # why, in words

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: str | torch.device) -> CifarData:
        f2c = None if self.fine_to_coarse is None else self.fine_to_coarse.to(device)
        return replace(self, train=self.train.to(device), val=self.val.to(device),
                       test=self.test.to(device), fine_to_coarse=f2c)

    @property
    def nbytes(self) -> int:
        return sum(s.images.nbytes for s in (self.train, self.val, self.test))

    def place(self, data_on: str, device: torch.device, why: str = "") -> CifarData:
        """Every split placed as `Split.place` says, one at a time."""
        f2c = None if self.fine_to_coarse is None else self.fine_to_coarse.to(device)
        return replace(self, train=self.train.place(data_on, device), val=self.val.place(data_on, device),
                       test=self.test.place(data_on, device), fine_to_coarse=f2c, data_on=data_on, data_why=why)


def _quotas(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Split `total` over classes in proportion to `counts`, largest remainders first."""
    exact = counts.double() * total / counts.sum()
    q = exact.floor().long()
    order = torch.argsort(-(exact - q), stable=True)
    q[order[: total - int(q.sum())]] += 1
    return q


def stratified_pick(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of `n` samples with class proportions kept (exact up to rounding).

    With fewer samples than classes present, a seeded random pick instead.
    """
    labels = labels.cpu()
    if n >= len(labels):
        return torch.arange(len(labels))
    counts = torch.bincount(labels)
    perm = torch.randperm(len(labels), generator=generator)
    if n < int((counts > 0).sum()):
        return perm[:n].sort().values
    by_class = perm[torch.argsort(labels[perm], stable=True)]  # random order within each class
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(labels)) - starts[labels[by_class]]
    keep = rank_in_class < _quotas(counts, n)[labels[by_class]]
    return by_class[keep].sort().values


def split_train_val(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded and disjoint: the same arguments always give the same two splits."""
    val = stratified_pick(split.labels, round(val_fraction * len(split)),
                          torch.Generator().manual_seed(seed))
    is_val = torch.zeros(len(split), dtype=torch.bool)
    is_val[val] = True
    return split.subset(torch.nonzero(~is_val).flatten()), split.subset(val)


def _cap(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split):
        return split
    return split.subset(stratified_pick(split.labels, n, torch.Generator().manual_seed(seed)))


def pick_splits(full_train: Split, val: Split | None, test: Split, val_fraction: float, seed: int,
                max_train_samples: int | None, max_eval_samples: int | None) -> tuple[Split, Split, Split]:
    """Training, validation and test splits: validation cut from `full_train` unless given, then
    each split capped. Image folders pick their files with this too, before decoding them."""
    train = full_train
    if val is None:
        train, val = split_train_val(full_train, val_fraction, seed)
    return (_cap(train, max_train_samples, seed + 1), _cap(val, max_eval_samples, seed + 2),
            _cap(test, max_eval_samples, seed + 3))
