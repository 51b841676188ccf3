"""The predictor, its CLI and the upload widget, on a checkpoint the trainer wrote."""

import html
import io
from datetime import datetime, timezone
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlib.core.errors import UserError
from cifarlib.data import preprocess
from cifarlib.data.synthetic import make_images
from cifarlib.model import checkpoints
from cifarlib.serving.predict import Predictor

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples" / "cifar100"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(trained_checkpoint):
    return Predictor.from_checkpoint(trained_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def picture():
    return Image.fromarray(make_images(torch.tensor([53]), seed=3)[0].permute(1, 2, 0).numpy())


def test_predicts_from_path_bytes_pil_and_array_alike(predictor, picture, tmp_path):
    picture.save(tmp_path / "p.png")
    results = [predictor.predict(x, top_k=5) for x in (tmp_path / "p.png", png_bytes(picture), picture, np.asarray(picture))]
    assert all(r == results[0] for r in results)
    top = results[0].top
    assert len(top) == 5 and [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    assert all(name in predictor.classes for name, _ in top) and sum(p for _, p in top) <= 1 + 1e-6
    coarse = predictor.fine_to_coarse[predictor.classes.index(top[0][0])]
    assert results[0].superclass == predictor.superclasses[coarse]
    batch = predictor.predict([picture, picture.rotate(90)], top_k=3)
    single = predictor.predict(picture, top_k=3)
    assert len(batch) == 2 and [n for n, _ in batch[0].top] == [n for n, _ in single.top]
    assert [p for _, p in batch[0].top] == pytest.approx([p for _, p in single.top], rel=1e-4)


def test_predictions_agree_with_the_evaluation_path(predictor, trained_checkpoint):
    """A 32x32 image predicted from a file gets the same probabilities as in evaluation."""
    from cifarlib.data.datasets import Split
    from cifarlib.model.inference import predict_split
    img = make_images(torch.tensor([7]), seed=9)
    ckpt = checkpoints.load(trained_checkpoint)
    probs = predict_split(predictor.model, Split(img, torch.tensor([7])), ckpt["image_size"], ckpt["mean"], ckpt["std"])
    top = predictor.predict(Image.fromarray(img[0].permute(1, 2, 0).numpy()), top_k=1).top[0]
    assert top[0] == ckpt["classes"][probs.argmax()] and top[1] == pytest.approx(probs.max().item(), rel=1e-5)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples/cifar100 is not beside the project")
def test_real_cifar_pictures_go_through(predictor):
    for path in sorted(SAMPLES.glob("*.png"))[:3]:
        assert len(predictor.predict(path).top) == 5


def bad_inputs(picture):
    full = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)))
    return {"not an image": b"GIF89a? no, just text pretending", "truncated": full[: len(full) // 3],
            "empty": b"", "huge": png_bytes(Image.new("1", (8000, 8000)))}


@pytest.mark.parametrize("kind", ["not an image", "truncated", "empty", "huge"])
def test_bad_pictures_are_clear_errors(predictor, picture, kind):
    assert 8000 * 8000 > preprocess.MAX_PIXELS["PNG"]  # "huge" is over the limit as it stands
    with pytest.raises(UserError, match="may have at most" if kind == "huge" else "usable image"):
        predictor.predict(bad_inputs(picture)[kind])


def test_bad_checkpoints_are_clear_errors(tmp_path, trained_checkpoint):
    with pytest.raises(UserError, match="does not exist"):
        Predictor.from_checkpoint(tmp_path / "none.pt")
    (tmp_path / "cut.pt").write_bytes(trained_checkpoint.read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        Predictor.from_checkpoint(tmp_path / "cut.pt")
    ckpt = checkpoints.load(trained_checkpoint)
    ckpt["backbone"] = "resnet34"  # weights of a resnet18 under another architecture's name
    checkpoints.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not hold resnet34 weights"):
        Predictor.from_checkpoint(tmp_path / "other.pt")


def test_cli_prints_a_table_per_image_and_fails_on_bad_ones(trained_checkpoint, picture, tmp_path, capsys):
    """One real process (the module's entry point, its exit status, no traceback); the other
    cases call the same `main` in this process."""
    from cifarlib.serving.predict import main
    picture.save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    good, bad = str(tmp_path / "good.png"), str(tmp_path / "bad.jpg")
    done = subprocess.run([sys.executable, "-m", "cifarlib.predict", str(trained_checkpoint), good, bad, "--top-k", "3",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "good.png" in done.stdout and "  3. " in done.stdout and "  4. " not in done.stdout
    assert "superclass:" in done.stdout
    assert "bad.jpg: not a usable image" in done.stderr and "Traceback" not in done.stderr
    main([str(trained_checkpoint), good])  # all usable: no exit status to raise
    out = capsys.readouterr().out
    assert "good.png" in out and "  5. " in out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "no.pt"), good])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def upload(*files):
    """FileUpload.value as ipywidgets 8 delivers it: a tuple of dicts with memoryview content."""
    return tuple({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                  "last_modified": datetime(2026, 11, 28, tzinfo=timezone.utc)} for name, data in files)


def upload_app():
    """The widget's class; its tests skip where ipywidgets is not installed (a bare GPU machine)."""
    pytest.importorskip("ipywidgets", reason="the upload widget needs ipywidgets")
    from cifarlib.serving.app import UploadApp
    return UploadApp


def test_widget_shows_predictions_and_a_message_per_bad_file(predictor, picture):
    app = upload_app()(predictor, top_k=5)
    import ipywidgets as widgets
    app.upload.value = upload(("cat.png", png_bytes(picture)), ("broken.png", b"\x89PNG broken"), ("empty.webp", b""))
    good, broken, empty = app.results.children
    assert isinstance(good, widgets.HBox)
    caption = good.children[0].children[0].value
    assert "cat.png" in caption and predictor.predict(picture).top[0][0] in caption and "superclass" in caption
    chart = good.children[1].value  # the bar chart, its names and probabilities as text
    assert all(html.escape(name) in chart and f"{prob:.1%}" in chart for name, prob in predictor.predict(picture).top)
    assert "32 px image the model sees" in caption and "cifar-result" in good._dom_classes
    assert "broken.png" in broken.value and "not a usable image" in broken.value
    assert "empty.webp" in empty.value and "empty" in empty.value
    assert app.upload.value == ()  # the uploaded bytes are not kept


def test_pil_syntax_errors_for_broken_pngs_are_clear_errors(predictor, picture, monkeypatch):
    def broken(*a, **k):
        raise SyntaxError("broken PNG file (chunk b'\\x00\\x00')")  # what PIL raises for some damage
    monkeypatch.setattr(preprocess.Image, "open", broken)
    with pytest.raises(UserError, match="not a usable image.*broken PNG"):
        predictor.predict(png_bytes(picture))


def test_widget_survives_unexpected_errors_and_always_clears_the_upload(predictor, picture, monkeypatch):
    app = upload_app()(predictor)
    monkeypatch.setattr(predictor, "predict_and_explain", lambda *a, **k: 1 / 0)
    app.upload.value = upload(("odd.png", png_bytes(picture)))
    (msg,) = app.results.children
    assert "odd.png" in msg.value and "ZeroDivisionError" in msg.value and app.upload.value == ()
    with pytest.raises(UserError, match="top_k must be at least 1"):
        Predictor.predict(predictor, picture, top_k=0)


def test_widget_refuses_a_file_over_20_mb_on_its_size_and_still_predicts_the_others(predictor, picture):
    UploadApp = upload_app()
    from cifarlib.serving import app as app_module
    big = png_bytes(picture) + bytes(app_module.MAX_BYTES)  # a PNG that decodes: only its size is wrong
    assert predictor.predict(big).top == predictor.predict(picture).top
    app = UploadApp(predictor, top_k=3)
    app.upload.value = upload(("big.png", big), ("cat.png", png_bytes(picture)))
    refused, good = app.results.children
    assert "big.png" in refused.value and "above the limit of 20 MB" in refused.value
    assert "cifar-result" in good._dom_classes and app.upload.value == ()


def jpeg_bytes(w: int, h: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("w,h,thumb", [(400, 300, (160, 120)), (1600, 1200, (160, 120)), (90, 120, (90, 120))])
def test_widget_decodes_each_picture_once_and_its_thumbnail_is_sharp(predictor, monkeypatch, w, h, thumb):
    """One decode per picture (not one to predict and one to show), at a scale that leaves the
    thumbnail its full 160 px: cifar_like's reduced decode for 32 px made a 400x300 JPEG's 100x75."""
    app = upload_app()(predictor, top_k=3)
    data = jpeg_bytes(w, h)
    opened = []
    real_open = preprocess.Image.open  # the PIL module: every decode of the app starts here
    monkeypatch.setattr(preprocess.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    app.upload.value = upload(("photo.jpg", data))
    decodes = len(opened)
    (good,) = app.results.children
    shown, seen = good.children[0].children[1].children[:2]
    assert Image.open(io.BytesIO(shown.value)).size == thumb
    assert Image.open(io.BytesIO(seen.value)).size == (128, 128)  # 32 px, enlarged 4x
    assert "cifar-result" in good._dom_classes and decodes == 1


def test_widget_shows_where_the_model_looked_from_the_same_forward_pass(predictor, picture, monkeypatch):
    """Beside the image the model sees, the map of the top class; one forward pass, not a second one."""
    import ipywidgets as widgets
    calls = []
    real = predictor.model.forward
    monkeypatch.setattr(predictor.model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    box = upload_app()(predictor, top_k=3).show_file("cat.png", png_bytes(picture))
    caption, previews = box.children[0].children
    views = [w for w in previews.children if isinstance(w, widgets.Image)]
    assert [w._dom_classes for w in views] == [("cifar-picture",), ("cifar-seen",), ("cifar-looked",)]
    top = predictor.predict(picture).top[0][0]
    assert f"where it looked for {html.escape(top)}" in caption.value and len(calls) == 1 + 1  # + predict's here
    looked = Image.open(io.BytesIO(views[2].value))
    assert looked.size == (128, 128)
    plain = upload_app()(predictor, explain=False).show_file("cat.png", png_bytes(picture))
    assert len(plain.children[0].children[1].children) == 2 and "where it looked" not in plain.children[0].children[0].value
