"""The notebooks: a tagged, documented parameters cell first, and they run headless on synthetic data."""

import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat and papermill")
pm = pytest.importorskip("papermill", reason="the notebook tests need nbformat and papermill")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))
assert len(NOTEBOOKS) == 6, NOTEBOOKS
TINY = {"01_explore_data": {"per_class": 1, "similar_pairs": 2},
        "02_augmentation_preview": {"image_size": 48, "draws": 3},
        "03_train": {"preset": "auto", "backbone": "test_resnet", "weights": "none", "image_size": 32, "epochs": 3,
                     "max_train_samples": 400, "max_eval_samples": 100, "run_name": "nb", "device": "cpu",
                     "data_on": "host"}}  # the pictures off the device: gathered by the background thread
OUTPUT_DIRS = {"03_train": "checkpoint_dir"}  # notebooks that write, and where to


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean_with_a_documented_parameters_cell_first(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])
    lines = "".join(code[0]["source"]).splitlines()
    for line in lines:
        assert re.fullmatch(r"\w+: (\w+|\"Optional\[\w+\]\") = .+  # .+", line), f"parameter line without type or comment: {line}"
    inferred = pm.inspect_notebook(str(path))  # what `papermill --help-notebook` shows
    assert list(inferred) == [line.split(":")[0] for line in lines]
    assert all(p["help"] and p["inferred_type_name"] != "None" for p in inferred.values())


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in TINY], ids=lambda p: p.stem)
def test_runs_headless_on_synthetic_data(path, tmp_path, notebook_kernel, capsys):
    out = tmp_path / path.name
    where = {OUTPUT_DIRS[path.stem]: str(tmp_path / "out")} if path.stem in OUTPUT_DIRS else {}
    notebook_kernel.run(path, out, dataset="synthetic", data_dir=str(tmp_path.parent / "data"),  # written once a session
                        stream=path.stem == "03_train", **where, **TINY[path.stem])
    nb = nbformat.read(out, as_version=4)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= (1 if path.stem == "03_train" else 3)
    if path.stem == "03_train":
        assert sorted(p.name for p in (tmp_path / "out" / "nb").iterdir()) == [
            "best.pt", "config.json", "history.csv", "last.pt", "loss_curves.png"]
        lines = [line for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "stream"
                 for line in o["text"].splitlines() if line.strip()]
        epochs = [line for line in lines if line.startswith("epoch ")]
        assert [line.split(" [")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
        assert len(lines) - len(epochs) <= 6, lines  # one plain line per epoch, and a few others
        # what make train shows: what the cells print, as it comes, and none of their tables and figures
        streamed = capsys.readouterr()
        assert streamed.err.startswith("preset=auto: no CUDA GPU (training on cpu), so the cpu preset.\n")
        shown = streamed.out.splitlines()
        assert shown[0].startswith("device plan: cpu, fp32") and shown[3:6] == epochs and len(shown) == 8, shown
        assert shown[-1] == f"run files: {tmp_path / 'out' / 'nb'}"
        tables = ("peak learning rates", "lr_stem")  # words of the stages' table and of the history's
        assert not [word for word in tables if word in streamed.out + streamed.err]


def test_a_user_error_shows_as_one_message_in_the_notebook(tmp_path, notebook_kernel):
    out = tmp_path / "01.ipynb"
    with pytest.raises(pm.PapermillExecutionError):
        notebook_kernel.run(NOTEBOOKS[0], out, dataset="cifar100", data_dir=str(tmp_path))
    errors = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "UserError"
    assert errors[0]["traceback"] == [f"UserError: {errors[0]['evalue']}"]
    assert "Looked for" in errors[0]["evalue"]


def outputs_of(path):
    return [o for c in nbformat.read(path, as_version=4).cells for o in c.get("outputs", [])]


def test_evaluate_notebook_on_a_checkpoint_the_suite_trained(trained_checkpoint, tmp_path, notebook_kernel):
    out = tmp_path / "04.ipynb"
    notebook_kernel.run(NOTEBOOKS[3], out, checkpoint=str(trained_checkpoint), device="cpu", max_samples=300,
                        data_dir=str(trained_checkpoint.parents[2] / "data"))
    images = sum("image/png" in o.get("data", {}) for o in outputs_of(out))
    assert images == 6
    saved = {p.name for p in trained_checkpoint.parent.glob("*.png")}
    assert {"confusion.png", "superclass_confusion.png", "per_class_accuracy.png", "confident_mistakes.png",
            "reliability.png", "training_curves.png"} <= saved
    assert (trained_checkpoint.parent / "metrics.json").is_file()


def test_inference_notebook_headless_with_a_demo_image(trained_checkpoint, tmp_path, notebook_kernel):
    out = tmp_path / "05.ipynb"
    notebook_kernel.run(NOTEBOOKS[4], out, checkpoint=str(trained_checkpoint),
                        demo_image=str(NOTEBOOKS[0].parent / "demo_image.png"), top_k=3)
    text = "".join(o.get("text", "") for o in outputs_of(out))
    assert "demo_image.png" in text and "  3. " in text and "superclass:" in text
    widget = [o for o in outputs_of(out) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widget) == 1
