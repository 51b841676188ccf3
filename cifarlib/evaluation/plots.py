"""Figures and tables for the notebooks: image grids, class tables, balance and statistics, and the
evaluation's figures. The helpers every figure uses (one drawing at a time, PNG bytes) are in
`cifarlib.core.figures`; training curves and runs compared, in `cifarlib.training.curves`."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch

from ..data.augment import make_policy, mixes
from ..data.datasets import CifarData, Split
from ..model import checkpoints
from ..training import curves
from . import evaluate


def to_display(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """uint8 images, or normalised float inputs with their mean/std, -> float HWC in [0, 1]."""
    x = x.detach().float().cpu()
    if mean is not None:
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    elif x.max() > 1.5:
        x = x / 255
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def image_grid(rows: list[torch.Tensor], row_labels=None, titles=None, size: float = 1.3, **display):
    """One row of images per entry of `rows` (each (N, 3, H, W)); optional labels and titles."""
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * size, len(rows) * size), squeeze=False)
    for i, row in enumerate(rows):
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([]), ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if j < len(row):
                ax.imshow(to_display(row[j:j + 1], **display)[0], interpolation="nearest")
            if titles is not None and j < len(titles[i]):
                ax.set_title(titles[i][j], fontsize=7)
        if row_labels is not None:
            axes[i][0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def class_table(d: CifarData) -> pd.DataFrame:
    """The classes, grouped by superclass where the dataset has them."""
    if d.superclasses is None:
        return pd.DataFrame({"class": d.classes}).rename_axis("label")
    rows = [{"superclass": name, "classes": ", ".join(
        c for c, coarse in zip(d.classes, d.fine_to_coarse.tolist()) if coarse == i)}
        for i, name in enumerate(d.superclasses)]
    return pd.DataFrame(rows).rename_axis("coarse label")


def samples_by_group(d: CifarData, split: Split, per_class: int = 2, seed: int = 0):
    """Rows of sample images: one row per superclass (its classes side by side), or per class."""
    g = torch.Generator().manual_seed(seed)
    labels = split.labels.cpu()
    pick = lambda c: split.images[labels.eq(c).nonzero().flatten()[  # noqa: E731
        torch.randperm(int(labels.eq(c).sum()), generator=g)[:per_class]].to(split.images.device)]
    if d.superclasses is None:
        return [pick(c) for c in range(d.num_classes)], d.classes
    groups = [[c for c in range(d.num_classes) if d.fine_to_coarse[c] == s] for s in range(len(d.superclasses))]
    return [torch.cat([pick(c) for c in group]) for group in groups], d.superclasses


def mixing_sample(split: Split, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images of `split` and their labels for a Mixup/CutMix preview, drawn at random (seeded)
    one class after another, in a random order of classes: neighbours, which Mixup and CutMix
    pair, are of different classes wherever the split has several. The split's first `n` images
    would not do: a folder's splits come ordered by class, so those are mostly of one class."""
    g = torch.Generator().manual_seed(seed)
    labels = split.labels.cpu()
    present = labels.unique()
    pools = [(labels == c).nonzero().flatten() for c in present[torch.randperm(len(present), generator=g)]]
    pools = [pool[torch.randperm(len(pool), generator=g)] for pool in pools]
    picks = [pool[depth] for depth in range(max(map(len, pools), default=0)) for pool in pools if depth < len(pool)]
    index = torch.stack(picks[:n]) if n > 0 and picks else torch.zeros(0, dtype=torch.int64)
    return split.images[index.to(split.images.device)], split.labels[index.to(split.labels.device)]


def balance(d: CifarData) -> pd.DataFrame:
    """Images per class in each split."""
    counts = {name: torch.bincount(getattr(d, name).labels.cpu(), minlength=d.num_classes).tolist()
              for name in ("train", "val", "test")}
    return pd.DataFrame(counts, index=pd.Index(d.classes, name="class"))


def plot_balance(table: pd.DataFrame):
    long = table.reset_index().melt(id_vars="class", var_name="split", value_name="images")
    fig, ax = plt.subplots(figsize=(12, 3))
    sns.stripplot(data=long, x="class", y="images", hue="split", ax=ax, size=3, jitter=False)
    ax.set_xticks([])
    ax.set_xlabel(f"{len(table)} classes")
    ax.set_title("images per class in each split")
    return fig


def _in_chunks(images: torch.Tensor, chunk_bytes: int = 64 << 20):
    """`images` as float64 CPU chunks of about `chunk_bytes`: pictures on disk, or bigger than
    memory, are read a chunk at a time, never as one float copy (8 times their size)."""
    per = max(1, chunk_bytes // max(1, 8 * images[0].numel())) if len(images) else 1
    for start in range(0, len(images), per):
        yield images[start:start + per].cpu().double()


def channel_stats(d: CifarData) -> pd.DataFrame:
    """Per-channel mean and std of each split that has images, as fractions of 255."""
    rows = {}
    for name in (n for n in ("train", "val", "test") if len(getattr(d, n))):  # a folder may have no test/
        images = getattr(d, name).images
        total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for x in _in_chunks(images):
            total += x.sum((0, 2, 3))
            squares += x.square().sum((0, 2, 3))
        count = images[:, 0].numel()
        mean = total / count
        std = ((squares - total * mean) / max(count - 1, 1)).clamp_min(0).sqrt()
        for c, channel in enumerate("RGB"):
            rows[(name, channel)] = {"mean": mean[c].item() / 255, "std": std[c].item() / 255}
    return pd.DataFrame(rows).T.rename_axis(["split", "channel"])


def similar_class_pairs(d: CifarData, n: int = 5) -> list[tuple[int, int]]:
    """The `n` pairs of classes whose mean training images (8x8) are closest: look-alikes."""
    labels, means, start = d.train.labels.cpu(), torch.zeros(d.num_classes, 3 * 8 * 8), 0
    for chunk in _in_chunks(d.train.images):  # class sums a chunk at a time
        x = torch.nn.functional.adaptive_avg_pool2d(chunk.float(), 8).flatten(1)
        means.index_add_(0, labels[start:start + len(x)], x)
        start += len(x)
    means /= torch.bincount(labels, minlength=d.num_classes).clamp_min(1).unsqueeze(1)
    dist = torch.cdist(means, means) + torch.eye(d.num_classes) * 1e9
    flat = dist.triu(1).flatten()
    order = torch.argsort(torch.where(flat > 0, flat, torch.tensor(float("inf"))))[:n]
    return [(int(i) // d.num_classes, int(i) % d.num_classes) for i in order]


def training_curves(checkpoint: dict, folder: Path):
    """A run's loss curves over its whole history, with the row whose weights `checkpoint` holds
    marked: best.pt's own history stops at that row, so the history and trace come from the
    run's last.pt where the folder has it."""
    last = folder / "last.pt"
    whole = checkpoints.load(last) if last.is_file() else checkpoint
    soft = mixes(make_policy(whole["config"].get("augmentation", "original")))
    best = (checkpoint.get("metrics") or {}).get("epoch")
    return curves.loss_curves(whole["history"], whole.get("trace", {}).get("points"), soft, best=best)


def superclass_order(fine_to_coarse) -> list[int]:
    """Class indices grouped by superclass (stable within each), for ordering matrices."""
    return sorted(range(len(fine_to_coarse)), key=lambda c: (int(fine_to_coarse[c]), c))


def class_confusion(cm: torch.Tensor, names: list[str], fine_to_coarse=None):
    """The class confusion matrix, its classes grouped by superclass where the dataset has
    superclasses (and its title saying so only then)."""
    if fine_to_coarse is None:
        return confusion_heatmap(cm, names, None, "classes")
    return confusion_heatmap(cm, names, superclass_order(fine_to_coarse), "classes (grouped by superclass)")


def confusion_heatmap(cm: torch.Tensor, names: list[str], order: list[int] | None = None, title: str = ""):
    """Row-normalised confusion matrix as a seaborn heatmap, rows and columns in `order`."""
    order = list(range(len(names))) if order is None else order
    m = cm.float()[order][:, order]
    m = m / m.sum(1, keepdim=True).clamp_min(1)
    size = 4 + len(names) / 8
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    labels = [names[i] for i in order]
    sns.heatmap(m.numpy(), ax=ax, cmap="viridis", vmin=0, vmax=1, square=True, xticklabels=labels,
                yticklabels=labels, cbar_kws={"label": "share of the true class", "shrink": 0.6})
    ax.tick_params(labelsize=max(4, 9 - len(names) // 20))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


def per_class_bars(per_class: dict[str, float]):
    items = sorted(per_class.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(14, 3.2))
    ax.bar(range(len(items)), [v for _, v in items], color=sns.color_palette("rocket", len(items)))
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=90, fontsize=6)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy per class, worst first")
    fig.tight_layout()
    plt.close(fig)
    return fig


def reliability_diagram(bins: list[dict[str, float]], ece: float):
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=[b["high"] - b["low"] for b in bins],
           align="edge", alpha=0.7, edgecolor="black", label="accuracy in the bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", ms=3, color="black")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.3f})")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    plt.close(fig)
    return fig


def confident_mistakes(images: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, names: list[str], n: int = 16):
    """The `n` wrong predictions made with the highest confidence: image, truth, guess, confidence."""
    pick, conf, pred = evaluate.confident_mistakes(probs, labels, n)
    pick = pick.tolist()
    if not pick:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center")
        plt.close(fig)
        return fig
    cols = 8
    rows = [images[pick[i:i + cols]] for i in range(0, len(pick), cols)]
    titles = [[f"{names[labels[j]]}\n→ {names[pred[j]]} {conf[j]:.0%}" for j in pick[i:i + cols]] for i in range(0, len(pick), cols)]
    fig = image_grid(rows, titles=titles, size=1.5)
    plt.close(fig)
    return fig
