"""CIFAR-100 / CIFAR-10 (or a folder of your pictures) as uint8 tensors, split and batched
without workers: on the training device where they fit, else in the host's memory or on disk.

    data = load_cifar("cifar100", "data")          # or "cifar10", "synthetic", "folder"
    data.train.images   # (45000, 3, 32, 32) uint8 on the training device
    for images, labels in Batches(data.train, 256, shuffle=True, drop_last=True).epoch(0): ...

The validation split is cut from the official training set before any augmentation, stratified
and seeded; it is evaluated with the same preprocessing as the test set. `python -m cifarlib.data`
fetches and checks the data ahead of time. Image folders are read by `cifarlib.data.folders`.
"""

from __future__ import annotations

import pickle
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core import placement, runtime
from ..core.errors import UserError, notice
from . import folders, mapped, sources, synthetic
from .splits import SPLITS, CifarData, Split, pick_splits, split_train_val, stratified_pick  # noqa: F401

DATASETS = ("cifar100", "cifar10", "synthetic", "folder")
class _NumpyOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    The CIFAR files are pickles, and a pickle can run arbitrary code when loaded; refusing every
    other global means a doctored data file fails with a clear error instead.
    """
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, object]:
    """Read one CIFAR pickle; keys and names come back as str whether stored as bytes or str."""
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnly(f, encoding="latin1").load()
    except Exception as e:  # a damaged pickle can fail in many ways; none of them is a bug here
        raise UserError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}).") from None
    text = lambda v: v.decode("latin1") if isinstance(v, bytes) else v  # noqa: E731
    out = {text(k): v for k, v in raw.items()} if isinstance(raw, dict) else None
    if out is None:
        raise UserError(f"{path} is not a CIFAR pickle (it holds a {type(raw).__name__}, not a dict).")
    return {k: [text(x) for x in v] if k.endswith("names") else v for k, v in out.items()}


def _read_split(folder: Path, files: tuple[str, ...], cifar100: bool) -> Split:
    images, fine, coarse = [], [], []
    for name in files:
        d = _read_pickle(folder / name)
        try:
            images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            fine += list(d["fine_labels" if cifar100 else "labels"])
            coarse += list(d["coarse_labels"]) if cifar100 else []
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{folder / name} is not in the CIFAR layout ({type(e).__name__}: {e}).") from None
    x = torch.from_numpy(np.concatenate(images))
    y = torch.tensor(fine, dtype=torch.int64)
    if len(x) != len(y):
        raise UserError(f"{folder}: {len(x)} images but {len(y)} labels in {', '.join(files)}.")
    return Split(x, y, torch.tensor(coarse, dtype=torch.int64) if cifar100 else None)


def _check_args(dataset: str, val_fraction: float, caps: dict[str, int | None]) -> None:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be at least 0 and below 1, not {val_fraction!r}.")
    for key, n in caps.items():
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise UserError(f"{key} must be a positive whole number or None, not {n!r}.")


def resolve_dataset(dataset: str, data_dir: str | Path = "data") -> str:
    """`"auto"`: real CIFAR-100 when its folder or tarball is in `data_dir`, else `"synthetic"`,
    with a banner on stderr that says so and how to get the real data: notebooks 01 and 02 would
    otherwise show made-up pictures under CIFAR-100's class names, quietly."""
    if dataset != "auto":
        return dataset
    src, root = sources.SOURCES["cifar100"], runtime.resolve_path(data_dir)
    if (root / src.folder).is_dir() or (root / src.tarball).is_file():
        return "cifar100"
    where = "" if root == runtime.resolve_path("data") else f" --data-dir {root}"
    rule = "=" * 88
    notice(f"{rule}\nNOT REAL PHOTOS. CIFAR-100 is not in {root},\nso what follows is the synthetic dataset: "
           "made-up shapes and stripes under CIFAR-100's\nclass names. Get CIFAR-100 (about 160 MB), then run this "
           f"again:\n    .venv/bin/python -m cifarlib.data --dataset cifar100{where}\n{rule}")
    return "synthetic"


def load_cifar(dataset: str = "cifar100", data_dir: str | Path = "data", *,
               val_fraction: float = 0.1, seed: int = 0, max_train_samples: int | None = None,
               max_eval_samples: int | None = None, verify_checksums: bool = True,
               download: bool = True, device: str | torch.device = "auto", store_size: int = 32,
               cache_dir: str | Path = "data", splits: tuple[str, ...] = SPLITS, data_on: str = "auto") -> CifarData:
    """Load a dataset, split off validation, cap the splits, and place them for `device`: the
    pictures where `data_on` says (`placement.place_data`: the device, the host's memory, or, for
    a folder, the memory-mapped image cache on disk), the labels on the device.

    `data_dir` follows the path rule of `cifarlib.core.runtime`. Sources are tried in order: the
    extracted folder, the official tarball, a download (see `cifarlib.data.sources`). "synthetic"
    writes a small CIFAR-100-layout dataset to `data_dir/synthetic/` once and reads it back.
    `max_train_samples` caps the training split, `max_eval_samples` the validation and test
    splits, each stratified where the count allows. Under torchrun only rank 0 writes files.

    "folder" reads your pictures from `data_dir` (a folder, or an archive of one, extracted
    into `cache_dir`), decoded at `store_size` and cached in `cache_dir`; only the `splits`
    named are decoded, the others come back empty. See `cifarlib.data.folders`.
    """
    _check_args(dataset, val_fraction, {"max_train_samples": max_train_samples,
                                        "max_eval_samples": max_eval_samples})
    if dataset == "folder":
        return folders.load_folder(data_dir, cache_dir=cache_dir, store_size=store_size, val_fraction=val_fraction,
                                   seed=seed, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                                   splits=splits, device=device, data_on=data_on)
    if store_size != 32:
        raise UserError(f"store_size={store_size!r} applies to dataset='folder'; {dataset} images are "
                        "32 px. Leave store_size at 32 (image_size sets the model's input size).")
    root = runtime.resolve_path(data_dir)
    src = sources.SOURCES["cifar10" if dataset == "cifar10" else "cifar100"]
    with runtime.main_process_first():
        if dataset == "synthetic":
            folder = root / "synthetic" / src.folder
            if not folder.is_dir() and runtime.is_main_process():
                synthetic.write_cifar100(folder)
            sources.locate("cifar100", folder.parent, verify_checksums=False, may_write=False)
        else:
            folder = sources.locate(dataset, root, verify_checksums, download,
                                    may_write=runtime.is_main_process())

    cifar100 = dataset != "cifar10"
    meta = _read_pickle(folder / src.meta_file)
    try:
        classes = list(meta["fine_label_names" if cifar100 else "label_names"])
        superclasses = list(meta["coarse_label_names"]) if cifar100 else None
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder / src.meta_file} lacks the class names ({type(e).__name__}: {e}).") from None
    full_train = _read_split(folder, src.train_files, cifar100)
    test = _read_split(folder, src.test_files, cifar100)
    for split in (full_train, test):
        if len(split) and not (0 <= int(split.labels.min()) and int(split.labels.max()) < len(classes)):
            raise UserError(f"{folder} has labels outside 0..{len(classes) - 1}, the range of its class names.")
    fine_to_coarse = None
    if cifar100:
        fine_to_coarse = torch.zeros(len(classes), dtype=torch.int64)
        fine_to_coarse[full_train.labels] = full_train.coarse_labels

    train, val, test = pick_splits(full_train, None, test, val_fraction, seed, max_train_samples, max_eval_samples)
    data = CifarData(dataset, folder, classes, superclasses, train, val, test, fine_to_coarse)
    dev = runtime.pick_device(device)
    where, why = placement.place_data(data_on, data.nbytes, dev, cached=False)
    return data.place(where, dev, why)


BLOCK_BYTES = 4 << 20  # "block" order: pictures that lie together in the cache, read as one
WINDOW_BLOCKS = 16     # "block" order: blocks whose pictures are shuffled together


def block_order(n: int, block: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """A quasi-random order of `n` pictures, FFCV's for files bigger than memory: the blocks of
    `block` pictures that lie together (0..block-1, block..2*block-1, ...) in a shuffled order,
    then the pictures within each run of `window` blocks shuffled together.

    What it does to the batches: every picture comes once an epoch, as in a full shuffle, and
    the blocks' order is new each epoch; but a batch draws its pictures from `window` blocks (a
    full shuffle draws them from the whole split), and pictures of one block always share a
    window, so pictures stored near each other share batches far more often than chance. Image
    folders therefore cache their training files in a seeded random order
    (`cifarlib.data.folders`): in class-folder order a window held a few classes, and the
    10-minute run on the real photos fell from 88.5% to 66.1% (benchmarks/README.md); in random
    order it reached 88.7%. A window of 64 MB is read from the disk in large runs, and stays in
    the page cache while its batches use it."""
    count = -(-n // block)
    blocks = torch.randperm(count, generator=generator)
    index = (blocks[:, None] * block + torch.arange(block)).flatten()
    window_of = (torch.arange(count)[:, None] // window).expand(count, block).flatten()  # by the block's turn
    index, window_of = index[index < n], window_of[index < n]
    keys = window_of.double() + torch.rand(len(index), generator=generator, dtype=torch.float64)
    return index[keys.argsort()]


def _gathered(images: torch.Tensor, order: torch.Tensor, b: int, picks: range, device: torch.device,
              ahead: int) -> Iterator[torch.Tensor]:
    """The pictures of batches `picks` of `order`, gathered on the host (from the host's memory, or
    a memory-mapped cache, whose next batch is asked of the disk ahead) into buffers bound for
    `device` (pinned for CUDA): `ahead` batches ahead by a background thread, or here with 0. The
    gather is numpy's, on one thread, without the GIL: torch's would start a second team of
    intra-op threads beside the training step's, and on a 2-core CPU that cost 15-25% of the
    step. The thread stops when the batches are no longer wanted."""
    pictures = images.numpy()  # a view: numpy's gather runs on this thread alone, without the GIL

    depth = max(1, ahead)  # batches asked of the disk ahead of the one gathered

    def gather(i: int) -> torch.Tensor:
        for j in range(i if i == picks.start else i + depth, min(i + depth + 1, picks.stop)):
            mapped.prefetch(images, order[j * b: (j + 1) * b].sort().values)  # read while others are gathered
        index = order[i * b: min((i + 1) * b, len(order))]
        out = runtime.host_empty((len(index), *images.shape[1:]), device)
        if not mapped.gather(images, index.numpy(), out.numpy()):  # the cache file: read, not faulted in
            np.take(pictures, index.numpy(), axis=0, out=out.numpy())
        return out

    if not ahead:
        yield from map(gather, picks)
        return
    box: queue.Queue = queue.Queue(maxsize=ahead)
    done = threading.Event()

    def hand(x) -> bool:  # False once the batches are no longer wanted
        while not done.is_set():
            try:
                box.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for i in picks:
                if not hand(gather(i)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            hand(e)

    threading.Thread(target=work, name="gather", daemon=True).start()
    try:
        for _ in picks:
            x = box.get()
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        done.set()


@dataclass
class Batches:
    """Batches of a split, indexed on its device when the pictures are there: no workers, no
    per-sample Python. Pictures that live elsewhere (the host's memory, the image cache on disk)
    are gathered on the host, `ahead` batches ahead by a background thread, and copied over
    without a host wait; the labels are always indexed on their device, which the batches go to.

    `epoch(e)` shuffles with a generator seeded by (`seed`, `e`), so any epoch can be replayed,
    for example after a resume: a full shuffle, or with `block`, `block_order` (for pictures on
    a disk bigger than memory). With `drop_last`, a split smaller than one batch still gives one
    (smaller) batch rather than none.
    """
    split: Split
    batch_size: int
    shuffle: bool = False
    drop_last: bool = False
    seed: int = 0
    block: bool = False   # with `shuffle`: the quasi-random `block_order`
    ahead: int = 0        # batches gathered ahead by a background thread (0: when asked, in this thread)

    def __len__(self) -> int:
        n, b = len(self.split), self.batch_size
        if n == 0:
            return 0
        return max(1, n // b) if self.drop_last else -(-n // b)

    def order(self, epoch: int = 0) -> torch.Tensor:
        """The epoch's sample order, on the CPU (a run interrupted mid-epoch saves it)."""
        if not self.shuffle:
            return torch.arange(len(self.split))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.block:
            per = max(1, BLOCK_BYTES // max(1, self.split.images[0].nbytes if len(self.split) else 1))
            return block_order(len(self.split), per, WINDOW_BLOCKS, g)
        return torch.randperm(len(self.split), generator=g)

    def epoch(self, epoch: int = 0, order: torch.Tensor | None = None, start: int = 0,
              end: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch `start` up to `end` (default: all), in `order` (default:
        the epoch's own)."""
        n, b = len(self.split), self.batch_size
        order = self.order(epoch) if order is None else order
        device = self.split.labels.device
        on = runtime.to_device(order, device)  # one copy, without a host wait
        picks = range(start, len(self) if end is None else min(end, len(self)))
        if self.split.images.device == device and not (self.ahead and runtime.is_host(device)):
            for i in picks:
                idx = on[i * b: min((i + 1) * b, n)]
                yield self.split.images[idx], self.split.labels[idx]
            return
        pictures = _gathered(self.split.images, order, b, picks, device, self.ahead)
        try:
            for i, x in zip(picks, pictures):
                yield runtime.to_device(x, device), self.split.labels[on[i * b: min((i + 1) * b, n)]]
        finally:
            pictures.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each `iter()` is the next epoch (0, 1, ...); `epoch(e)` replays any one."""
        self._next = getattr(self, "_next", -1) + 1
        return self.epoch(self._next)
