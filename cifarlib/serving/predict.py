"""Predictions for your own pictures, from a checkpoint alone.

    p = Predictor.from_checkpoint("checkpoints/my-run/best.pt")
    p.predict("cat.jpg").top          # [("leopard", 0.41), ("tiger", 0.22), ...]

Class names, normalisation and image size come from the checkpoint (read with
`torch.load(weights_only=True)`). Each picture is brought by `cifarlib.data.preprocess.cifar_like` to
the size the model's training images were stored at (the checkpoint's `store_size`, or 32 when
it has none, as in older checkpoints) and then takes the evaluation path, on the GPU when there
is one.

    python -m cifarlib.predict CHECKPOINT IMAGE [IMAGE ...] [--top-k 5]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ..core import runtime
from ..core.errors import UserError, cli_errors
from ..data.preprocess import CIFAR_SIZE, cifar_like
from ..model.backbones import from_checkpoint
from ..model.inference import logits
from .prediction import Prediction, format_prediction  # noqa: F401  (where callers have always found them)
from .prediction import top_predictions


class Predictor:
    def __init__(self, model: torch.nn.Module, checkpoint: dict, device: torch.device):
        self.model, self.device = model, device
        self.classes, self.superclasses = checkpoint["classes"], checkpoint["superclasses"]
        self.fine_to_coarse = checkpoint["fine_to_coarse"]
        self.mean, self.std, self.size = checkpoint["mean"], checkpoint["std"], checkpoint["image_size"]
        self.store_size = checkpoint.get("store_size", CIFAR_SIZE)  # pictures are made this size first

    @classmethod
    def from_checkpoint(cls, path, device: str = "auto") -> Predictor:
        dev = runtime.pick_device(device)
        model, ckpt = from_checkpoint(path, dev)
        return cls(model, ckpt, dev)

    @torch.no_grad()
    def predict(self, images, top_k: int = 5):
        """One picture (path, bytes, PIL image or array) -> a Prediction; a list -> a list.

        A picture that can't be used raises `UserError` with the reason.
        """
        single, batch = self._pictures(images, top_k)
        out = self._top(logits(self.model, batch, self.size, self.mean, self.std).softmax(1).cpu(), top_k)
        return out[0] if single else out

    def _pictures(self, images, top_k: int = 1) -> tuple[bool, torch.Tensor]:
        """(whether one picture was given, the uint8 batch at the stored size on the device)."""
        if top_k < 1:
            raise UserError(f"top_k must be at least 1, not {top_k}.")
        single = not isinstance(images, (list, tuple))
        if not single and not images:
            raise UserError("no pictures given.")
        pictures = [images] if single else images
        return single, torch.stack([cifar_like(im, self.store_size) for im in pictures]).to(self.device)

    def _top(self, probs: torch.Tensor, top_k: int) -> list[Prediction]:
        return top_predictions(probs.float().numpy(), top_k, self.classes, self.superclasses, self.fine_to_coarse)

    def explain(self, images, class_index: int | list[int] | None = None):
        """Where the model looked (Grad-CAM, `cifarlib.evaluation.explain`): one picture, as `predict` takes it,
        -> a float32 array (store_size, store_size) in [0, 1], for `class_index` (by default the
        top class); a list -> a list."""
        single, batch = self._pictures(images)
        from ..evaluation.explain import gradcam
        _, maps = gradcam(self.model, batch, self.size, self.mean, self.std, class_index)
        out = list(maps.cpu().numpy().astype(np.float32))
        return out[0] if single else out

    def predict_and_explain(self, images, top_k: int = 5):
        """`predict` and `explain` (for the top class) from one forward pass: a (Prediction, map)
        pair per picture; a list of pictures gives a list of pairs."""
        single, batch = self._pictures(images, top_k)
        from ..evaluation.explain import gradcam
        scores, maps = gradcam(self.model, batch, self.size, self.mean, self.std)
        out = list(zip(self._top(scores.softmax(1).cpu(), top_k), maps.cpu().numpy().astype(np.float32)))
        return out[0] if single else out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cifarlib.predict", description="Top-k classes of your pictures.")
    ap.add_argument("checkpoint", help="a best.pt or last.pt written by training")
    ap.add_argument("images", nargs="+", help="image files (jpg, png, webp, ...)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    failed = 0
    with cli_errors(ap.prog):
        predictor = Predictor.from_checkpoint(args.checkpoint, args.device)
        for path in args.images:
            try:
                p = predictor.predict(path, top_k=args.top_k)
            except UserError as e:
                failed += 1
                print(f"{ap.prog}: error: {path}: {e}", file=sys.stderr)
                continue
            print(f"{path}\n{format_prediction(p)}")
    if failed:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
