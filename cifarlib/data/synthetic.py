"""A small synthetic dataset written in the real CIFAR pickle layouts, for offline tests and demos.

Each class is a combination of a shape (5 kinds), a stripe texture orientation (4) and a colour
palette (5), so the 100 classes are all different. Every image jitters the shape's position and
size, the stripes' phase, both colours and the brightness, and adds pixel noise, so no single
pixel gives the class away, yet a small convnet learns the classes clearly above chance in an
epoch or two. The files are then read by the same code as the real CIFAR files.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from .classes import (CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR100_FINE_TO_COARSE,
                      CIFAR100_SUPERCLASSES)
from .sources import move_into_place

_PALETTES = torch.tensor([  # (foreground RGB, background RGB)
    [[220, 60, 50], [40, 60, 110]],
    [[60, 180, 70], [120, 80, 40]],
    [[240, 210, 60], [70, 40, 100]],
    [[70, 130, 230], [200, 190, 170]],
    [[230, 230, 230], [45, 45, 45]],
], dtype=torch.float32)


def make_images(labels: torch.Tensor, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Render one uint8 image (3, size, size) per label (0..99; a label picks its class's pattern)."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    shape, orient, palette = labels % 5, (labels // 5) % 4, (labels // 20) % 5

    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    c = (size - 1) / 2
    dx = xx - (c + (u(n, 1, 1) - 0.5) * 0.4 * size)  # centre jitter: +-20% of the image
    dy = yy - (c + (u(n, 1, 1) - 0.5) * 0.4 * size)
    s = (0.18 + 0.16 * u(n, 1, 1)) * size  # shape size jitter
    r, ax, ay = (dx**2 + dy**2).sqrt(), dx.abs(), dy.abs()
    masks = torch.stack([
        r < s,                                                      # disc
        torch.maximum(ax, ay) < 0.85 * s,                           # square
        (r - 0.8 * s).abs() < 0.3 * s,                              # ring
        ((ax < 0.3 * s) & (ay < s)) | ((ay < 0.3 * s) & (ax < s)),  # cross
        ax + ay < 1.2 * s,                                          # diamond
    ], 1)
    fg = masks[torch.arange(n), shape].float().unsqueeze(1)  # (n, 1, size, size)

    theta = (orient.float() * math.pi / 4).view(n, 1, 1)
    phase = u(n, 1, 1) * 2 * math.pi
    stripes = torch.sin((xx * theta.cos() + yy * theta.sin()) * (2 * math.pi / 5) + phase)
    texture = (0.7 + 0.3 * stripes).unsqueeze(1)

    colours = _PALETTES[palette] + torch.randn(n, 2, 3, generator=g) * 25  # colour jitter
    fg_rgb, bg_rgb = colours[:, 0].view(n, 3, 1, 1), colours[:, 1].view(n, 3, 1, 1)
    img = fg * fg_rgb * texture + (1 - fg) * bg_rgb
    img = img * (0.75 + 0.5 * u(n, 1, 1, 1)) + torch.randn(n, 3, size, size, generator=g) * 18
    return img.round().clamp(0, 255).to(torch.uint8)


def _balanced_labels(per_class: int, num_classes: int, seed: int) -> torch.Tensor:
    labels = torch.arange(num_classes).repeat(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def _rows(images: torch.Tensor) -> np.ndarray:
    """(N, 3, 32, 32) uint8 -> (N, 3072) rows: the red plane, then green, then blue, as CIFAR."""
    return images.reshape(len(images), -1).numpy()


def _dump(obj: dict, path: Path, str_keys: bool) -> None:
    enc = (lambda k: k) if str_keys else (lambda k: k.encode())
    with open(path, "wb") as f:
        pickle.dump({enc(k): v for k, v in obj.items()}, f, protocol=2)


def _write_atomically(folder: Path, fill) -> Path:
    """Write a dataset folder via a temporary sibling and a rename, so it is complete or absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_cifar100(folder: str | os.PathLike, train_per_class: int = 40, test_per_class: int = 10,
                   seed: int = 0, str_keys: bool = False) -> Path:
    """Write `train`, `test` and `meta` into `folder` (a `cifar-100-python` layout).

    Keys are bytes like the official files, or str like files rebuilt with Python 3 (`str_keys`).
    """
    coarse = torch.tensor(CIFAR100_FINE_TO_COARSE)

    def fill(tmp: Path) -> None:
        for i, (split, per_class) in enumerate([("train", train_per_class), ("test", test_per_class)]):
            labels = _balanced_labels(per_class, 100, seed * 10 + i)
            _dump({"filenames": [f"synthetic_{split}_{j:05d}.png".encode() for j in range(len(labels))],
                   "batch_label": f"synthetic {split}".encode(),
                   "fine_labels": labels.tolist(), "coarse_labels": coarse[labels].tolist(),
                   "data": _rows(make_images(labels, seed * 10 + i))}, tmp / split, str_keys)
        _dump({"fine_label_names": list(CIFAR100_CLASSES),
               "coarse_label_names": list(CIFAR100_SUPERCLASSES)}, tmp / "meta", str_keys)

    return _write_atomically(Path(folder), fill)


def write_cifar10(folder: str | os.PathLike, train_per_class: int = 20, test_per_class: int = 5,
                  seed: int = 0, str_keys: bool = False) -> Path:
    """Write `data_batch_1..5`, `test_batch` and `batches.meta` (a `cifar-10-batches-py` layout)."""
    def fill(tmp: Path) -> None:
        train = _balanced_labels(train_per_class, 10, seed * 10)
        test = _balanced_labels(test_per_class, 10, seed * 10 + 1)
        parts = [(f"data_batch_{k + 1}", chunk) for k, chunk in enumerate(train.chunk(5))]
        for name, labels in parts + [("test_batch", test)]:
            _dump({"batch_label": name.encode(), "labels": labels.tolist(),
                   "data": _rows(make_images(labels * 11, seed + len(name))),
                   "filenames": [f"{name}_{j}.png".encode() for j in range(len(labels))]},
                  tmp / name, str_keys)
        _dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": len(parts[0][1]),
               "num_vis": 3072}, tmp / "batches.meta", str_keys)

    return _write_atomically(Path(folder), fill)


def pack_tarball(folder: str | os.PathLike, tarball: str | os.PathLike) -> Path:
    """Pack a dataset folder as the official tarballs are: `<folder name>/<files>`, gzipped."""
    folder, tarball = Path(folder), Path(tarball)
    with tarfile.open(tarball, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return tarball
