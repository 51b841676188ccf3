"""python -m cifarlib.notebook: a notebook run headless, a user's mistake shown as its message alone."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook runner needs nbformat and papermill")
pm = pytest.importorskip("papermill", reason="the notebook runner needs nbformat and papermill")

from cifarlib.core import notebook  # noqa: E402
from cifarlib.core.errors import UserError  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_make_trains_notebook_with_no_data_and_no_network_gives_the_message_alone(notebook_kernel, tmp_path):
    """Notebook 03, as `make train` runs it; there is no network here, so the download fails at once."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "train.ipynb"
    with pytest.raises(UserError) as e:
        notebook.run(NOTEBOOKS / "03_train.ipynb", out, {"dataset": "cifar100", "data_dir": str(tmp_path / "empty"),
                     "checkpoint_dir": str(tmp_path / "ckpt"), "weights": "none", "device": "cpu"},
                     progress_bar=False, km=notebook_kernel.km)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("CIFAR-100 was not found, and cannot resolve www.cs.toronto.edu")
    assert lines[1:3] == ["Looked for:", f"  the extracted folder  {tmp_path / 'empty'}/cifar-100-python/"]
    assert "Traceback" not in str(e.value) and "\x1b[" not in str(e.value)  # papermill's report left out
    errors = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert [o["ename"] for o in errors] == ["UserError"]  # the executed copy is kept, with the error in its cell


def tiny_notebook(path: Path, code: str) -> Path:
    """A notebook of two cells that imports nothing heavy: its kernel starts in about a second."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb.cells = [nbformat.v4.new_code_cell("x: int = 1  # a number\ny: str = 'text'  # a text",
                                          metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)
    return path


def test_the_command_prints_a_user_error_alone_and_exits_2(tmp_path, capfd):
    src = tiny_notebook(tmp_path / "nb.ipynb", "from cifarlib.core.errors import UserError, show_errors_briefly\n"
                        "show_errors_briefly()\nraise UserError(f'no data in {y};\\nlook there')")
    with pytest.raises(SystemExit) as e:
        notebook.main([str(src), str(tmp_path / "out.ipynb"), "-p", "y", "data/", "--no-progress-bar"])
    err = capfd.readouterr().err
    assert e.value.code == 2
    assert err.endswith("python -m cifarlib.notebook: error: no data in data/;\nlook there\n") and err.count("error") == 1
    assert "Traceback" not in err and "PapermillExecutionError" not in err and "---" not in err


def test_a_bug_in_a_cell_keeps_its_traceback_and_parameters_are_read_as_papermill_reads_them(tmp_path):
    src = tiny_notebook(tmp_path / "nb.ipynb", "print(repr(x), repr(y))\n1 / x")
    with pytest.raises(pm.PapermillExecutionError, match="ZeroDivisionError"):  # not a UserError: all of it
        notebook.main([str(src), str(tmp_path / "out.ipynb"), "-p", "x", "0", "-r", "y", "True", "--no-progress-bar"])
    text = "".join(o.get("text", "") for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
                   for o in c.get("outputs", []))
    assert "0 'True'" in text


def test_a_parameter_the_notebook_lacks_or_a_missing_notebook_is_refused_before_anything_runs(tmp_path):
    src = tiny_notebook(tmp_path / "nb.ipynb", "raise SystemExit('must not run')")
    with pytest.raises(UserError, match=r"nb.ipynb has no parameter epoch; its parameters are x, y \(see papermill"):
        notebook.run(src, tmp_path / "out.ipynb", {"epoch": 3})
    with pytest.raises(UserError, match="the notebook .*none.ipynb does not exist"):
        notebook.run(tmp_path / "none.ipynb", tmp_path / "out.ipynb")
    assert not (tmp_path / "out.ipynb").exists()
    assert [notebook.parse_value(v) for v in ("True", "None", "3", "0.5", "demo*")] == [True, None, 3, 0.5, "demo*"]
