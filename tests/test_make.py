"""The Makefile: the commands it would run (make -n), since the targets themselves install
packages and run notebooks."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(*args: str) -> subprocess.CompletedProcess:
    """`make -n ARGS` in the project, as if requirements.txt had just changed (so that .venv's
    stamp is out of date whatever this machine has built), in a clean environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-n", "-W", "requirements.txt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_torch_cpu_installs_torch_and_torchvision_from_the_cpu_only_index_before_the_rest():
    lines = dry_run("TORCH=cpu", "test").stdout.splitlines()
    bounds = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if re.match(r"torch(vision)?\b", line)]
    assert len(bounds) == 2  # what the command must carry
    cpu = ".venv/bin/python -m pip install --index-url https://download.pytorch.org/whl/cpu " + " ".join(f"'{b}'" for b in bounds)
    rest = ".venv/bin/python -m pip install -r requirements.txt -r requirements-dev.txt"
    first = next(i for i, line in enumerate(lines) if line.startswith(cpu + " || {"))  # with what to do if it fails
    assert rest in lines and first < lines.index(rest)
    assert any("startswith(\"nvidia-\")" in line and "make clean first" in line for line in lines[:first])
    check = next(i for i, line in enumerate(lines) if "torch.version.cuda is None" in line)
    assert lines.index(rest) < check  # what pip ended with is checked to be the CPU build
    assert lines[-2:] == ["touch .venv/.installed-cpu", ".venv/bin/python -m pytest"]


def test_by_default_pip_picks_torch_as_before():
    lines = dry_run("test").stdout.splitlines()
    assert not any("download.pytorch.org" in line or "nvidia" in line for line in lines)
    assert lines[-4:] == [".venv/bin/python -m pip install -r requirements.txt -r requirements-dev.txt",
                          ".venv/bin/python -m pip install --no-deps -e .", "touch .venv/.installed",
                          ".venv/bin/python -m pytest"]


def test_any_other_torch_is_refused_with_the_choices():
    done = dry_run("TORCH=cuda", "test")
    assert done.returncode == 2 and "TORCH=cuda: the one choice is TORCH=cpu" in done.stderr and not done.stdout


def test_train_and_demo_stream_what_the_notebooks_print_through_the_runner():
    """The runner shows a user's mistake alone, and with --stream what the cells print (the
    training's lines) without papermill's bar or the tables and figures."""
    train = dry_run("train").stdout
    assert re.search(r"^\.venv/bin/python -m cifarlib\.notebook --stream --no-progress-bar notebooks/03_train\.ipynb "
                     r"\\\n\truns/train-\$\(date \+%Y%m%d-%H%M%S\)\.ipynb\s*$", train, re.M), train
    assert ".venv/bin/python -m cifarlib.notebook --stream --no-progress-bar" in dry_run("demo").stdout


def test_train_takes_the_settings_a_user_types_each_as_its_notebook_parameter():
    """No PRESET: the notebook's preset=auto (the cpu preset and a budget without a GPU); paths
    and names go as text (-r), so that a folder called 1e3 stays a folder."""
    train = dry_run("train", "PRESET=cpu", "EPOCHS=3", "BUDGET=", "BACKBONE=tf_efficientnet_lite0", "WEIGHTS=w/1e3.pth",
                    "DATASET=folder", "DATA_DIR=my photos", "ARGS=-p seed 1 -p lr_scale 0.5").stdout
    assert ("-r preset 'cpu' -p epochs '3' -r backbone 'tf_efficientnet_lite0' -r weights 'w/1e3.pth' -r dataset "
            "'folder' -r data_dir 'my photos' -p seed 1 -p lr_scale 0.5") in " ".join(train.split())
    assert "-p budget_minutes '10'" in dry_run("train", "BUDGET=10").stdout
    assert "preset" not in dry_run("train").stdout.split("runs/train-")[1]


def test_torch_cpu_without_its_index_stops_and_says_what_to_do(tmp_path):
    """The CPU-only index cannot be reached: make stops after that one install, says why and what
    to do, and installs nothing else (no quiet fallback to pip's default torch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "MAKE", "MFLAGS", "TORCH"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_DISABLE_PIP_VERSION_CHECK="1")
    venv = tmp_path / "venv"
    r = subprocess.run(["make", "venv", "TORCH=cpu", "TORCH_CPU_INDEX=http://127.0.0.1:9/simple", f"VENV={venv}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "make: TORCH=cpu: could not install torch's CPU-only build from " \
        "http://127.0.0.1:9/simple" in r.stderr and "TORCH_CPU_INDEX=https://your-mirror/whl/cpu" in r.stderr, r.stderr
    assert "-r requirements.txt" not in r.stdout and not list(venv.glob("lib/*/site-packages/torch"))
    assert not list(venv.glob(".installed*"))


def test_torch_cpu_refuses_a_cuda_build_that_pip_ended_with(tmp_path):
    """The check after the install, run against a torch that says it is a CUDA build."""
    line = next(line for line in dry_run("TORCH=cpu", "venv").stdout.splitlines() if "torch.version.cuda is None" in line)
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("__version__ = '2.14.1+cu130'\nclass version:\n    cuda = '13.0'\n")
    cmd = line.replace(".venv/bin/python", sys.executable, 1)
    r = subprocess.run(cmd, shell=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "make: TORCH=cpu, but .venv now holds torch 2.14.1+cu130, a CUDA build" in r.stderr
