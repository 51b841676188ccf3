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
import re
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ..core.errors import UserError

CIFAR_SIZE = 32
# What a picture may cost, known from its header before anything is decoded: at most this many
# pixels, by format. A baseline JPEG decodes at a reduced scale (libjpeg's DCT scaling, 1/2 to
# 1/8), so it may be large; a progressive one holds its coefficients while it decodes (3.1 MB a
# megapixel); every other format decodes at full size, at its own cost in memory (a megapixel, file
# included: PNG up to 9.4 MB, WebP 15.6, BMP 6.7, GIF 5.6). So that any accepted picture costs at
# most 150 MB more than a small photo at its peak, and under 1 s of CPU, on the 2-core VM
# (benchmarks/bench_pictures.py; benchmarks/README.md):
MAX_PIXELS = {"JPEG": 80_000_000, "JPEG (progressive)": 40_000_000, "PNG": 14_000_000, "WEBP": 8_000_000,
              "GIF": 24_000_000, "BMP": 20_000_000}
MAX_OTHER_PIXELS = 14_000_000     # any other format Pillow decodes by itself (TIFF, PSD, ...), at full size
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # what the web app accepts, from the content
NEVER = ("EPS",)                  # run an external program (Ghostscript): not opened anywhere
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose that makes it upright


def _formats(formats: tuple[str, ...] | None) -> list[str]:
    """The Pillow formats `Image.open` may try: `formats`, or every one Pillow decodes by itself."""
    Image.init()
    return [f for f in (formats or Image.OPEN) if f not in NEVER]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float grayscale rescaled, transparency (alpha, a
    palette's or a tRNS chunk's) composited on white. EXIF rotation is `decode`'s job. Meant for
    a picture already reduced: the float arithmetic here is on its few pixels."""
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


def _kind(image: Image.Image) -> str:
    """The picture's format, as MAX_PIXELS names it."""
    if image.format in ("JPEG", "MPO"):
        return "JPEG (progressive)" if image.info.get("progressive") or image.info.get("progression") else "JPEG"
    return image.format or "picture"


def _check_size(image: Image.Image) -> None:
    """Refuse, from the header, a picture whose decoding would cost too much (see MAX_PIXELS)."""
    kind = _kind(image)
    limit = MAX_PIXELS.get(kind, MAX_OTHER_PIXELS)
    if image.width * image.height > limit:
        raise UserError(f"the image is {image.width}x{image.height} pixels; a {kind} may have at most {limit:,} here "
                        "(a guard against pictures that cost seconds and gigabytes to decode): resize it first.")


# Pictures up to this many pixels are converted at full size: cheap at that size (at most about
# 16 MB a copy), and the same picture then gives the same model input whatever `min_side` a reader
# asks (the app asks 160 px, `predict` twice the stored size). Larger ones are reduced first.
REDUCE_ABOVE = 4_000_000


def _reduced(image: Image.Image, min_side: int) -> Image.Image:
    """The picture decoded and made small in its own mode, before any conversion: a JPEG at the
    scale libjpeg decodes down to (`draft`), then, past `REDUCE_ABOVE` pixels, any format by an
    integer factor that keeps its shorter side at least `min_side` (`reduce`, a box filter; `fit`
    antialiases the rest). Modes
    that `reduce` does not take are first made compact: 16-bit grayscale to 8-bit (a shift, not a
    float copy of the full picture), bilevel to grayscale, a palette to RGB(A)."""
    image.draft(None, (min_side, min_side))  # JPEG only (a no-op for other formats)
    if image.mode.startswith("I;16"):
        a = np.asarray(image)
        a = np.right_shift(a, 8, out=a if a.flags.writeable else None)
        image = Image.fromarray(a.astype(np.uint8), "L")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
    if image.size[0] * image.size[1] <= REDUCE_ABOVE:
        return image
    factor = max(1, min(image.size) // max(min_side, 1))
    return image.reduce(factor) if factor > 1 else image


def decode(image: Picture, min_side: int, formats: tuple[str, ...] | None = None) -> Image.Image:
    """Any picture -> an upright 8-bit RGB PIL image, decoded once: the first half of the rule for
    user pictures (EXIF rotation, any mode to RGB, transparency on white), its cost bounded before
    it is paid.

    Accepts a path, encoded bytes, a PIL image, or an array (H, W), (H, W, 3) or (H, W, 4); float
    arrays are taken as 0..1. Encoded pictures are opened only as `formats` (by content, not by
    name; None: any format Pillow decodes by itself, EPS never: it runs Ghostscript), refused from
    their header past their format's `MAX_PIXELS`, and decoded small
    where they allow (`_reduced`): at least `min_side` pixels on the shorter side. Anything that is
    not a usable picture raises `UserError`.
    """
    try:
        if isinstance(image, np.ndarray):
            if image.dtype.kind == "f":  # floats are taken as 0..1
                image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            image = Image.fromarray(image)
        elif isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) == 0:
                raise UserError("the file is empty: not a usable image.")
            image = Image.open(io.BytesIO(bytes(image)), formats=_formats(formats))
        elif isinstance(image, (str, Path, os.PathLike)):
            image = Image.open(image, formats=_formats(formats))
        _check_size(image)
        orientation = image.getexif().get(0x0112)  # from the header: the reduced picture has no EXIF
        small = _reduced(image, min_side)
        if orientation in _TRANSPOSE:
            small = small.transpose(_TRANSPOSE[orientation])
        return to_rgb(small)
    except Image.DecompressionBombError as e:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS, before ours
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise UserError(f"the image says it is {size}, far above the limits here (at most {max(MAX_PIXELS.values()):,}, "
                        "for a JPEG: a guard against pictures that cost seconds and gigabytes to decode): resize it "
                        "first.") from None
    except (OSError, ValueError, TypeError, SyntaxError, EOFError) as e:
        # PIL reports damaged files as OSError (UnidentifiedImageError too), SyntaxError ("broken
        # PNG file"), ValueError or EOFError; an unknown format's message would name a BytesIO object
        if isinstance(e, Image.UnidentifiedImageError):
            why = "no image format recognised" if formats is None else f"not a picture in one of {', '.join(formats)}"
        else:
            why = f"{type(e).__name__}: {e}"
        raise UserError(f"not a usable image ({why}).") from None


def fit(image: Image.Image, size: int) -> np.ndarray:
    """An RGB PIL image -> uint8 (size, size, 3): the shorter side resized to `size` and the centre
    cropped square, antialiased (the second half of the rule for user pictures)."""
    small = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.uint8).copy()


def cifar_like(image: Picture, size: int = CIFAR_SIZE, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """Any picture -> uint8 (size, size, 3), as `cifarlib.data.preprocess.cifar_like` (which gives it
    as a (3, size, size) tensor)."""
    return fit(decode(image, 2 * size, formats), size)
