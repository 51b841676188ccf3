"""The one evaluation path: from uint8 images to class scores, for validation, testing and
prediction alike (training's validation, `cifarlib.evaluation` and `cifarlib.serving` all call it)."""

from __future__ import annotations

import torch

from ..core import runtime
from ..data.datasets import Batches, Split
from ..data.preprocess import evaluation_inputs


@torch.no_grad()
def logits(model, images: torch.Tensor, image_size: int, mean, std, flip: bool = False,
           plan: runtime.DevicePlan | None = None) -> torch.Tensor:
    """The one evaluation path, from uint8 images to float32 class scores: resize and normalise
    (`evaluation_inputs`), then the model with a device plan's precision and memory layout:
    the training run's for validation, the device's own (`runtime.auto_plan`: bf16 autocast
    and channels_last on CUDA) for testing and prediction."""
    plan = plan or runtime.auto_plan(images.device)
    inputs = evaluation_inputs(images, image_size, mean, std).to(memory_format=plan.memory_format)
    with plan.autocast():
        return model(inputs.flip(-1) if flip else inputs).float()


@torch.no_grad()
def predict_split(model, split: Split, image_size: int, mean, std, batch_size: int = 256,
                  flip: bool = False) -> torch.Tensor:
    """Class probabilities for every image of `split` (averaged with its mirror image if `flip`)."""
    model.eval()
    out = []
    for x, _ in Batches(split, batch_size).epoch(0):
        p = logits(model, x, image_size, mean, std).softmax(1)
        if flip:
            p = (p + logits(model, x, image_size, mean, std, flip=True).softmax(1)) / 2
        out.append(p.cpu())
    return torch.cat(out) if out else torch.zeros(0)
