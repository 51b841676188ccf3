"""User pictures without PyTorch: decoding by the rule for user pictures, and the fit to the stored size.

The rule (the module docstring of `cifarlib.data.preprocess` gives it whole) applied with PIL and numpy
alone, so that the web app's pages, which run their model with onnxruntime, need not import torch
(torch, timm and torchvision are about 700 of the 820 MB a page on PyTorch holds in a process of
its own, benchmarks/README.md, "The web app under load"). `cifarlib.data.preprocess` re-exports
these and wraps `fit` for torch: there is one implementation of the rule.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ..core.errors import UserError

CIFAR_SIZE = 32
MAX_PIXELS = 50_000_000  # larger pictures are refused before decoding (decompression bombs)


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


def fit(image: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image -> uint8 (size, size, 3): the shorter side resized to `size` and the centre
    cropped square, antialiased (the second half of the rule for user pictures)."""
    small = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.uint8).copy()


def cifar_like(image: Picture, size: int = CIFAR_SIZE) -> np.ndarray:
    """Any picture -> uint8 (size, size, 3), as `cifarlib.data.preprocess.cifar_like` (which gives it
    as a (3, size, size) tensor)."""
    return fit(decode(image, 2 * size), size)
