"""The one evaluation path (validation, test and inference), user images, and normalisation.

Evaluation is resize plus normalise: uint8 (B, 3, 32, 32) -> float (B, 3, size, size), bilinear,
with the backbone's own mean and std. It is exactly `BatchAugment` with every operation off.

A user's picture is first made to look like a CIFAR image, then takes the same path:
EXIF rotation applied; any mode (RGBA, LA, P, CMYK, L, 1, 16-bit, float) brought to 8-bit RGB,
transparency composited on white; the shorter side resized to the size the model's training
images were stored at (32 px for CIFAR, a run's `store_size` for image folders) and the centre
cropped square (`ImageOps.fit`, with antialiasing); then resize and normalise like a test image.
The original project resized photos straight to 224 px, a sharpness the model never saw in
training: every training image was upsampled from 32 px. Image folders are decoded to their
`store_size` by this same function (`cifarlib.data.imagecache`), so training and prediction agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import UserError
from . import pictures
from .pictures import CIFAR_SIZE, MAX_PIXELS, Picture, decode, to_rgb  # noqa: F401  (the rule without torch)


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the backbone's default pretrained weights, from torchvision's or timm's
    metadata (no download). Local weight files and `weights="none"` use the same values, so a
    model is always fed what its architecture's pretrained weights expect."""
    import torchvision

    if backbone in torchvision.models.list_models(module=torchvision.models):
        preset = torchvision.models.get_model_weights(backbone).DEFAULT.transforms()
        return tuple(preset.mean), tuple(preset.std)
    import timm

    cfg = timm.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
    if cfg is None:
        raise UserError(f"unknown backbone {backbone!r}: neither a torchvision classification "
                        "model nor a timm model (see timm.list_models()).")
    return tuple(cfg.mean), tuple(cfg.std)


def evaluation_inputs(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 (B, 3, h, w) on any device -> normalised float (B, 3, size, size)."""
    x = images.float() / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)


def fit(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, size, size): the shorter side resized to `size` and the centre
    cropped square, antialiased (the second half of the rule for user pictures)."""
    return torch.from_numpy(pictures.fit(image, size)).permute(2, 0, 1).contiguous()


def cifar_like(image: Picture, size: int = CIFAR_SIZE) -> torch.Tensor:
    """Any picture -> uint8 (3, size, size), by the rule in this module's docstring:
    `pictures.cifar_like` (`decode`, a JPEG at a reduced scale where its shorter side stays at least
    twice `size`, so the antialiased resize still has twice the pixels it keeps; then `fit`)."""
    return torch.from_numpy(pictures.cifar_like(image, size)).permute(2, 0, 1).contiguous()
