"""The notebooks: a tagged, documented parameters cell first, and they run headless on synthetic data."""

import json
import re
from pathlib import Path

import nbformat
import papermill as pm
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))
TINY = {"01_explore_data": {"per_class": 1, "similar_pairs": 2},
        "02_augmentation_preview": {"image_size": 48, "draws": 3}}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean_with_a_documented_parameters_cell_first(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])
    for line in "".join(code[0]["source"]).splitlines():
        assert re.fullmatch(r"\w+: [\w\[\], |]+ = .+  # .+", line), f"parameter line without type or comment: {line}"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in TINY], ids=lambda p: p.stem)
def test_runs_headless_on_synthetic_data(path, tmp_path):
    out = tmp_path / path.name
    pm.execute_notebook(str(path), str(out), parameters={"dataset": "synthetic", "data_dir": str(tmp_path / "data"),
                                                         **TINY[path.stem]}, kernel_name="python3", progress_bar=False)
    nb = nbformat.read(out, as_version=4)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 3


def test_a_user_error_shows_as_one_message_in_the_notebook(tmp_path):
    out = tmp_path / "01.ipynb"
    with pytest.raises(pm.PapermillExecutionError):
        pm.execute_notebook(str(NOTEBOOKS[0]), str(out), parameters={"dataset": "cifar100", "data_dir": str(tmp_path)},
                            kernel_name="python3", progress_bar=False)
    errors = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "UserError"
    assert errors[0]["traceback"] == [f"UserError: {errors[0]['evalue']}"]
    assert "Looked for" in errors[0]["evalue"]
