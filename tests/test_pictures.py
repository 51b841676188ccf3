"""What a picture may cost (issue 29): each one's cost bounded from its header before it is paid,
in the one rule that `predict`, the web app and the training folders share; which formats each of
them opens. What each crafted picture costs is measured in benchmarks/bench_pictures.py."""

import numpy as np
import pytest
from PIL import Image

import hostile_pictures
from cifarlib.core.errors import UserError
from cifarlib.data import pictures
from cifarlib.serving.app import MAX_FILES, UploadApp


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return hostile_pictures.write(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("name", list(hostile_pictures.EXPECTED))
def test_each_crafted_upload_is_refused_in_one_line_or_read_small(hostile, name):
    data = hostile[name].read_bytes()
    if hostile_pictures.EXPECTED[name] == "refused":
        with pytest.raises(UserError) as e:
            pictures.decode(data, 160, formats=pictures.UPLOAD_FORMATS)
        message = str(e.value)
        assert "\n" not in message and len(message) < 300, message
    else:
        image = pictures.decode(data, 160, formats=pictures.UPLOAD_FORMATS)
        side = min(Image.open(hostile[name]).size)
        assert image.mode == "RGB" and min(side, 160) <= min(image.size) < max(2 * 160, side // 7)  # reduced first


def test_what_the_refusals_say(hostile):
    def said(name, formats=pictures.UPLOAD_FORMATS):
        with pytest.raises(UserError) as e:
            pictures.decode(hostile[name].read_bytes(), 160, formats=formats)
        return str(e.value)
    assert "7000x7000 pixels; a PNG may have at most 14,000,000" in said("png16-7000.png")
    assert "says it is 3,600,000,000 pixels, far above the limits here" in said("jpeg-claims-60000.jpg")
    assert "12000x8000 pixels; a JPEG (progressive) may have at most 40,000,000" in said("progressive-claims-12000.jpg")
    assert "says it is 1,600,000,000 pixels" in said("bmp-rle-claims-40000.bmp")
    for name in ("picture.eps", "picture.tif", "picture.psd", "text.png"):
        assert "not a picture in one of JPEG, PNG, WEBP, GIF, BMP" in said(name), name
    assert "empty" in said("empty.png") and "not a usable image" in said("truncated.jpg")
    assert "no image format recognised" in said("picture.eps", formats=None)  # never opened, anywhere


def test_predict_and_the_folders_read_any_format_pillow_decodes_by_itself(hostile):
    for name in hostile_pictures.UPLOADS_REFUSE_ONLY_AS_UPLOADS:
        assert pictures.cifar_like(hostile[name], 32).shape == (32, 32, 3)


def test_16_bit_and_transparent_pictures_keep_their_colours_through_the_reduction():
    gray = np.linspace(0, 65535, 2000 * 2400, dtype=np.uint16).reshape(2000, 2400)  # 4.8 MP: past REDUCE_ABOVE
    image = pictures.decode(Image.fromarray(gray), 64)
    assert 64 <= min(image.size) < 128 and abs(int(np.asarray(image)[0, 0, 0]) - 0) <= 2  # reduced, from 16 bits
    assert abs(int(np.asarray(image)[-1, -1, 0]) - 255) <= 2
    small = pictures.decode(Image.fromarray(gray[:300, :400]), 64)
    assert small.size == (400, 300)  # small enough to convert whole: the same input whatever min_side is asked
    for side in (640, 2400):  # converted whole, and reduced first
        clear = pictures.decode(Image.new("RGBA", (side, side), (255, 0, 0, 0)), 64)
        assert np.asarray(clear)[5, 5].tolist() == [255, 255, 255]  # transparent is white
        half = pictures.decode(Image.new("RGBA", (side, side), (255, 0, 0, 128)), 64)
        assert abs(int(np.asarray(half)[5, 5, 1]) - 127) <= 2


def test_an_exif_rotation_survives_the_reduction(tmp_path):
    wide = Image.new("RGB", (800, 400), (200, 0, 0))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: upright, the picture is tall
    wide.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert pictures.decode(tmp_path / "rotated.jpg", 64).size[0] < pictures.decode(tmp_path / "rotated.jpg", 64).size[1]


class Predictor:
    store_size = 32

    def predict_and_explain(self, seen, top_k):
        from cifarlib.serving.prediction import Prediction
        return Prediction([("a", 1.0)], None), np.zeros((32, 32), np.float32)


def test_one_upload_reads_at_most_max_files_and_says_so():
    png = pictures.Image.new("RGB", (40, 40))
    import io
    buf = io.BytesIO()
    png.save(buf, "PNG")
    app = UploadApp(Predictor())
    from test_predict import upload
    app.upload.value = upload(*[(f"{i}.png", buf.getvalue()) for i in range(MAX_FILES + 5)])
    shown = app.results.children
    assert len(shown) == MAX_FILES + 1 and "5 more file(s)" in shown[-1].value and "at most 16" in shown[-1].value
