"""Deploy and explain: the ONNX export checked against PyTorch, and Grad-CAM maps that can fail.

Two checkpoints: the suite's tiny ResNet-18 (`trained_checkpoint`, CIFAR-style at 32 px) and,
trained here, timm's smallest EfficientNet (`test_efficientnet`: timm's EfficientNet class, as
`tf_efficientnet_lite0` is, with a third of its layers, so that exports take seconds) on a folder
of pictures stored at 64 px, whose classes differ only by the colour of a small patch at a fixed
place (24 px square, a seventh of the picture), trained with no augmentation at 256 px, where its
last feature map is 8x8. (At 128 px, a 4x4 map, Grad-CAM spread the evidence over the cells next
to the patch's: 14-57% of the map lay on the patch, for patches from a sixteenth to a quarter of the picture.)
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlib.core.errors import UserError
from cifarlib.data import preprocess
from cifarlib.data.synthetic import make_images
from cifarlib.model import GROUPS
from cifarlib.model.inference import logits
from cifarlib.training.config import Stage, make_config
from cifarlib.serving import export
from cifarlib.serving.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples" / "cifar100"
STORE, PATCH = 64, (slice(8, 32), slice(8, 32))  # rows, columns of the patch in a stored picture
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 40, 230)}


def patch_picture(colour, seed: int) -> np.ndarray:
    """Grey noise, the same for every class, and the class's coloured patch at PATCH."""
    a = np.random.default_rng(seed).integers(60, 196, (STORE, STORE, 1), dtype=np.uint8).repeat(3, 2)
    a[PATCH] = colour
    return a


@pytest.fixture(scope="module")
def patch_checkpoint(tmp_path_factory):
    """best.pt of test_efficientnet trained on the patch folder (store_size 64, 256 px, no augmentation)."""
    from cifarlib.training import train

    root = tmp_path_factory.mktemp("patch")
    for k, (name, colour) in enumerate(COLOURS.items()):
        (root / "pictures" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(patch_picture(colour, 100 * k + i)).save(root / "pictures" / name / f"{i}.png")
    cfg = make_config("cpu", dataset="folder", data_dir=str(root / "pictures"), cache_dir=str(root / "cache"),
                      store_size=STORE, backbone="test_efficientnet", weights="none", image_size=256, batch_size=9,
                      epochs=4, augmentation="none", stages=(Stage("all", 1, GROUPS, (1e-2,) * len(GROUPS), warmup=0.2),),
                      val_fraction=0.25, checkpoint_dir=str(root / "ckpt"), run_name="patch", device="cpu")
    run = train.prepare(cfg)
    for _ in train.epochs(run):
        pass
    return run.dir / "best.pt"


@pytest.fixture(scope="module")
def patch_predictor(patch_checkpoint):
    return Predictor.from_checkpoint(patch_checkpoint, device="cpu")


def test_the_map_lies_on_the_patch_that_tells_the_classes_apart(patch_predictor):
    pictures = [patch_picture(colour, 10_000 + i) for i, colour in enumerate(COLOURS.values())]
    predicted = [p.top[0][0] for p in patch_predictor.predict(pictures)]
    assert predicted == list(COLOURS)  # it learnt the patch
    maps = patch_predictor.explain(pictures)
    share = [m[PATCH].sum() / m.sum() for m in maps]
    area = (24 * 24) / STORE**2  # what a map spread evenly would put there: 0.14
    # measured: 0.55-0.64; 0.47-0.66 since issue 30 cached the training files in random order (other batches)
    assert all(s > 0.4 for s in share), (share, area)  # 3 times an even spread, at least


def test_explain_takes_what_predict_takes_and_agrees_with_predict(patch_predictor, tmp_path):
    picture = patch_picture(COLOURS["green"], 7)
    Image.fromarray(picture).save(tmp_path / "p.png")
    one = patch_predictor.explain(tmp_path / "p.png")
    assert one.shape == (STORE, STORE) and one.dtype == np.float32 and 0 <= one.min() and one.max() <= 1
    assert one.max() == pytest.approx(1, abs=1e-3)
    both = patch_predictor.explain([picture, Image.fromarray(picture)])
    assert isinstance(both, list) and len(both) == 2 and all(np.allclose(m, one, atol=1e-5) for m in both)
    other = patch_predictor.explain(picture, class_index=0)  # "red": not this picture's class
    assert not np.allclose(other, one, atol=1e-2)
    prediction, heat = patch_predictor.predict_and_explain(picture, top_k=3)
    expected = patch_predictor.predict(picture, top_k=3)
    assert [n for n, _ in prediction.top] == [n for n, _ in expected.top]
    assert [p for _, p in prediction.top] == pytest.approx([p for _, p in expected.top], abs=1e-5)
    assert np.allclose(heat, one, atol=1e-5)
    with pytest.raises(UserError, match="class_index must be a class number from 0 to 2"):
        patch_predictor.explain(picture, class_index=3)


def samples(size: int) -> torch.Tensor:
    """The 20 real CIFAR-100 test pictures (synthetic ones without ../shared) at `size` px, uint8 NCHW."""
    paths = sorted(SAMPLES.glob("*.png"))
    if paths:
        return torch.stack([preprocess.cifar_like(p, size) for p in paths])
    return torch.stack([preprocess.cifar_like(im.permute(1, 2, 0).numpy(), size)
                        for im in make_images(torch.arange(20) * 5, seed=4)])


def session(path: Path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def patch_onnx(patch_checkpoint, tmp_path_factory):
    """The patch model exported with its class activation maps (--cams), as model.onnx in a folder of its own."""
    return export.export(patch_checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx", cams=True)


@pytest.mark.parametrize("which", ["resnet18", "efficientnet_folder_64"])
def test_onnx_agrees_with_pytorch_in_batches_of_1_and_7(which, trained_checkpoint, patch_checkpoint, patch_onnx, tmp_path):
    if which == "resnet18":
        ckpt_path, (out, sidecar) = trained_checkpoint, export.export(trained_checkpoint, tmp_path / "m.onnx")
        assert sidecar.name == "m.onnx.json"
    else:
        ckpt_path, (out, sidecar) = patch_checkpoint, patch_onnx
    meta = json.loads(sidecar.read_text())
    p = Predictor.from_checkpoint(ckpt_path, device="cpu")
    assert meta["layout"] == "NHWC" and meta["dtype"] == "uint8"
    assert meta["classes"] == p.classes and meta["store_size"] == p.store_size == (32 if which == "resnet18" else 64)
    assert meta["backbone"] == torch.load(ckpt_path, weights_only=True)["backbone"] and meta["version"] == "0.1.0"
    assert 0 <= meta["val_acc"] <= 1
    images = samples(p.store_size)
    expected = logits(p.model, images, p.size, p.mean, p.std)
    s = session(out)
    for batch in (1, 7):
        for start in range(0, len(images), batch):
            got = torch.from_numpy(s.run(None, {"images": images[start:start + batch].permute(0, 2, 3, 1).numpy()})[0])
            want = expected[start:start + batch]
            assert got.shape == want.shape and torch.equal(got.argmax(1), want.argmax(1))
            assert (got - want).abs().max() <= 1e-3


def test_exported_cams_are_the_grad_cam_maps(patch_onnx, patch_predictor):
    """--cams: relu, scaled and resized, each class's map is what Predictor.explain gives, without torch."""
    out, sidecar = patch_onnx
    assert json.loads(sidecar.read_text())["outputs"] == ["logits", "cams"]
    pictures = np.stack([patch_picture(c, 50 + i) for i, c in enumerate(COLOURS.values())])
    scores, cams = session(out).run(None, {"images": pictures})
    top = scores.argmax(1)
    for b, picture in enumerate(pictures):
        cam = np.maximum(cams[b, top[b]], 0)
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
        cam = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=(STORE, STORE), mode="bilinear")[0, 0]
        assert np.abs(cam.numpy() - patch_predictor.explain(picture)).max() < 1e-3


def test_the_web_apps_onnx_predictor_gives_explains_maps(patch_onnx, patch_predictor):
    """What the web app's pages run (cifarlib.serving.onnxpredict, without torch), on an 8x8 map: Predictor's
    predictions and Grad-CAM maps, for every picture of a batch."""
    from cifarlib.serving.onnxpredict import OnnxPredictor
    pictures = [patch_picture(c, 70 + i) for i, c in enumerate(COLOURS.values())]
    got = OnnxPredictor.from_export(patch_onnx[0]).predict_and_explain(pictures, top_k=3)
    for (p, heat), (q, want) in zip(got, patch_predictor.predict_and_explain(pictures, top_k=3)):
        assert [n for n, _ in p.top] == [n for n, _ in q.top] and np.allclose([v for _, v in p.top], [v for _, v in q.top], atol=1e-4)
        assert heat.shape == (STORE, STORE) and 0 <= heat.min() and heat.max() <= 1 and np.abs(heat - want).max() < 1e-3


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        export.main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def test_export_errors_are_one_line_and_exit_2(trained_checkpoint, tmp_path, capsys, monkeypatch):
    code, err = run_cli([tmp_path / "none.pt"], capsys)
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    code, err = run_cli([tmp_path / "foreign.pt"], capsys)
    assert code == 2 and "not a cifarlib checkpoint" in err
    (tmp_path / "file").write_text("a file where a folder should be")
    for out in (tmp_path / "file" / "m.onnx", Path("/proc/cifarlib/m.onnx")):
        code, err = run_cli([trained_checkpoint, "--out", out], capsys)
        assert code == 2 and f"cannot write {out}" in err and "choose another --out" in err
    assert not list(tmp_path.glob("*.onnx*"))
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, err = run_cli([trained_checkpoint], capsys)
    assert code == 2 and "pip install onnxruntime" in err and "Traceback" not in err


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Export and deploy"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_deploy_snippet_predicts_as_cifarlib_does(patch_onnx, patch_predictor, monkeypatch, capsys):
    folder = patch_onnx[0].parent  # model.onnx and model.onnx.json, as the snippet names them
    Image.fromarray(patch_picture(COLOURS["blue"], 3)).resize((300, 200)).save(folder / "photo.jpg", quality=95)
    monkeypatch.chdir(folder)
    capsys.readouterr()
    exec(readme_snippet(), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # top 5 of 3 classes
    expected = patch_predictor.predict(folder / "photo.jpg", top_k=3).top
    assert [line.split()[0] for line in lines] == [name for name, _ in expected]
    assert [float(line.split()[1].rstrip("%")) for line in lines] == pytest.approx([100 * p for _, p in expected], abs=0.06)


def checkpoint_of(backbone: str, trained_checkpoint: Path, folder: Path, **model_kw) -> Path:
    """The suite's checkpoint with another backbone's (untrained) weights: enough to export."""
    from cifarlib.model import build_model, checkpoints
    ckpt = checkpoints.load(trained_checkpoint)
    model = build_model(backbone, len(ckpt["classes"]), "none", **model_kw)
    path = folder / f"{backbone}.pt"
    checkpoints.save({**ckpt, "backbone": backbone, "model": model.state_dict(),
                      "config": {**ckpt["config"], "backbone": backbone}}, path)
    return path


@pytest.mark.parametrize("backbone", ["mobilenetv3_small_050", "test_vit"])
def test_cams_of_a_head_that_is_not_pooling_and_one_linear_layer_are_refused_in_one_line(
        backbone, trained_checkpoint, tmp_path, capsys):
    """MobileNetV3's head has a convolution after its pooling, a ViT's features are tokens: both
    once crashed with a traceback."""
    code, err = run_cli([checkpoint_of(backbone, trained_checkpoint, tmp_path), "--cams"], capsys)
    assert code == 2 and "--cams needs a head of global average pooling" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx"))


def test_the_parity_check_covers_the_cams_and_fails_in_one_line(trained_checkpoint, tmp_path, capsys, monkeypatch):
    import onnxruntime as ort
    real = ort.InferenceSession.run

    def wrong_cams(self, *a, **k):
        out = real(self, *a, **k)
        return [out[0], out[1] * 1.01] if len(out) > 1 else out
    monkeypatch.setattr(ort.InferenceSession, "run", wrong_cams)
    code, err = run_cli([trained_checkpoint, "--cams", "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and "the cams differ by 1.00e-02" in err and "nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_and_a_sidecar_of_different_exports_are_refused(patch_onnx, tmp_path):
    """The sidecar names its model's hash: a new model beside an old sidecar (an export cut short
    between the two files) would show another model's class names without a word."""
    import shutil

    from cifarlib.serving.onnxpredict import OnnxPredictor
    model, sidecar = patch_onnx
    meta = json.loads(sidecar.read_text())
    assert len(meta["sha256"]) == 64
    shutil.copy(model, tmp_path / "model.onnx")
    (tmp_path / "model.onnx.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(UserError, match="is not the model its sidecar model.onnx.json describes"):
        OnnxPredictor.from_export(tmp_path / "model.onnx")


def test_explain_takes_a_class_number_as_numpy_gives_it(patch_predictor):
    picture = patch_picture(COLOURS["red"], 5)
    scores = np.asarray([p[1] for p in patch_predictor.predict(picture, top_k=3).top])
    by_int = patch_predictor.explain(picture, class_index=2)
    assert np.array_equal(patch_predictor.explain(picture, class_index=np.int64(2)), by_int)
    assert np.array_equal(patch_predictor.explain([picture], class_index=np.array([2]))[0], by_int)
    with pytest.raises(UserError, match="class_index must be a class number from 0 to 2"):
        patch_predictor.explain(picture, class_index=2.5)
    assert scores.size == 3
