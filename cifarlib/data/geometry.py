"""Per-sample geometry for batch augmentation: flip, rotation, affine and perspective as 3x3
matrices in normalised coordinates ([-1, 1] across the image, pixel centres as grid_sample's
align_corners=False), composed per sample and applied with a single resample.

Normalised coordinates make the resize from 32 px to the output size the identity, so one
`grid_sample` does the geometry and the resize together. `cifarlib.data.augment` draws the parameters
and builds the matrices and their inverses on the CPU (`geometry`, `torch.linalg.inv`): solving
small systems on a GPU makes the host wait for it, so only the finished inverses travel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import runtime


def _rotation(deg: torch.Tensor, tx=None, ty=None) -> torch.Tensor:
    a = torch.deg2rad(deg)
    m = torch.zeros(len(deg), 3, 3, device=deg.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos(), 1
    if tx is not None:
        m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) matrices mapping the 4 points `src` (B, 4, 2) onto `dst` (B, 4, 2)."""
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = torch.cat([rows_u, rows_v], 1)  # (B, 8, 8)
    h = torch.linalg.solve(a, torch.cat([u, v], 1).unsqueeze(-1)).squeeze(-1)
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).view(-1, 3, 3)


CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))  # tl, tr, br, bl (normalised)


def geometry(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample forward matrices (B, 3, 3), in normalised coordinates: perspective . affine .
    rotation . flip, the order in which the original applied them."""
    flip = torch.diag_embed(torch.stack([p["flip"], torch.ones_like(p["flip"]), torch.ones_like(p["flip"])], 1))
    corners = torch.tensor(CORNERS, device=flip.device).expand(len(flip), 4, 2)
    persp = homography(corners, corners - corners.sign() * p["corner_shift"])  # corners move inwards
    return persp @ _rotation(p["affine_deg"], p["tx"], p["ty"]) @ _rotation(p["rotation_deg"]) @ flip


_CENTRES: dict[tuple[int, str], torch.Tensor] = {}


def pixel_centres(size: int, device: torch.device) -> torch.Tensor:
    """The normalised x (or y) of each of `size` pixel centres, made once per size and device."""
    key = (size, str(device))
    if key not in _CENTRES:
        _CENTRES[key] = ((torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1).to(device)
    return _CENTRES[key]


def sampling_grid(inverse: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """(B, size, size, 2) source coordinates of each output pixel, from the inverse matrices
    (B, 3, 3) of the forward maps, on `like`'s device."""
    inv = inverse.view(-1, 3, 3, 1, 1)
    lin = pixel_centres(size, like.device)
    gx, gy = lin.view(1, 1, -1), lin.view(1, -1, 1)
    row = lambda r, out=None: torch.addcmul(inv[:, r, 2] + inv[:, r, 1] * gy, inv[:, r, 0], gx, out=out)  # noqa: E731
    grid = torch.empty(len(inverse), size, size, 2, device=like.device, dtype=like.dtype)
    row(0, grid[..., 0]), row(1, grid[..., 1])
    if not runtime.may_read_back(like.device):  # one pass; picking the few below would make the host wait
        return grid.div_(row(2).unsqueeze(-1))  # the projective divide (by 1 for affine maps)
    # on a CPU, divide only the samples with a perspective part (a fifth, in the original policy)
    idx = ((inv[:, 2, 0] != 0) | (inv[:, 2, 1] != 0)).flatten().nonzero().flatten()
    if len(idx):
        z = torch.addcmul(inv[idx, 2, 2] + inv[idx, 2, 1] * gy, inv[idx, 2, 0], gx)
        grid[idx] = grid[idx] / z.unsqueeze(-1)
    return grid


def blacken_outside(out: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Black where the source lies outside the image, as the original's rotations fill (grid_sample
    ran with border padding, so that inside the image, edge pixels extend to its border as a
    plain resize does: zero padding alone would darken every border). Spends `grid`."""
    return out.masked_fill_(grid.abs_().amax(-1).unsqueeze(1) > 1, 0.0)


def warp(x: torch.Tensor, forward: torch.Tensor, size: int) -> torch.Tensor:
    """Resample `x` once at `size` x `size` through the inverse of `forward`; outside is 0."""
    grid = sampling_grid(torch.linalg.inv(forward), size, x)
    return blacken_outside(F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False), grid)
