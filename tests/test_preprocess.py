"""The evaluation path for user images: any picture becomes a CIFAR-like 32x32 RGB image."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlib.data.preprocess import cifar_like, evaluation_inputs, normalization

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "cifar100"


def rgb_image(w, h):
    a = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


@pytest.mark.parametrize("make", [
    lambda: rgb_image(40, 30).convert("RGBA"),
    lambda: rgb_image(40, 30).convert("LA"),
    lambda: rgb_image(40, 30).convert("L"),
    lambda: rgb_image(40, 30).convert("1"),
    lambda: rgb_image(40, 30).convert("P"),
    lambda: rgb_image(40, 30).convert("CMYK"),
    lambda: rgb_image(40, 30).convert("YCbCr"),
    lambda: Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)),  # 16-bit
    lambda: Image.fromarray(np.full((30, 40), 0.5, dtype=np.float32)),   # float
    lambda: rgb_image(1, 1),
    lambda: rgb_image(4000, 3000),
    lambda: rgb_image(3, 500),
], ids=["RGBA", "LA", "L", "1", "P", "CMYK", "YCbCr", "I16", "F", "1x1", "4000x3000", "3x500"])
def test_any_mode_and_size_becomes_32x32_rgb(make):
    img = make()
    t = cifar_like(img)
    assert t.shape == (3, 32, 32) and t.dtype == torch.uint8
    x = evaluation_inputs(t.unsqueeze(0), 224, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (1, 3, 224, 224) and x.abs().max() <= 1


def test_16_bit_and_float_images_keep_their_brightness():
    mid16 = cifar_like(Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)))
    assert (mid16 - 128).abs().max() <= 1
    half = cifar_like(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)))
    assert (half.float() - 127.5).abs().max() <= 1


def test_transparency_becomes_white_and_the_centre_is_kept():
    clear = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    assert (cifar_like(clear) == 255).all()
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # the red centre square survives the crop
    out = cifar_like(wide)[:, :, 2:-2]  # the resampling filter reaches a pixel past the crop
    assert (out[0] > 250).all() and (out[2] < 5).all()


def test_inputs_as_bytes_path_array_and_pil_agree(tmp_path):
    img = rgb_image(64, 48)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    img.save(tmp_path / "x.png")
    ref = cifar_like(img)
    for source in (buf.getvalue(), memoryview(buf.getvalue()), tmp_path / "x.png", str(tmp_path / "x.png"), np.asarray(img)):
        assert torch.equal(cifar_like(source), ref)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples/cifar100 is not beside the project")
def test_a_real_cifar_image_passes_through_unchanged():
    for path in sorted(SAMPLES.glob("*.png"))[:5]:
        raw = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(cifar_like(path), raw)


def test_normalisation_comes_from_the_backbone_metadata():
    assert normalization("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization("vit_small_patch16_224") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("mode,key", [("L", 0), ("RGB", (0, 0, 0))])
def test_trns_transparency_of_l_and_rgb_pngs_becomes_white(mode, key):
    buf = io.BytesIO()
    Image.new(mode, (20, 20), key).save(buf, "PNG", transparency=key)
    assert (cifar_like(buf.getvalue()) == 255).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 30))  # red left half
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    out = cifar_like(buf.getvalue())  # upright it is 30 wide, 60 tall: red on top
    assert out[0, 2, 16] > 200 and out[2, -3, 16] > 200


@pytest.mark.parametrize("bad", [b"", b"not an image at all", "/no/such/file.png"])
def test_unusable_inputs_are_clear_errors(bad):
    from cifarlib.core.errors import UserError
    with pytest.raises(UserError, match="not a usable image"):
        cifar_like(bad)


def test_truncated_image_is_a_clear_error():
    from cifarlib.core.errors import UserError
    buf = io.BytesIO()
    rgb_image(64, 64).save(buf, "PNG")
    with pytest.raises(UserError, match="not a usable image"):
        cifar_like(buf.getvalue()[:300])


def test_float_arrays_are_taken_as_zero_to_one():
    out = cifar_like(np.full((10, 10, 3), 0.5, dtype=np.float32))
    assert (out.float() - 127.5).abs().max() <= 1


def test_any_store_size_and_big_jpegs_decoded_at_a_reduced_scale_look_the_same(monkeypatch):
    # a smooth 1200x900 photo-like gradient: the reduced-scale JPEG decode must not show
    y, x = np.mgrid[0:900, 0:1200]
    a = np.stack([x * 255 // 1200, y * 255 // 900, (x + y) * 255 // 2100], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95)
    from PIL.JpegImagePlugin import JpegImageFile
    drafts, draft = [], JpegImageFile.draft

    def spy(im, mode, size):
        drafts.append(draft(im, mode, size))
        return drafts[-1]
    monkeypatch.setattr(JpegImageFile, "draft", spy)
    drafted = cifar_like(buf.getvalue(), 64)  # from the file: decoded at 1/4 scale, 300x225
    assert drafts and drafts[0] is not None and drafts[0][1][2:] == (300, 225)  # it was reduced
    full = cifar_like(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 64)  # fully decoded first
    assert drafted.shape == full.shape == (3, 64, 64)
    assert (drafted.float() - full.float()).abs().mean() < 2
    assert cifar_like(rgb_image(50, 40), 96).shape == (3, 96, 96)
