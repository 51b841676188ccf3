"""Batch augmentation: faithful to the original's operations, per sample, one resample, seeded."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cifarlib.core.errors import UserError
from cifarlib.data import augment, geometry as geo
from cifarlib.data.augment import BatchAugment, make_policy
from cifarlib.data.preprocess import evaluation_inputs
from cifarlib.data.synthetic import make_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batch(n=16, seed=0):
    labels = torch.arange(n) % 100
    return make_images(labels, seed), labels


def aug(policy="none", size=64, seed=0, **overrides):
    return BatchAugment(make_policy(policy, **overrides), size, MEAN, STD, num_classes=100, seed=seed)


def pixels(x):
    """Undo the normalisation: back to [0, 1] pixel values."""
    return x * torch.tensor(STD, device=x.device).view(1, 3, 1, 1) + torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["original", "light", "none"])
def test_shapes_dtypes_devices_and_no_nan(device, policy):
    images, labels = batch(10)
    x, y = aug(policy, size=96)(images.to(device), labels.to(device))
    assert x.shape == (10, 3, 96, 96) and x.dtype == torch.float32 and x.device.type == device
    assert y.shape == (10, 100) and y.device.type == device
    assert not x.isnan().any() and not y.isnan().any()
    assert torch.allclose(y.sum(1), torch.ones(10, device=device))


def test_identity_parameters_reproduce_the_evaluation_path():
    images, labels = batch(8)
    x, y = aug("none", size=224)(images, labels)
    assert torch.allclose(x, evaluation_inputs(images, 224, MEAN, STD), atol=1e-4)
    x32, _ = aug("none", size=32)(images, labels)  # no resize: the input itself, normalised
    assert torch.allclose(pixels(x32), images.float() / 255, atol=1e-5)


def test_random_parameters_differ_across_the_samples_of_a_batch():
    p = aug("original").sample(64)
    for key in ("rotation_deg", "affine_deg", "tx", "ty"):
        assert len(p[key].unique()) == 64, key
    assert len(p["jitter"].unique(dim=0)) == 64 and len(p["order"].unique(dim=0)) > 10
    assert 0 < p["flip"].eq(-1).sum() < 64 and 0 < p["cutmix"].sum() < 64


def test_the_geometric_path_resamples_each_image_once(monkeypatch):
    resampled = []  # images per grid_sample call (the CPU path goes chunk by chunk)
    real = augment.F.grid_sample
    monkeypatch.setattr(augment.F, "grid_sample", lambda x, *a, **k: resampled.append(len(x)) or real(x, *a, **k))
    monkeypatch.setattr(augment.F, "interpolate", lambda *a, **k: pytest.fail("a second resample"))
    images, labels = batch(40)
    a = aug("original", size=128)
    a(images, labels)
    assert sum(resampled) == 40
    a(images, labels)
    assert sum(resampled) == 80


def test_rates_of_flip_grayscale_perspective_and_erasing():
    n = 4000  # binomial sd <= 0.008; bounds are 5 sd
    p = aug("original").sample(n)
    assert abs(p["flip"].eq(-1).float().mean() - 0.5) < 0.04
    assert abs(p["grayscale"].float().mean() - 0.2) < 0.032
    assert abs(p["corner_shift"].abs().sum((1, 2)).gt(0).float().mean() - 0.2) < 0.032
    erased = p["erase_box"][:, 2] > 0
    assert abs(erased.float().mean() - 0.3) < 0.037
    area = (p["erase_box"][erased, 2] * p["erase_box"][erased, 3]).float() / 64**2
    assert area.min() > 0.04 and area.max() < 0.22  # scale 0.05-0.2, after rounding
    assert abs(p["cutmix"].float().mean() - 0.5) < 0.04


def test_rotation_and_affine_angles_stay_within_15_degrees():
    p = aug("original").sample(4000)
    for key in ("rotation_deg", "affine_deg"):
        assert p[key].abs().max() <= 15 and p[key].max() > 14.5 and p[key].min() < -14.5
    assert p["tx"].abs().max() <= 0.2  # 0.1 of the width, in [-1, 1] coordinates


def test_flip_grayscale_and_erasing_do_what_they_say():
    images, labels = batch(8)
    plain, _ = aug("none", size=32)(images, labels)
    flipped, _ = aug("none", size=32, hflip_p=1)(images, labels)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    gray, _ = aug("none", size=32, grayscale_p=1)(images, labels)
    g = pixels(gray)
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-5) and torch.allclose(g[:, 1], g[:, 2], atol=1e-5)
    erased, _ = aug("none", size=64, erasing_p=1)(images, labels)
    zero = (erased == 0).all(1).float().mean((1, 2))
    assert (zero > 0.04).all() and (zero < 0.22).all()


@pytest.mark.parametrize("k,fn", [(0, TF.adjust_brightness), (1, TF.adjust_contrast),
                                  (2, TF.adjust_saturation), (3, TF.adjust_hue)])
def test_colour_operations_match_torchvision(k, fn):
    x = make_images(torch.arange(6)).float() / 255
    factors = torch.ones(6, 4)
    factors[:, 3] = 0
    values = torch.tensor([0.7, 0.8, 0.9, 1.1, 1.2, 1.3]) if k < 3 else torch.linspace(-0.1, 0.1, 6)
    factors[:, k] = values
    order = torch.tensor([[k] + [j for j in range(4) if j != k]] * 6)
    ours = augment.color_jitter(x, factors, order)
    ref = torch.stack([fn(x[i], float(values[i])) for i in range(6)])
    assert torch.allclose(ours, ref, atol=2e-5)


def test_blur_matches_torchvision_per_sample():
    x = make_images(torch.arange(3)).float() / 255
    sigma = torch.tensor([0.5, 0.8, 1.5])
    ref = torch.stack([TF.gaussian_blur(x[i], [3, 3], [float(s)] * 2) for i, s in enumerate(sigma)])
    assert torch.allclose(augment.blur(x, sigma), ref, atol=1e-5)


def test_perspective_matrices_move_the_corners_as_drawn():
    src = torch.tensor(geo.CORNERS).expand(5, 4, 2)
    dst = src - src.sign() * torch.rand(5, 4, 2) * 0.5
    h = geo.homography(src, dst)
    mapped = torch.cat([src, torch.ones(5, 4, 1)], -1) @ h.transpose(1, 2)
    assert torch.allclose(mapped[..., :2] / mapped[..., 2:], dst, atol=1e-5)


def constant_batch(n=12):
    """Image i is one flat grey level, so where each output pixel came from can be read off."""
    levels = torch.linspace(10, 245, n).round().to(torch.uint8)
    return levels.view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous(), torch.arange(n), levels.float() / 255


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_images_and_targets_agree(kind):
    images, labels, levels = constant_batch()
    settings = dict(mixup_alpha=0.8 if kind == "mixup" else 0, cutmix_alpha=0.8 if kind == "cutmix" else 0,
                    label_smoothing=0)
    x, y = aug("none", size=32, **settings)(images, labels)
    partner = augment.pair_partners(12)
    lam = y[torch.arange(12), labels]  # the share of each image's own label
    assert torch.allclose(y[torch.arange(12), labels[partner]], 1 - lam, atol=1e-6)
    g = pixels(x)[:, 0]
    if kind == "mixup":
        expect = lam * levels + (1 - lam) * levels[partner]
        assert torch.allclose(g.mean((1, 2)), expect, atol=1e-4)
    else:
        own = (g - levels.view(-1, 1, 1)).abs() < 1e-4
        assert torch.allclose(own.float().mean((1, 2)), lam, atol=1e-6)


def test_targets_carry_label_smoothing_and_sum_to_one():
    images, labels = batch(16)
    _, plain = aug("none", label_smoothing=0.1)(images, labels)
    assert torch.allclose(plain.max(1).values, torch.full((16,), 0.9 + 0.001))
    assert torch.allclose(plain.min(1).values, torch.full((16,), 0.001))
    _, mixed = aug("original")(images, labels)
    assert torch.allclose(mixed.sum(1), torch.ones(16)) and (mixed >= 0.001 - 1e-7).all()
    partner = augment.pair_partners(16)
    assert torch.allclose(mixed[torch.arange(16), labels] + mixed[torch.arange(16), labels[partner]],
                          torch.full((16,), 0.9 + 0.002), atol=1e-6)


def test_odd_batches_mix_with_the_last_sample_left_alone():
    images, labels = batch(7)
    x, y = aug("none", size=32, mixup_alpha=0.8, label_smoothing=0)(images, labels)
    assert y[6, labels[6]] == 1 and torch.allclose(pixels(x[6]), images[6].float() / 255, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batch(device):
    images, labels = batch(12)
    images, labels = images.to(device), labels.to(device)
    a, b, c = aug("original", seed=5), aug("original", seed=5), aug("original", seed=6)
    xa, ya = a(images, labels)
    xb, yb = b(images, labels)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, c(images, labels)[0])
    assert not torch.equal(xa, a(images, labels)[0])  # the next batch draws afresh


def test_policies_are_checked():
    with pytest.raises(UserError, match="unknown augmentation policy 'heavy'"):
        make_policy("heavy")
    with pytest.raises(UserError, match="unknown augmentation setting.*rotation_degrees"):
        make_policy("original", rotation_degrees=10)
    with pytest.raises(UserError, match="grayscale_p is a probability"):
        make_policy("original", grayscale_p=1.5)
    assert make_policy("light", erasing_scale=[0.1, 0.2]).erasing_scale == (0.1, 0.2)


def smooth(size=32):
    """A smooth test image, so that bilinear resampling is compared, not aliasing."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    return torch.stack([torch.sin(xx / 5), torch.cos(yy / 4), torch.sin((xx + yy) / 7)]).add(1.2).div(2.4).unsqueeze(0)


INNER = (slice(None), slice(None), slice(8, 24), slice(8, 24))


def test_rotation_and_affine_warps_match_torchvision():
    from torchvision.transforms import InterpolationMode
    img, th = smooth(), torch.tensor([10.0])
    ours = geo.warp(img, geo._rotation(th), 32)
    ref = TF.rotate(img, -10.0, interpolation=InterpolationMode.BILINEAR)  # ours turns clockwise
    assert torch.allclose(ours[INNER], ref[INNER], atol=1e-5)
    ours = geo.warp(img, geo._rotation(th, torch.tensor([0.25]), torch.tensor([-0.125])), 32)
    ref = TF.affine(img, angle=10.0, translate=[4, -2], scale=1.0, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR)  # 0.25 of [-1, 1] is 4 px of 32
    assert torch.allclose(ours[INNER], ref[INNER], atol=1e-5)


def test_perspective_warp_matches_torchvision():
    from torchvision.transforms import InterpolationMode
    start = [[0, 0], [31, 0], [31, 31], [0, 31]]
    end = [[5, 3], [27, 1], [30, 26], [2, 29]]
    # torchvision's point coordinates run from 0 at the image's left edge to 32 at its right
    to_norm = lambda pts: torch.tensor(pts, dtype=torch.float32) * 2 / 32 - 1  # noqa: E731
    forward = geo.homography(to_norm(start).unsqueeze(0), to_norm(end).unsqueeze(0))
    ours = geo.warp(smooth(), forward, 32)
    ref = TF.perspective(smooth(), start, end, interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(ours[INNER], ref[INNER], atol=1e-4)


def test_geometry_composes_flip_rotation_affine_perspective_in_order():
    from torchvision.transforms import InterpolationMode as IM
    p = {"flip": torch.tensor([-1.0]), "rotation_deg": torch.tensor([8.0]), "affine_deg": torch.tensor([-6.0]),
         "tx": torch.tensor([0.125]), "ty": torch.tensor([0.0]), "corner_shift": torch.zeros(1, 4, 2)}
    ours = geo.warp(smooth(), geo.geometry(p), 32)
    ref = TF.affine(TF.rotate(TF.hflip(smooth()), -8.0, interpolation=IM.BILINEAR), angle=-6.0, translate=[2, 0],
                    scale=1.0, shear=[0.0, 0.0], interpolation=IM.BILINEAR)
    # one resample against two: equal up to the second interpolation's blur
    assert (ours[INNER] - ref[INNER]).abs().mean() < 0.01


def test_outside_the_image_is_black_inside_it_edges_extend():
    images = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    x, _ = aug("none", size=64, rotation_deg=15)(images, torch.arange(4))
    px = pixels(x)
    rotated = aug("none", size=64, rotation_deg=15).sample(4)["rotation_deg"].abs() > 3
    corners = px[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners[rotated] < 1e-5).all()  # black corners, as the original's fill
    plain, _ = aug("none", size=64)(images, torch.arange(4))
    assert torch.allclose(pixels(plain), torch.full_like(plain, 200 / 255), atol=1e-5)  # no dark rim


def test_grayscale_is_per_sample_and_colour_order_matters():
    images, labels = batch(64)
    a = aug("none", size=32, grayscale_p=0.5)
    p = a.sample(64)
    g = pixels(a.apply(images, labels, p)[0])
    flat = (g[:, 0] - g[:, 1]).abs().amax((1, 2)) < 1e-5
    assert torch.equal(flat, p["grayscale"]) and 0 < flat.sum() < 64
    x = make_images(torch.arange(2)).float() / 255
    f = torch.tensor([[1.3, 0.7, 1.0, 0.0]] * 2)
    bc = augment.color_jitter(x, f, torch.tensor([[0, 1, 2, 3]] * 2))
    cb = augment.color_jitter(x, f, torch.tensor([[1, 0, 2, 3]] * 2))
    assert torch.allclose(bc, TF.adjust_contrast(TF.adjust_brightness(x, 1.3), 0.7), atol=2e-5)
    assert torch.allclose(cb, TF.adjust_brightness(TF.adjust_contrast(x, 0.7), 1.3), atol=2e-5)
    assert not torch.allclose(bc, cb, atol=1e-3)


def test_blur_runs_when_on_and_translation_reaches_its_range():
    images, labels = batch(4)
    sharp, _ = aug("none", size=32)(images, labels)
    blurred, _ = aug("none", size=32, blur_sigma=(2.0, 2.0))(images, labels)
    assert (sharp - blurred).abs().mean() > 0.05
    t = aug("original").sample(4000)
    assert t["tx"].abs().max() > 0.19 and t["ty"].abs().max() > 0.19


def test_parameters_reach_the_device_in_one_transfer(monkeypatch):
    """Each small copy to a GPU makes the host wait: `apply` sends one packed tensor per batch,
    and its constants are made on the device once (by the first batch), not for every batch."""
    images, labels = batch(8)
    a = aug("original", size=48)
    a(images, labels)
    p = a.sample(8)
    calls = []
    real = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kw: calls.append(args) or real(self, *args, **kw))
    a.apply(images, labels, p)
    assert len(calls) == 1


def test_augmentation_reads_no_value_back_from_the_device():
    """On the meta device a tensor has no values, so any host read of one (`.item()`, `.any()` in
    an `if`, `.nonzero()`, `.tolist()`) raises: the batch goes through without one."""
    images, labels = batch(8)
    for policy in ("original", "light"):
        x, y = aug(policy, size=48)(images.to("meta"), labels.to("meta"))
        assert x.shape == (8, 3, 48, 48) and y.shape == (8, 100) and x.device.type == "meta"


def test_channels_last_inputs_hold_the_same_values():
    images, labels = batch(8)
    a, b = aug("original", size=48, seed=3), aug("original", size=48, seed=3)
    a.channels_last, b.channels_last = False, True
    (xa, ya), (xb, yb) = a(images, labels), b(images, labels)
    assert xb.is_contiguous(memory_format=torch.channels_last) and not xa.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_reflect_fill_mirrors_the_image_where_a_shift_uncovers_the_border():
    images = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    images[:, :, :, :4] = 40  # a dark band along the left edge
    a = aug("none", size=32, affine_translate=0.125, fill="reflect")
    p = a.sample(4)
    x = pixels(a.apply(images, torch.arange(4), p)[0])
    assert (x > 0.1).all()  # nothing is black: what a shift uncovers is mirrored content
    shifted = aug("none", size=32, affine_translate=0.125)  # the default: black, as torchvision fills
    assert (pixels(shifted.apply(images, torch.arange(4), p)[0]) < 1e-5).any()
    with pytest.raises(UserError, match="fill must be 'black' or 'reflect'"):
        make_policy("crop", fill="wrap")
