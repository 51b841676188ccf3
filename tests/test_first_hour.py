"""A new user's first hour (issue 31): `preset=auto` fits the machine and says so, a budget counts
from the command's start, notebook 03's first table does not promise epochs a budget will replace,
and notebooks 01 and 02 cannot show synthetic pictures quietly. The Makefile's side is in
test_make.py, and notebook 03's streamed lines in test_notebooks.py."""

import json
import time
from pathlib import Path

import pytest
import torch

from cifarlib.core import clock, runtime
from cifarlib.data import resolve_dataset
from cifarlib.training import config
from cifarlib.training.config import AUTO_BUDGET_MINUTES, make_config

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_auto_is_the_cpu_preset_with_a_budget_where_there_is_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "pick_device", lambda device="auto": torch.device("cpu"))  # no GPU, whatever this is
    cfg = make_config("auto", dataset="synthetic")
    assert (cfg.preset, cfg.budget_minutes, cfg.epochs) == ("cpu", AUTO_BUDGET_MINUTES, 2)
    assert "budget_minutes" not in cfg.given  # the preset's choice, not the user's: a resume keeps its own
    said = capsys.readouterr().err
    assert said.startswith("preset=auto: no CUDA GPU (training on cpu), so the cpu preset, with a 15-minute budget")
    assert make_config("auto", epochs=3).budget_minutes == 0 and make_config("auto", epochs=3).epochs == 3
    assert make_config("auto", budget_minutes=0).budget_minutes == 0  # 0: off, as given
    assert make_config("auto", budget_minutes=4).budget_minutes == 4
    assert "no CUDA GPU (training on cpu), so the cpu preset.\n" in capsys.readouterr().err


def test_auto_is_the_original_recipe_on_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "pick_device", lambda device="auto": torch.device("cuda", 0))
    cfg = make_config("auto")
    assert (cfg.preset, cfg.budget_minutes, cfg.epochs) == ("original", 0, 100)
    assert capsys.readouterr().err == "preset=auto: a CUDA GPU (cuda:0), so the original preset.\n"
    with pytest.raises(config.UserError, match="choose one of original, fast, cpu, or auto"):
        make_config("laptop")


def test_a_budget_counts_from_the_command_that_started_the_kernel(monkeypatch):
    """The notebook runner leaves its start for the kernel; a stamp from long before this process
    began (inherited from another command) or none means now."""
    now = time.time()
    monkeypatch.setattr(clock, "_process_start", lambda: now - 5)  # this process: the kernel, begun 5 s ago
    monkeypatch.setenv(clock.COMMAND_STARTED, repr(now - 8))  # its command began 3 s before it
    assert time.monotonic() - clock.command_started() == pytest.approx(8, abs=0.5)
    monkeypatch.setenv(clock.COMMAND_STARTED, repr(now - 5000))
    assert time.monotonic() - clock.command_started() == pytest.approx(0, abs=0.5)
    monkeypatch.delenv(clock.COMMAND_STARTED)
    assert time.monotonic() - clock.command_started() == pytest.approx(0, abs=0.5)  # JupyterLab: from now
    assert time.monotonic() - clock.process_started() == pytest.approx(5, abs=0.5)  # the command line: its process
    clock.mark_command_start()
    assert float(clock.os.environ[clock.COMMAND_STARTED]) == now - 5


def test_the_first_table_of_a_budgeted_run_says_the_budget_plans_its_epochs():
    rows = config.stages_table(make_config("cpu", budget_minutes=10))
    assert [r["epochs"] for r in rows] == ["planned by the 10-minute budget"] * 2
    assert [r["epochs"] for r in config.stages_table(make_config("cpu", epochs=3))] == [1, 2]
    nb = json.loads((NOTEBOOKS / "03_train.ipynb").read_text())
    assert "config.stages_table(cfg)" in "".join(nb["cells"][2]["source"])


def test_synthetic_pictures_under_cifar_names_are_said_loudly_with_the_command_that_fixes_it(tmp_path, capsys):
    assert resolve_dataset("auto", tmp_path) == "synthetic"
    banner = capsys.readouterr().err.splitlines()
    assert banner[0] == banner[-1] == "=" * 88 and banner[1].startswith("NOT REAL PHOTOS. CIFAR-100 is not in ")
    assert f"    .venv/bin/python -m cifarlib.data --dataset cifar100 --data-dir {tmp_path}" in banner
    assert resolve_dataset("synthetic", tmp_path) == "synthetic" and not capsys.readouterr().err  # asked for
    for name in ("01_explore_data", "02_augmentation_preview"):  # the banner is their first output
        code = [c for c in json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
        first = "".join(code[1]["source"])
        assert "resolve_dataset(dataset, data_dir)" in first and "print(" not in first.split("resolve_dataset(")[0]
