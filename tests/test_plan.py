"""One training path for every device: the device plan as settings, and the GPU's choices run on
the CPU (bf16 and fp16 autocast, fused optimizers, a gradient scaler, checks every few steps).

The runs are tiny (timm's `test_resnet`, 32 px, batches of 8) and share one uninterrupted
reference run per plan; an interrupted run must end with the reference's history, `seconds`
and `images_per_s` aside, to 1e-6. All runs here use one thread, so that their arithmetic is
the same from run to run.
"""

import math
import os
import re
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cifarlib.core import runtime
from cifarlib.core.errors import UserError
from cifarlib.data.augment import BatchAugment
from cifarlib.model import checkpoints
from cifarlib.training import config, loop, prepare as preparing, train
from cifarlib.training.config import Stage, make_config
from cifarlib.evaluation import runs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cifarlib"
TIMED = ("seconds", "images_per_s")
pytestmark = pytest.mark.usefixtures("one_thread")  # runs compared with one another: the same arithmetic
# 160 images in batches of 8, accumulated in pairs: 20 batches and 10 optimizer steps an epoch;
# a check every 5 optimizer steps under the GPU's choices
TINY = dict(preset="cpu", dataset="synthetic", weights="none", backbone="test_resnet", image_size=32, batch_size=8,
            accum_steps=2, max_train_samples=160, max_eval_samples=40, device="cpu", epochs=2)
PLANS = {"cpu": dict(precision="auto", fused="auto", channels_last="auto", check_every=0),
         "gpu": dict(precision="bf16", fused=True, check_every=5), "fp16": dict(precision="fp16", fused=True, check_every=5)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("plans")




def tiny(root: Path, name: str, plan: str = "cpu", **kw):
    return make_config(**{**TINY, **PLANS[plan], "data_dir": str(root / "data"), "checkpoint_dir": str(root / "ckpt"),
                          "run_name": name, **kw})


def rows_of(folder: Path) -> list[dict]:
    return checkpoints.read_history(folder / "history.csv")


def same_history(a: list[dict], b: list[dict]) -> bool:
    """Equal in every column but the timed ones; numbers to 1e-6."""
    def close(x, y):
        try:
            return abs(float(x) - float(y)) <= 1e-6
        except ValueError:
            return x == y
    return len(a) == len(b) and all(close(r[k], s[k]) for r, s in zip(a, b) for k in r if k not in TIMED)


def interrupt_at(monkeypatch, call: int) -> None:
    """SIGTERM to this process during batch augmentation call number `call` (1-based)."""
    calls, real = [], BatchAugment.__call__

    def augment(self, x, y):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x, y)
    monkeypatch.setattr(BatchAugment, "__call__", augment)


@pytest.fixture(scope="module")
def references(root):
    """One uninterrupted run per plan, trained on first use."""
    done = {}

    def get(plan: str) -> Path:
        if plan not in done:
            run = train.prepare(tiny(root, f"reference-{plan}", plan))
            for _ in train.epochs(run):
                pass
            done[plan] = run.dir
        return done[plan]
    return get


# --- the plan: resolved once, refused early, printed and recorded --------------------------------

def test_the_cpus_plan_and_the_gpus_choices_on_the_cpu():
    cpu = runtime.resolve_plan("cpu")
    assert (cpu.precision, cpu.fused, cpu.channels_last, cpu.check_every) == ("fp32", False, True, 1)
    gpu_like = runtime.resolve_plan("cpu", precision="bf16", fused=True, channels_last=False, check_every=5)
    assert (gpu_like.dtype, gpu_like.fused, gpu_like.memory_format, gpu_like.check_every) == (
        torch.bfloat16, True, torch.contiguous_format, 5)
    assert runtime.resolve_plan("cpu", precision="fp16").scaler().is_enabled()
    assert not gpu_like.scaler().is_enabled()


def test_what_a_device_cannot_run_is_refused_before_anything_loads(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device=cuda asks for a CUDA GPU, and torch sees none.*device=auto"):
        runtime.resolve_plan("cuda")
    monkeypatch.setattr(preparing, "load_cifar", lambda *a, **k: pytest.fail("data loaded before the plan was checked"))
    with pytest.raises(SystemExit) as e:
        train.main(["preset=cpu", "device=cuda", "checkpoint_dir=/nonexistent/never-made"])
    assert e.value.code == 2 and "asks for a CUDA GPU" in capsys.readouterr().err
    # a GPU without bf16, stood in for: auto is fp16, and bf16 is refused
    for name, value in (("is_available", lambda: True), ("current_device", lambda: 0), ("device_count", lambda: 1),
                        ("get_device_capability", lambda d=None: (7, 5)), ("get_device_name", lambda d=None: "Tesla T4")):
        monkeypatch.setattr(torch.cuda, name, value)
    assert runtime.resolve_plan("cuda").precision == "fp16"
    with pytest.raises(UserError, match="precision=bf16: Tesla T4 has no native bf16"):
        runtime.resolve_plan("cuda", precision="bf16")
    with pytest.raises(UserError, match="numbered from 0"):
        runtime.resolve_plan("cuda:3")
    monkeypatch.setattr(runtime, "_fused_devices", lambda: ["cuda"])
    with pytest.raises(UserError, match="fused=True: this torch has no fused optimizer kernels for cpu"):
        runtime.resolve_plan("cpu", fused=True)
    for bad, message in ((dict(precision="fp8"), "precision must be"), (dict(fused="yes"), "fused must be"),
                         (dict(channels_last=1), "channels_last must be bool or str"),
                         (dict(check_every=-1), "check_every must be 0")):
        with pytest.raises(UserError, match=message):
            make_config("cpu", **bad)


def test_the_plan_is_printed_and_recorded_where_the_runs_table_reads_it(root, references, capsys):
    folder = references("gpu")
    assert "device plan: cpu, bf16, fused optimizer, channels_last, a check every 5 optimizer steps" in capsys.readouterr().out
    saved = checkpoints.read_json(folder / "config.json")
    plan = {"device": "cpu", "precision": "bf16", "fused": True, "channels_last": True, "check_every": 5,
            "data_on": "device", "order": "shuffle", "data_why": saved["plan"]["data_why"]}
    assert saved["plan"]["data_why"].startswith("0.0 GB of pictures fit in half of the")
    assert saved["plan"] == plan and checkpoints.load(folder / "last.pt")["config"]["plan"] == plan
    assert config.from_dict(saved).plan == plan and (saved["precision"], saved["fused"]) == ("bf16", True)
    row = runs.table(str(root / "ckpt")).set_index("run").loc[folder.name]
    assert row["precision"] == "bf16" and row["status"] == "finished"


# --- the GPU's plan through training, resume, interruption and accumulation ----------------------

@pytest.mark.parametrize("plan", ["cpu", "gpu", "fp16"])
@pytest.mark.parametrize("where", ["mid-epoch", "boundary"])
def test_a_stopped_run_resumes_to_the_uninterrupted_history(plan, where, root, references, monkeypatch):
    """Stopped after a named optimizer step (with accum_steps=2, a check every 5 optimizer
    steps under the GPU's choices): mid-epoch, at the first check of epoch 2; at a boundary,
    during epoch 1's validation. fp16 runs with its gradient scaler; both plans with fused AdamW."""
    if plan == "cpu" and where == "boundary":
        pytest.skip("the CPU's plan at a boundary: tests/test_interrupts.py")
    reference = rows_of(references(plan))
    name = f"{plan}-{where}"
    if where == "mid-epoch":
        interrupt_at(monkeypatch, 20 + 3)  # during batch 3 of epoch 2 (20 a epoch): stops at the next check
        expect = {"cpu": 4, "gpu": 10, "fp16": 10}[plan]  # batches done at that check, a step's boundary
    else:
        real = train.validate
        monkeypatch.setattr(train, "validate", lambda run, model: (os.kill(os.getpid(), signal.SIGTERM), real(run, model))[1])
        expect = 0
    run = train.prepare(tiny(root, name, plan))
    with pytest.raises(train.guard.Interrupted, match=f"interrupted at epoch 2 step {expect};"):
        for _ in train.epochs(run):
            pass
    monkeypatch.undo()
    if where == "mid-epoch":  # a copy resumes under another plan below
        shutil.copytree(run.dir, root / "ckpt" / f"{name}-other-plan")
    run = train.prepare(tiny(root, name, plan, resume=True))
    list(train.epochs(run))
    assert same_history(rows_of(run.dir), reference), (rows_of(run.dir), reference)
    trace = [checkpoints.load(folder / "last.pt")["trace"]["points"] for folder in (run.dir, references(plan))]
    assert len(trace[0]) >= 4 and same_history(*trace)  # the curves within epochs (at least two points each) resume exactly too


@pytest.mark.parametrize("saved_under,resumed_under", [("cpu", "gpu"), ("gpu", "cpu")])
def test_a_run_resumes_under_another_plan_with_that_plans_optimizer_kernel(
        saved_under, resumed_under, root, references, monkeypatch):
    """Saved under one plan, continued under the other (the copies the test above left): the
    plan's keys on the resume command win, and the optimizer runs fused exactly when the plan
    says so (torch's `_fused_adamw_` is the fused kernel)."""
    folder = root / "ckpt" / f"{saved_under}-mid-epoch-other-plan"
    if not folder.is_dir():
        pytest.skip("needs the interrupted runs of the test above")
    fused_calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (fused_calls.append(1), real(*a, **k))[1])
    run = train.prepare(tiny(root, folder.name, resumed_under, resume=True))
    assert replace(run.plan, data_why="") == runtime.resolve_plan("cpu", **PLANS[resumed_under])
    list(train.epochs(run))
    assert bool(fused_calls) == (resumed_under == "gpu")
    assert all(g["fused"] == (resumed_under == "gpu") for g in run.stage.opt.param_groups)
    assert checkpoints.read_json(folder / "config.json")["plan"]["precision"] == run.plan.precision
    history = rows_of(folder)
    assert [r["stage"] for r in history] == ["head", "top"] and all(math.isfinite(float(r["val_loss"])) for r in history)


def test_a_resume_command_keeps_the_recipe_and_says_what_it_cannot_change(root, references):
    folder = references("cpu")
    with pytest.raises(UserError, match=r"resume=True continues run 'reference-cpu' with its own recipe.*"
                                        r"batch_size=16 \(the run's: 8\).*start a new run"):
        train.prepare(tiny(root, folder.name, resume=True, batch_size=16))
    base = {k: v for k, v in TINY.items() if k not in ("batch_size", "max_train_samples", "max_eval_samples")}
    run = train.prepare(make_config(**base, data_dir=str(root / "data"), checkpoint_dir=str(root / "ckpt"),
                                    run_name=folder.name, resume=True, check_every=3))
    assert (run.cfg.batch_size, run.cfg.max_train_samples, run.plan.check_every) == (8, 160, 3)


# --- a non-finite loss ---------------------------------------------------------------------------

def test_the_first_non_finite_step_is_reported_exactly():
    for step in (1, 5, 32, 37, 10_007):
        assert loop.scheduled_check(torch.tensor(step), False, False)[:3] == (False, step, False)
    assert loop.scheduled_check(torch.tensor(-1), True, False)[:3] == (True, None, False)


@pytest.mark.parametrize("plan", ["cpu", "gpu"])
def test_a_non_finite_loss_is_named_at_its_step_and_nothing_is_written_after_the_last_save(plan, root, monkeypatch):
    """A NaN enters at batch 13 of epoch 2 (its 7th optimizer step). The CPU's plan checks before
    every step, so none is applied; the GPU's checks at step 10 (batch 20), after applying some."""
    run = train.prepare(tiny(root, f"nan-{plan}", plan))
    gen = train.epochs(run)
    next(gen)
    checkpoints.SAVER.wait()
    before = {f: (run.dir / f).read_bytes() for f in ("best.pt", "last.pt", "history.csv")}
    calls, real = [], BatchAugment.__call__

    def poisoned(self, x, y):
        calls.append(1)
        inputs, targets = real(self, x, y)
        return (inputs * float("nan") if len(calls) == 13 else inputs), targets
    monkeypatch.setattr(BatchAugment, "__call__", poisoned)
    applied = "may have taken up to 4 bad step" if plan == "gpu" else "That step was not applied"
    with pytest.raises(UserError, match=rf"NaN or infinite at epoch 2, step 13, in stage 'top'.*{applied}"):
        next(gen)
    assert {f: (run.dir / f).read_bytes() for f in before} == before
    finite = all(torch.isfinite(p).all() for p in run.model.parameters())
    assert finite == (plan == "cpu")  # the GPU's plan applied the bad steps up to its check, in memory only


# --- the collectives, and what only runtime may do -----------------------------------------------

def test_collectives_put_their_tensors_on_the_process_groups_device(monkeypatch):
    """Under NCCL a collective takes tensors on the GPU only; a stop before an epoch's first step
    all-reduces host values. Here the group is faked: its device is `meta`, so any tensor not
    moved there is seen."""
    seen = []

    class Reached(Exception):
        pass

    def all_reduce(t, op=None):
        seen.append(t.device.type)
        raise Reached
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(runtime, "group_device", lambda: torch.device("meta"))
    for collective in (lambda: runtime.sum_over_ranks(0.0, 0), lambda: runtime.any_rank(True),
                       lambda: loop.scheduled_check(torch.tensor(-1), True, False)):
        with pytest.raises(Reached):
            collective()
    assert seen == ["meta", "meta", "meta"]


def _sources():
    """Every module of the package, by its name within it (`training/loop.py`: `training.loop`)."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_only_runtime_asks_what_kind_of_device_it_runs_on_and_makes_collectives():
    kind = re.compile(r"\.type\b|\.is_cuda\b|torch\.cuda\.(?!OutOfMemoryError)|torch\.backends\.|"
                      r"torch\.device\([\"'](cuda|mps)|(==|in)\s*\(?[\"'](cuda|mps|cpu)[\"']")
    collective = re.compile(r"\b(all_reduce|broadcast|broadcast_object_list|all_gather_object|barrier|all_gather)\(")
    found = {name: [line.strip() for line in text.splitlines() if kind.search(line.split("#")[0])]
             for name, text in _sources().items() if name != "core.runtime"}
    found = {k: v for k, v in found.items() if v}
    assert not found, found
    calls = {name: [line.strip() for line in text.splitlines() if collective.search(line) and "runtime." not in line]
             for name, text in _sources().items() if name != "core.runtime"}
    assert not {k: v for k, v in calls.items() if v}
    private = [name for name, text in _sources().items() if "found_inf" in text or "_step_supports_amp_scaling" in text]
    assert not private


def test_fused_sgd_and_adamw_train_under_the_gpus_plan_on_the_cpu(root):
    """One step of each fused optimizer through the loop, in bf16 (fused AdamW once crashed at its
    first step on CUDA: the loop set a private flag of a shape its kernel refuses)."""
    run = train.prepare(tiny(root, "fused", "gpu", accum_steps=1, max_train_samples=16, epochs=2))
    for optimizer in ("sgd", "adamw"):
        run.cfg = config.dataclasses.replace(run.cfg, optimizer=optimizer)
        stage = Stage("all", 1, ("layer4", "head"), (1e-3, 1e-2))
        opt = train.make_optimizer(run.cfg, train.apply_stage(run.model, run.groups, stage), fused=True)
        st = train.StageRun(0, stage, run.model, opt, train.make_schedule(run.cfg, opt, stage, 2), run.plan.scaler())
        before = run.model.get_submodule("fc").weight.detach().clone()
        loss = train.train_epoch(run, st, epoch=0)
        assert opt.param_groups[0]["fused"] and math.isfinite(loss)
        assert not torch.equal(before, run.model.get_submodule("fc").weight)
