"""What a prediction is, whichever engine made it: PyTorch (`cifarlib.serving.predict`) or onnxruntime
(`cifarlib.serving.onnxpredict`, the web app's pages). The top classes, the superclass, and how they print.
A module of its own so that a page without torch can build and show predictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prediction:
    top: list[tuple[str, float]]   # (class, probability), most probable first
    superclass: str | None         # the superclass of the top class (CIFAR-100)


def top_predictions(probs: np.ndarray, top_k: int, classes: list[str], superclasses: list[str] | None,
                    fine_to_coarse: list[int] | None) -> list[Prediction]:
    """Probabilities (batch, classes) -> a Prediction per row, its `top_k` classes most probable first."""
    out = []
    for row in np.asarray(probs, dtype=np.float64):
        idx = np.argsort(-row, kind="stable")[:top_k].tolist()
        out.append(Prediction([(classes[i], float(row[i])) for i in idx],
                              superclasses[fine_to_coarse[idx[0]]] if superclasses else None))
    return out


def format_prediction(p: Prediction) -> str:
    lines = [f"  {rank}. {name:<20s} {prob:7.2%}" for rank, (name, prob) in enumerate(p.top, 1)]
    if p.superclass:
        lines.append(f"  superclass: {p.superclass}")
    return "\n".join(lines)
