"""Training augmentation on whole batches of device-resident uint8 images, on any device.

The original project ran, per image on the CPU with PIL: resize 32->224, ColorJitter,
RandomGrayscale, horizontal flip, RandomRotation, RandomAffine, RandomPerspective, GaussianBlur,
then ToTensor, Normalize, RandomErasing, and Mixup/CutMix on the batch. `BatchAugment` does the
same with every random parameter drawn per sample, as tensors:

1. colour (jitter in a random order per sample, then grayscale) at 32 px: these are per-pixel
   and come before any geometry in the original, so they commute with the upsampling except for
   the interpolation of the non-linear steps (clamping, hue);
2. flip, rotation, affine and perspective composed into one 3x3 matrix per sample
   (`cifarlib.data.geometry`), and the resize to the output size folded in: a single `grid_sample` per
   image (per batch on a GPU, per cache-sized chunk on the CPU) instead of five resamples (coordinates are normalised to [-1, 1], so the resize is the identity there).
   Two knowing differences from the chain: the result is black only where the composed map
   leaves the image, so a corner that the rotation cut off and the affine step brought back
   keeps its content (on average about 2% of the pixels are black in the original and not
   here); and it interpolates bilinearly where torchvision's rotations default to nearest;
3. the 3-tap Gaussian blur as a separable per-sample filter, run at 32 px before the warp with
   its sigma scaled by 32/size, which matches the original's blur at the output size (a Gaussian
   commutes with the upsampling and, being isotropic, with the rotations). With sigma 0.1-0.2 at
   224 px its side taps weigh at most 4e-6: the original's blur is all but a no-op, kept for
   fidelity (the `light` policy switches it off);
4. normalisation with the backbone's mean and std, random erasing (to 0, after normalising, as
   torchvision does), and Mixup/CutMix with label-smoothed soft targets.

Random parameters come from a seeded CPU generator, so the same seed gives the same batch on the
same device. Everything that depends on them is computed on the CPU too, the 3x3 matrices and
their inverses included, and travels to the device as one packed tensor (pinned, non-blocking on
CUDA). Constants are made once per device. So a batch's augmentation never makes the host wait
for the GPU: the host can queue the next steps while the GPU works. The inputs come out in the
layout the model runs in (the device plan's `channels_last`: on CUDA and on the CPU by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..core import runtime
from ..core.errors import UserError
from .geometry import blacken_outside, geometry, sampling_grid

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class Policy:
    """Every operation's parameters; 0 (or None) switches an operation off."""
    brightness: float = 0.3        # ColorJitter factors, each drawn from [1 - v, 1 + v]
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.1               # hue shift drawn from [-v, v] (fraction of the colour wheel)
    grayscale_p: float = 0.2
    hflip_p: float = 0.5
    rotation_deg: float = 15.0     # RandomRotation: angle from [-v, v]
    affine_deg: float = 15.0       # RandomAffine: angle from [-v, v] ...
    affine_translate: float = 0.1  # ... and shift up to v of the width/height
    perspective_p: float = 0.2
    perspective_distortion: float = 0.5
    blur_sigma: tuple[float, float] | None = (0.1, 0.2)  # 3-tap Gaussian, sigma from this range
    erasing_p: float = 0.3
    erasing_scale: tuple[float, float] = (0.05, 0.2)     # erased share of the area
    erasing_ratio: tuple[float, float] = (0.3, 3.3)      # aspect ratio of the erased box
    mixup_alpha: float = 0.8       # Beta(alpha, alpha) for Mixup's lambda
    cutmix_alpha: float = 0.8      # Beta(alpha, alpha) for CutMix's lambda
    cutmix_p: float = 0.5          # per sample: CutMix instead of Mixup (when both are on)
    label_smoothing: float = 0.1
    fill: str = "black"            # outside the shifted or turned image: "black" (as torchvision
                                   # fills) or "reflect" (mirrored content, as a reflect-padded crop)


POLICIES = {
    # The original project's chain, parameter for parameter.
    "original": Policy(),
    # For fine-tuning runs of a dozen epochs or so: flips, small shifts with mirrored borders and
    # light Mixup, as in BiT's fine-tuning recipe (Kolesnikov et al., 2020: crops and flips, Mixup
    # alpha 0.1). Heavy regularisation pays off over 100 epochs but slows a shorter run.
    "light": Policy(brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0, rotation_deg=0,
                    affine_deg=0, affine_translate=0.125, perspective_p=0, blur_sigma=None,
                    erasing_p=0, mixup_alpha=0.1, cutmix_alpha=0, fill="reflect"),
    # For fine-tuning in a few epochs on small pictures: flips and shifts of up to 4 px in 32 with
    # mirrored borders, as a reflect-padded random crop does; no Mixup, no label smoothing, which
    # in so short a run cost more than they give (measured on real photos: benchmarks/README.md).
    "crop": Policy(brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0, rotation_deg=0,
                   affine_deg=0, affine_translate=0.125, perspective_p=0, blur_sigma=None,
                   erasing_p=0, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0, fill="reflect"),
    # Nothing but the resize and normalisation (and label smoothing): the evaluation path.
    "none": Policy(brightness=0, contrast=0, saturation=0, hue=0, grayscale_p=0, hflip_p=0,
                   rotation_deg=0, affine_deg=0, affine_translate=0, perspective_p=0,
                   blur_sigma=None, erasing_p=0, mixup_alpha=0, cutmix_alpha=0),
}


# Each operation of a policy alone, for previews: the settings that switch it on.
OPERATIONS = {
    "colour jitter": ("brightness", "contrast", "saturation", "hue"),
    "grayscale": ("grayscale_p",), "flip": ("hflip_p",), "rotation": ("rotation_deg",),
    "affine": ("affine_deg", "affine_translate"),
    "perspective": ("perspective_p", "perspective_distortion"), "blur": ("blur_sigma",),
    "erasing": ("erasing_p", "erasing_scale", "erasing_ratio"),
}


def single_operations(policy: Policy) -> dict[str, Policy]:
    """Each operation of `policy` alone (probabilities raised to 1 so that it shows), no mixing."""
    out = {}
    for name, keys in OPERATIONS.items():
        settings = {k: getattr(policy, k) for k in keys}
        switches = [k for k in keys if k.endswith("_p")]
        if all(settings[k] for k in switches) and any(settings.values()):
            settings.update({k: 1.0 for k in switches})
            out[name] = replace(POLICIES["none"], label_smoothing=0, **settings)
    return out


def make_policy(name: str = "original", **overrides) -> Policy:
    """A named policy with some of its parameters changed; unknown names and keys are errors."""
    if name not in POLICIES:
        raise UserError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICIES)}.")
    known = {f.name for f in fields(Policy)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown augmentation setting(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}.")
    policy = replace(POLICIES[name], **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    if policy.fill not in ("black", "reflect"):
        raise UserError(f"augmentation setting fill must be 'black' or 'reflect', not {policy.fill!r}.")
    for f in fields(Policy):
        v = getattr(policy, f.name)
        if f.name.endswith("_p") and not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise UserError(f"augmentation setting {f.name} is a probability, so between 0 and 1, not {v!r}.")
    return policy


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """`values` as a (1, n, 1, 1) float tensor on `device`, made once per process and device:
    building it afresh for each batch would copy it to the GPU and make the host wait."""
    key = (values, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return _CONSTANTS[key]


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * constant(GRAY, x.device)).sum(1, keepdim=True)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, rotate the hue by `shift` (per sample, in turns), -> RGB."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    k = (constant((5.0, 3.0, 1.0), x.device) + h.unsqueeze(1) * 6) % 6
    return maxc.unsqueeze(1) - maxc.unsqueeze(1) * s.unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter per sample: `factors` (B, 4) are brightness, contrast, saturation
    and hue shift; `order` (B, 4) is each sample's order of the four operations."""
    ops = (
        lambda x, f: (x * f.view(-1, 1, 1, 1)).clamp(0, 1),
        lambda x, f: (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * _gray(x).mean((2, 3), keepdim=True)).clamp(0, 1),
        lambda x, f: (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * _gray(x)).clamp(0, 1),
        _shift_hue,
    )
    for step in range(4):
        op = order[:, step].view(-1, 1, 1, 1)
        x = sum(torch.where(op == k, fn(x, factors[:, k]), 0.0) for k, fn in enumerate(ops))
    return x


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's GaussianBlur(3, sigma) per sample: separable, reflect padding."""
    side = torch.exp(-0.5 / sigma.clamp_min(1e-3) ** 2).view(-1, 1, 1, 1)
    centre = 1 / (1 + 2 * side)
    for dim in (3, 2):
        n = x.shape[dim]
        before = torch.cat([x.narrow(dim, 1, 1), x.narrow(dim, 0, n - 1)], dim)
        after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 2, 1)], dim)
        x = centre * (x + side * (before + after))
    return x


def box_mask(size: int, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(B, 1, size, size) booleans, True inside each sample's box (empty where h or w is 0)."""
    r = constant(tuple(range(size)), top.device).view(1, 1, -1, 1)
    c = r.view(1, 1, 1, -1)
    v = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    return ((r >= v(top)) & (r < v(top + h))) & ((c >= v(left)) & (c < v(left + w)))


def pair_partners(b: int, device=None) -> torch.Tensor:
    """Mixing partners: samples (0, 1), (2, 3), ...; an odd last sample is its own partner."""
    partner = torch.arange(b, device=device) ^ 1
    partner[-1:] = partner[-1:].clamp(max=b - 1)
    return partner


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1 - smoothing + off)


# What `apply` needs on the device, per sample, packed in this order into one float32 tensor.
PACKED = (("jitter", 4), ("order", 4), ("grayscale", 1), ("sigma", 1), ("inverse", 9),
          ("erase_box", 4), ("cutmix", 1), ("cut_box", 4), ("lam", 1))
INTEGER = ("order", "erase_box", "cut_box")


def mixes(policy: Policy) -> bool:
    """Whether a policy mixes pairs of samples: known from the policy, no device read needed."""
    return policy.mixup_alpha > 0 or policy.cutmix_alpha > 0


@dataclass
class BatchAugment:
    """`images uint8 (B, 3, 32, 32), labels (B,)` -> `inputs (B, 3, size, size), soft targets (B, C)`.

    Mixup and CutMix are written here rather than taken from timm: timm's `Mixup` draws one
    lambda per batch, or loops over the samples in Python for per-sample lambdas, and draws from
    numpy's global generator, so neither the per-sample rule nor seeding by a generator held.
    Pairs are neighbours, (0, 1), (2, 3), ..., in a shuffled batch (timm pairs i with B-1-i);
    neighbours keep a pair inside one chunk (`runtime.cache_chunk`). An odd last sample is left unmixed.
    `channels_last` (None: as the device's own plan says, `runtime.auto_plan`) chooses the inputs' memory layout.
    """
    policy: Policy
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    seed: int = 0
    channels_last: bool | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample(self, b: int) -> dict[str, torch.Tensor]:
        """Every random parameter of a batch of `b`, and what follows from them (the geometric
        maps' inverses), computed on the CPU."""
        p, g, s = self.policy, self.generator, self.size
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        sym = lambda v: (u(b) * 2 - 1) * v  # noqa: E731
        on = lambda prob: u(b) < prob  # noqa: E731
        area = (p.erasing_scale[0] + u(b) * (p.erasing_scale[1] - p.erasing_scale[0])) * s * s
        ratio = torch.exp(math.log(p.erasing_ratio[0]) + u(b) * math.log(p.erasing_ratio[1] / p.erasing_ratio[0]))
        eh = (area * ratio).sqrt().round().clamp(1, s).long()
        ew = (area / ratio).sqrt().round().clamp(1, s).long()
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
        beta = lambda a: torch.from_numpy(rng.beta(a, a, b)).float() if a > 0 else torch.ones(b)  # noqa: E731
        use_cutmix = on(p.cutmix_p if p.mixup_alpha > 0 and p.cutmix_alpha > 0 else float(p.cutmix_alpha > 0))
        lam = torch.where(use_cutmix, beta(p.cutmix_alpha), beta(p.mixup_alpha))
        cut = (1 - lam).sqrt()
        ch, cw = (s * cut).long(), (s * cut).long()
        cy, cx = (u(b) * s).long(), (u(b) * s).long()
        y0, y1 = (cy - ch // 2).clamp(0, s), (cy + ch // 2).clamp(0, s)
        x0, x1 = (cx - cw // 2).clamp(0, s), (cx + cw // 2).clamp(0, s)
        out = {
            "jitter": torch.stack([1 + sym(p.brightness), 1 + sym(p.contrast), 1 + sym(p.saturation), sym(p.hue)], 1),
            "order": torch.argsort(u(b, 4), 1),
            "grayscale": on(p.grayscale_p),
            "flip": torch.where(on(p.hflip_p), -1.0, 1.0),
            "rotation_deg": sym(p.rotation_deg),
            "affine_deg": sym(p.affine_deg),
            "tx": sym(2 * p.affine_translate), "ty": sym(2 * p.affine_translate),  # 2: [-1, 1] spans the image
            "corner_shift": u(b, 4, 2) * p.perspective_distortion * on(p.perspective_p).view(-1, 1, 1),
            "sigma": p.blur_sigma[0] + u(b) * (p.blur_sigma[1] - p.blur_sigma[0]) if p.blur_sigma else torch.zeros(b),
            "erase_box": torch.stack([  # top, left, height, width; 0 x 0 where not erasing
                (u(b) * (s - eh + 1)).long(), (u(b) * (s - ew + 1)).long(), eh, ew], 1) * on(p.erasing_p).view(-1, 1),
            "cutmix": use_cutmix, "cut_box": torch.stack([y0, x0, y1 - y0, x1 - x0], 1),
            "lam": torch.where(use_cutmix, 1 - (y1 - y0) * (x1 - x0) / (s * s), lam),
        }
        out["inverse"] = torch.linalg.inv(geometry(out))
        return out

    def to_device(self, p: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The parameters `apply` needs, on `device`, in one transfer: packed into one float32
        tensor (pinned memory and a non-blocking copy on CUDA), then unpacked into views there."""
        b = len(p["lam"])
        packed = runtime.to_device(torch.cat([p[k].reshape(b, n).float() for k, n in PACKED], 1), device)
        out, at = {}, 0
        for k, n in PACKED:
            v = packed[:, at:at + n]
            at += n
            out[k] = v.long() if k in INTEGER else v > 0.5 if k in ("grayscale", "cutmix") else v
        out["inverse"] = out["inverse"].reshape(b, 3, 3)
        for k in ("grayscale", "sigma", "cutmix", "lam"):
            out[k] = out[k].reshape(b)
        return out

    def apply(self, images: torch.Tensor, labels: torch.Tensor, p: dict[str, torch.Tensor]):
        """Apply drawn parameters `p` (see `sample`) to a batch; returns inputs and soft targets."""
        pol, dev, s, b = self.policy, images.device, self.size, len(images)
        p = self.to_device(p, dev)
        x = images.float().div_(255)
        if pol.brightness or pol.contrast or pol.saturation or pol.hue:
            x = color_jitter(x, p["jitter"], p["order"])
        if pol.grayscale_p:
            x = torch.where(p["grayscale"].view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        if pol.blur_sigma:  # at 32 px, sigma scaled to match the original's blur at `size`
            x = blur(x, p["sigma"] * x.shape[-1] / s)
        # Warping x / std and then subtracting mean / std equals normalising after the warp, and
        # keeps the outside black as in the original (padding with 0 before normalisation).
        x = x / constant(self.std, dev)
        layout = self.channels_last if self.channels_last is not None else runtime.auto_plan(dev).channels_last
        final = torch.empty((b, 3, s, s), device=dev, memory_format=torch.channels_last if layout else torch.contiguous_format)
        step = runtime.cache_chunk(dev) or b
        for a in range(0, b, step):  # chunk by chunk: warped chunks stay in the cache, and are reused memory
            part = slice(a, a + step)
            grid = sampling_grid(p["inverse"][part], s, x)
            out = F.grid_sample(x[part], grid, mode="bilinear", align_corners=False,  # the one resample
                                padding_mode="reflection" if pol.fill == "reflect" else "border")
            self._finish(out, final[part], grid, {k: v[part] for k, v in p.items()})
        y = soft_targets(labels, self.num_classes, pol.label_smoothing)
        if mixes(pol):
            y = y.lerp(y[pair_partners(b, dev)], (1 - p["lam"]).view(-1, 1))
        return final, y

    def _finish(self, out: torch.Tensor, final: torch.Tensor, grid: torch.Tensor, p: dict[str, torch.Tensor]):
        """Black outside, erasing, mixing and normalisation of one chunk of warped images, into
        `final` (which is `out` itself, or a channels_last tensor that the normalisation writes).

        Full-size tensors are touched as few times as possible and in place: on a CPU, fresh
        allocations of that size cost more than the arithmetic, and a chunk of
        `runtime.cache_chunk` images stays in the cache from one pass to the next. Erasing and
        mixing run on `out`, in its NCHW layout, before the normalisation that writes `final`: in
        channels_last, an operation broadcast over the channels has an innermost loop of 3 and
        ran 2-4x slower on the CPU. Erasing fills with `shift` (0 once normalised, as
        torchvision erases), and mixing is linear, so the order changes nothing.
        """
        if self.policy.fill == "black":
            blacken_outside(out, grid)
        shifts = tuple(m / sd for m, sd in zip(self.mean, self.std))
        if self.policy.erasing_p:
            erase = box_mask(self.size, *p["erase_box"].unbind(1))[:, 0]
            for c, value in enumerate(shifts):
                out[:, c].masked_fill_(erase, value)
        if mixes(self.policy):
            cut = p["cutmix"].view(-1, 1, 1, 1)
            weight = torch.where(cut, box_mask(self.size, *p["cut_box"].unbind(1)), (1 - p["lam"]).view(-1, 1, 1, 1))
            n = len(out) // 2 * 2  # pairs (0, 1), (2, 3), ...; an odd last image stays as it is
            first, second = out[0:n:2], out[1:n:2]
            kept = first.clone()  # half a chunk copied, not a whole one
            first.lerp_(second, weight[0:n:2])
            second.lerp_(kept, weight[1:n:2])
        torch.sub(out, constant(shifts, out.device), out=final)  # normalised, in the final layout

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        return self.apply(images, labels, self.sample(len(images)))
