"""The web app's page without torch: the exported model on onnxruntime (`cifarlib.serving.onnxpredict`),
the maps and overlays in numpy (`cifarlib.evaluation.heatmap`), pictures by the same rule (`cifarlib.data.pictures`),
giving what the PyTorch page gives."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cifarlib.core.errors import UserError
from cifarlib.evaluation import heatmap
from cifarlib.serving import serve
from cifarlib.serving.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples" / "cifar100"


@pytest.mark.parametrize("h,w,size", [(1, 1, 32), (3, 3, 32), (7, 7, 32), (3, 3, 88), (8, 8, 64), (5, 4, 17), (40, 40, 32)])
def test_the_bilinear_resize_is_torchs(h, w, size):
    a = np.random.default_rng(h * w).standard_normal((h, w)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(a)[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    assert np.abs(heatmap.resize_bilinear(a, size) - want.numpy()).max() < 1e-5


def test_a_cam_becomes_grad_cams_map_as_torchcam_and_explain_scale_it():
    rng = np.random.default_rng(0)
    for cam in (rng.standard_normal((4, 4)).astype(np.float32), np.full((3, 3), 2.5, np.float32), -np.ones((2, 2), np.float32)):
        t = torch.from_numpy(cam).relu()
        t = t - t.min()
        t = t / (t.max() + 1e-8)
        want = F.interpolate(t[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
        got = heatmap.cam_map(cam, 32)
        assert got.dtype == np.float32 and got.shape == (32, 32) and np.abs(got - want.numpy()).max() < 1e-5
    assert not heatmap.cam_map(np.ones((3, 3)), 32).any()  # an even map says nothing: all zeros, as explain's


@pytest.fixture(scope="module")
def exported(app_model):
    """The suite's checkpoint exported for the pages (conftest's `app_model`), as the app serves it."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    return app_model


def pictures():
    real = sorted(SAMPLES.glob("*.png"))[:7]
    if real:
        return real
    from cifarlib.data.synthetic import make_images
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in make_images(torch.arange(0, 70, 10), seed=1)]


def test_the_onnx_page_predicts_and_explains_as_the_pytorch_one(exported, trained_checkpoint):
    from cifarlib.serving.onnxpredict import OnnxPredictor
    onnx, torch_ = OnnxPredictor.from_export(exported), Predictor.from_checkpoint(trained_checkpoint, device="cpu")
    assert onnx.classes == torch_.classes and onnx.store_size == torch_.store_size
    for got, want in zip(onnx.predict_and_explain(pictures(), top_k=5), torch_.predict_and_explain(pictures(), top_k=5)):
        assert [n for n, _ in got[0].top] == [n for n, _ in want[0].top] and got[0].superclass == want[0].superclass
        assert np.abs(np.array([p for _, p in got[0].top]) - [p for _, p in want[0].top]).max() < 1e-4
        assert got[1].shape == want[1].shape and np.abs(got[1] - want[1]).max() < 1e-3
    assert onnx.predict(pictures()[0], top_k=3).top == onnx.predict_and_explain(pictures()[0], top_k=3)[0].top


def test_the_upload_app_on_onnxruntime_shows_what_it_shows_on_pytorch(exported, trained_checkpoint):
    pytest.importorskip("ipywidgets", reason="the upload widget needs ipywidgets")
    from cifarlib.serving.app import UploadApp, page_predictor
    picture = pictures()[0]
    data = picture.read_bytes() if isinstance(picture, Path) else png(picture)
    boxes = [UploadApp(page_predictor(str(trained_checkpoint), m)).show_file("cat.png", data) for m in ("", str(exported))]
    captions = [b.children[0].children[0].value for b in boxes]
    charts = [b.children[1].value for b in boxes]
    assert captions[0] == captions[1] and charts[0] == charts[1]  # names and probabilities, to the 0.1% shown
    views = [[np.asarray(Image.open(io.BytesIO(w.value))) for w in b.children[0].children[1].children] for b in boxes]
    assert all(np.array_equal(a, b) for a, b in zip(views[0][:2], views[1][:2]))  # the picture, the image it sees
    assert np.abs(views[0][2].astype(int) - views[1][2]).max() <= 4  # where it looked: the same, to rounding


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_a_page_on_onnxruntime_never_imports_torch(exported, tmp_path):
    """What notebook 05 runs in a page that `make app` serves, in a fresh process."""
    pytest.importorskip("ipywidgets", reason="the upload widget needs ipywidgets")
    code = f"""
import sys
from cifarlib.core import errors
from cifarlib.serving.app import UploadApp, page_predictor
errors.show_errors_briefly()
app = UploadApp(page_predictor("", {str(exported)!r}))
box = app.show_file("p.png", open({str(tmp_path / 'p.png')!r}, "rb").read())
assert "cifar-result" in box._dom_classes, box
print("torch" in sys.modules)
"""
    Image.new("RGB", (300, 200), (200, 40, 40)).save(tmp_path / "p.png")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "False"


def test_a_missing_sidecar_or_maps_are_clear_errors(exported, tmp_path):
    from cifarlib.serving.onnxpredict import OnnxPredictor
    with pytest.raises(UserError, match=r"cannot read .*model.onnx.json.*export the checkpoint again"):
        OnnxPredictor.from_export(tmp_path / "model.onnx")
    shutil.copy(exported, tmp_path / "model.onnx")
    meta = json.loads(exported.with_name(exported.name + ".json").read_text())
    (tmp_path / "model.onnx.json").write_text(json.dumps({**meta, "outputs": ["logits"]}))  # exported without --cams
    p = OnnxPredictor.from_export(tmp_path / "model.onnx")
    assert p.predict(pictures()[0]).top
    with pytest.raises(UserError, match="exported without its activation maps: export it again with --cams"):
        p.predict_and_explain(pictures()[0])
