"""How good a trained model is, and where it fails: metrics from a checkpoint and a split.

    ev = evaluate_checkpoint("checkpoints/my-run/best.pt", split="test", tta=True)
    ev.metrics["top1"], ev.metrics["superclass_top1"], ev.metrics["ece"]

The data, its split and the picture size come from the checkpoint: for a run on your own pictures
(`dataset="folder"`), its `data_dir`, `cache_dir` and `store_size`, unless others are given.
`split="auto"` is the test split, or the validation split for a folder without `test/`.
Everything reported is written to `metrics.json` beside the checkpoint. Top-level keys
(accuracies as fractions): `top1`, `top5`, `loss`, `superclass_top1` (CIFAR-100 only), `ece`,
`tta_top1` (when horizontal-flip test-time augmentation ran), `checkpoint`, `split`, `samples`,
`date`; details are nested under `per_class`, `most_confused`, `reliability` and `tta`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core import runtime
from ..core.errors import UserError
from ..data.datasets import Split, load_cifar
from ..model import checkpoints
from ..model.backbones import from_checkpoint
from ..model.inference import predict_split


def confident_mistakes(probs: torch.Tensor, labels: torch.Tensor, n: int = 16):
    """The `n` wrong predictions made with the highest confidence, most confident first: their
    indices, with every row's confidence and predicted class (the gallery and its maps share it)."""
    conf, pred = probs.max(1)
    wrong = (pred != labels).nonzero().flatten()
    return wrong[conf[wrong].argsort(descending=True)[:n]], conf, pred


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, probs.shape[1])
    return (probs.topk(k, 1).indices == labels.unsqueeze(1)).any(1).float().mean().item()


def confusion(true: torch.Tensor, pred: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) counts: row = true class, column = predicted class."""
    return torch.bincount(true * n + pred, minlength=n * n).view(n, n)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    return cm.diag().float() / cm.sum(1).clamp_min(1).float()


def most_confused(cm: torch.Tensor, names: list[str], n: int = 10) -> list[dict[str, Any]]:
    """The `n` largest off-diagonal cells: true class, predicted class, count."""
    off = cm.clone()
    off.fill_diagonal_(0)
    values, idx = off.flatten().topk(min(n, off.numel()))
    k = cm.shape[0]
    return [{"true": names[i // k], "predicted": names[i % k], "count": int(v)}
            for v, i in zip(values.tolist(), idx.tolist()) if v > 0]


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width confidence bins, and the bins themselves."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf.clamp(1e-12, 1), edges, right=False) - 1  # bin (lo, hi]
    ece, table = 0.0, []
    for b in range(bins):
        m = which == b
        if m.any():
            acc, c = correct[m].mean().item(), conf[m].mean().item()
            ece += m.float().mean().item() * abs(acc - c)
            table.append({"low": edges[b].item(), "high": edges[b + 1].item(), "count": int(m.sum()),
                          "accuracy": acc, "confidence": c})
    return ece, table


def summarise(probs: torch.Tensor, labels: torch.Tensor, classes: list[str],
              fine_to_coarse: torch.Tensor | None, superclasses: list[str] | None) -> dict[str, Any]:
    """Every metric of the module docstring from probabilities and true labels (both on the CPU)."""
    n = len(classes)
    pred = probs.argmax(1)
    cm = confusion(labels, pred, n)
    ece, bins = calibration(probs, labels)
    m: dict[str, Any] = {
        "top1": topk_accuracy(probs, labels, 1), "top5": topk_accuracy(probs, labels, 5),
        "loss": F.nll_loss(probs.clamp_min(1e-12).log(), labels).item(), "ece": ece,
        "per_class": dict(zip(classes, per_class_accuracy(cm).tolist())),
        "most_confused": most_confused(cm, classes), "reliability": bins,
    }
    if fine_to_coarse is not None and superclasses is not None:
        f2c = fine_to_coarse.cpu()
        m["superclass_top1"] = (f2c[pred] == f2c[labels]).float().mean().item()
        m["superclass_confusion"] = confusion(f2c[labels], f2c[pred], len(superclasses)).tolist()
    return m


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    probs: torch.Tensor            # (N, classes), CPU
    labels: torch.Tensor           # (N,), CPU
    split: Split                   # the images evaluated, CPU
    checkpoint: dict[str, Any]     # what the checkpoint says of itself (history, classes, ...)
    folder: Path                   # where metrics.json and the figures go


def _load_data(ckpt: dict[str, Any], split: str, data_dir: str | None, cache_dir: str | None, **kw):
    """The checkpoint's dataset, with the splits `split` may need (a folder decodes only those)."""
    cfg = ckpt["config"]
    data = load_cifar(ckpt["dataset"], data_dir or cfg.get("data_dir", "data"), val_fraction=cfg["val_fraction"],
                      seed=cfg["seed"], store_size=ckpt.get("store_size", 32),
                      cache_dir=cache_dir or cfg.get("cache_dir", "data"),
                      splits=("val", "test") if split == "auto" else (split,), **kw)
    if ckpt["dataset"] == "folder" and data.classes != list(ckpt["classes"]):  # a folder can change
        raise UserError(f"the classes in {data.folder} differ from the checkpoint's; evaluate it on the data it "
                        f"was trained on.\n  the checkpoint's: {', '.join(ckpt['classes'])}\n"
                        f"  the data's:       {', '.join(data.classes)}")
    if split == "test" and not len(data.test):
        raise UserError(f"{data.folder} has no test/ folder, so there is no test split: evaluate on the "
                        "validation split with split=\"val\" (or split=\"auto\").")
    return data


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", data_dir: str | None = None,
                        verify_checksums: bool = True, tta: bool = False, device: str = "auto",
                        max_samples: int | None = None, cache_dir: str | None = None) -> Evaluation:
    """Evaluate a checkpoint on `split` ("test", "val", or "auto": test if the data has one,
    else val) of the data it was trained on: `data_dir` (None: the checkpoint's own)."""
    if split not in ("test", "val", "auto"):
        raise UserError(f"split must be 'test', 'val' or 'auto', not {split!r}.")
    path = runtime.resolve_path(checkpoint)
    dev = runtime.pick_device(device)
    model, ckpt = from_checkpoint(path, dev)
    data = _load_data(ckpt, split, data_dir, cache_dir, max_eval_samples=max_samples,
                      verify_checksums=verify_checksums, device=dev)
    if split == "auto":
        split = "test" if len(data.test) else "val"
    part = getattr(data, split)
    args = (model, part, ckpt["image_size"], ckpt["mean"], ckpt["std"])
    probs = predict_split(*args)
    labels = part.labels.cpu()
    metrics = summarise(probs, labels, data.classes, data.fine_to_coarse, data.superclasses)
    if tta:
        flipped = predict_split(*args, flip=True)
        metrics["tta_top1"] = topk_accuracy(flipped, labels, 1)
        metrics["tta"] = {"kind": "horizontal flip, probabilities averaged",
                          "gain": metrics["tta_top1"] - metrics["top1"]}
    metrics.update({"checkpoint": str(path), "split": split, "samples": len(labels),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if runtime.is_main_process():
        checkpoints.write_json(metrics, path.parent / "metrics.json")
    return Evaluation(metrics, probs, labels, part.to("cpu"), ckpt, path.parent)


def newest_checkpoint(root: str = "checkpoints", name: str = "best.pt") -> Path:
    """The most recently written `name` under `root` (the default for notebooks 04 and 05)."""
    found = sorted(runtime.resolve_path(root).glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no {name} under {runtime.resolve_path(root)}: train a model first "
                        "(notebook 03 or make train), or give the checkpoint's path.")
    return found[-1]
