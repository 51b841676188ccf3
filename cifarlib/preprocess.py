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
`store_size` by this same function (`cifarlib.imagecache`), so training and prediction agree.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import UserError

CIFAR_SIZE = 32
MAX_PIXELS = 50_000_000  # larger pictures are refused before decoding (decompression bombs)


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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float grayscale rescaled, transparency (alpha, a
    palette's or a tRNS chunk's) composited on white. EXIF rotation is `decode`'s job."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grayscale: rescale
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        top = 1.0 if img.mode == "F" and a.max() <= 1.0 else top
        img = Image.fromarray((a.clip(0, top) / top * 255).round().astype(np.uint8), "L")
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")  # palette or tRNS transparency: keep it, to composite on white
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


Picture = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def decode(image: Picture, min_side: int) -> Image.Image:
    """Any picture -> an upright 8-bit RGB PIL image, decoded once: the first half of the rule for
    user pictures (EXIF rotation, any mode to RGB, transparency on white).

    Accepts a path, encoded bytes, a PIL image, or an array (H, W), (H, W, 3) or (H, W, 4); float
    arrays are taken as 0..1. A JPEG file is decoded at a reduced scale where both sides stay at
    least `min_side` (`Image.draft`, libjpeg's DCT scaling): a 12-megapixel photo decodes about
    16x faster at 1/4 scale. Anything that is not a usable picture raises `UserError`.
    """
    try:
        if isinstance(image, np.ndarray):
            if image.dtype.kind == "f":  # floats are taken as 0..1
                image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            image = Image.fromarray(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) == 0:
                raise UserError("the file is empty: not a usable image.")
            image = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, (str, Path, os.PathLike)):
            image = Image.open(image)
        if image.width * image.height > MAX_PIXELS:  # known from the header, before decoding
            raise UserError(f"the image is {image.width}x{image.height} pixels, above the limit of "
                            f"{MAX_PIXELS:,} (a guard against decompression bombs); resize it first.")
        image.draft(None, (min_side, min_side))  # JPEG only (a no-op for other formats)
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, TypeError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL reports damaged files as OSError (UnidentifiedImageError too), SyntaxError ("broken
        # PNG file"), ValueError or EOFError; an unknown format's message would name a BytesIO object
        why = "no image format recognised" if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise UserError(f"not a usable image ({why}).") from None


def fit(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, size, size): the shorter side resized to `size` and the centre
    cropped square, antialiased (the second half of the rule for user pictures)."""
    small = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def cifar_like(image: Picture, size: int = CIFAR_SIZE) -> torch.Tensor:
    """Any picture -> uint8 (3, size, size), by the rule in this module's docstring: `decode`
    (a JPEG at a reduced scale where its shorter side stays at least twice `size`, so the
    antialiased resize still has twice the pixels it keeps), then `fit`."""
    return fit(decode(image, 2 * size), size)
