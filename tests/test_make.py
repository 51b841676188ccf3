"""The Makefile: the commands it would run (make -n), since the targets themselves install
packages and run notebooks."""

import os
import re
import shutil
import subprocess
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
    assert cpu in lines and rest in lines and lines.index(cpu) < lines.index(rest)
    assert any("startswith(\"nvidia-\")" in line and "make clean first" in line for line in lines[:lines.index(cpu)])
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


def test_train_and_demo_run_the_notebooks_through_the_runner_that_shows_a_users_mistake_alone():
    train = dry_run("train").stdout
    assert re.search(r"^\.venv/bin/python -m cifarlib\.notebook notebooks/03_train\.ipynb runs/train-", train, re.M)
    assert ".venv/bin/python -m cifarlib.notebook --no-progress-bar" in dry_run("demo").stdout
