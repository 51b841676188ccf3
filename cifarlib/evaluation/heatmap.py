"""Maps of where the model looked, as numbers and as pictures, with numpy alone.

`cam_map` turns one class activation map (the exported model's `cams` output, `cifarlib.serving.export`)
into the map `Predictor.explain` gives: negative values cut, scaled to [0, 1] as torchcam scales
Grad-CAM's (minimum subtracted, divided by the new maximum plus 1e-8; an even map is all zeros),
and resized to the picture's stored size as `F.interpolate(mode="bilinear", align_corners=False)`
does. `overlay` lays a map over a picture in matplotlib's `jet` colours (`cifarlib.evaluation.explain.overlay`
is this function). Why numpy: the web app's pages run without torch (`cifarlib.serving.onnxpredict`),
which is most of a page's memory when it is imported (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _source_index(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two input indices and the second one's weight, as torch's
    bilinear interpolation with align_corners=False computes them (half-pixel centres, clamped)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def resize_bilinear(a: np.ndarray, size: int) -> np.ndarray:
    """A float map (h, w) -> (size, size), bilinear, as torch's F.interpolate(align_corners=False)."""
    a = np.asarray(a, dtype=np.float32)
    r0, r1, rw = _source_index(a.shape[0], size)
    c0, c1, cw = _source_index(a.shape[1], size)
    rows = a[r0] * (1 - rw)[:, None] + a[r1] * rw[:, None]
    return rows[:, c0] * (1 - cw) + rows[:, c1] * cw


def cam_map(cam: np.ndarray, size: int) -> np.ndarray:
    """One class's activation map (h, w) -> float32 (size, size) in [0, 1], as `Predictor.explain`."""
    cam = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    cam = cam - cam.min()
    cam = cam / (cam.max() + np.float32(1e-8))
    return np.nan_to_num(np.clip(resize_bilinear(cam, size), 0, 1), nan=0.0).astype(np.float32)


def enlarge(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (size, size, 3), nearest neighbour (each pixel a block when size is a multiple)."""
    rows = np.minimum((np.arange(size) * (image.shape[0] / size)).astype(np.int64), image.shape[0] - 1)
    cols = np.minimum((np.arange(size) * (image.shape[1] / size)).astype(np.int64), image.shape[1] - 1)
    return image[rows][:, cols]


def overlay(image: np.ndarray, heat: np.ndarray, size: int | None = None, alpha: float = 0.5) -> Image.Image:
    """A picture (uint8 (h, w, 3)) with its map (h, w) in [0, 1] laid over it in the `jet`
    colours, blended `alpha`; enlarged to `size` px (the picture nearest, the map bilinear)."""
    from matplotlib import colormaps

    size = size or image.shape[0]
    big = enlarge(np.asarray(image, dtype=np.uint8), size).astype(np.float32)
    heat = np.clip(resize_bilinear(heat, size), 0, 1)
    colours = colormaps["jet"](heat)[..., :3].astype(np.float32) * 255
    out = np.clip(np.round((1 - alpha) * big + alpha * colours), 0, 255).astype(np.uint8)
    return Image.fromarray(out)
