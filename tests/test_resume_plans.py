"""A run moves between machines (issue 27): a run saved under one device plan resumes under any
other, its optimizer state laid out as a fresh optimizer of the new plan keeps it.

The plans: the CPU's; the CPU's with only `channels_last` changed; with only `fused` changed; the
GPU's choices (fused, bf16, channels_last, a check every few steps); and fp16 with its scaler. On
the CPU every one of them runs, so each pair is resumed for real and its history compared with
the uninterrupted run under the saved plan. CUDA's placement is emulated on the `meta` device:
parameters there stand in for a GPU's, and a CPU-saved state loaded onto them shows where each
tensor would land. Fused optimizers cannot be made on `meta`, so what a fresh optimizer keeps is
the table `optimizer.expected`, which the first test holds to real fresh optimizers on the CPU.

The runs are tiny (timm's `test_resnet`, 32 px, 10 batches of 8 an epoch, accumulated in pairs)
at `lr_scale=0.01`, where a change of layout or fusion moves the validation loss by float noise
only; the test measures that noise itself, from the uninterrupted runs under those plans.
"""

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from interrupted import stopped_at_batch

from cifarlib.core import runtime
from cifarlib.model import build_model, checkpoints, layer_groups
from cifarlib.training import optimizer, train
from cifarlib.training.config import Stage, make_config

PLANS = {"cpu": dict(precision="fp32", fused=False, channels_last=True, check_every=1),
         "contiguous": dict(precision="fp32", fused=False, channels_last=False, check_every=1),
         "fused": dict(precision="fp32", fused=True, channels_last=True, check_every=1),
         "gpu": dict(precision="bf16", fused=True, channels_last=True, check_every=3),
         "fp16": dict(precision="fp16", fused=True, channels_last=True, check_every=3)}
FP32 = ("cpu", "contiguous", "fused")  # pairs among these change only the layout or the fusion
TINY = dict(preset="cpu", dataset="synthetic", weights="none", backbone="test_resnet", image_size=32, batch_size=8,
            accum_steps=2, max_train_samples=80, max_eval_samples=40, device="cpu", epochs=2, lr_scale=0.01)
TIMED = ("seconds", "images_per_s")
pytestmark = pytest.mark.usefixtures("one_thread")  # runs compared with one another: the same arithmetic




@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("moves")


def tiny(root: Path, name: str, plan: str, **kw):
    return make_config(**{**TINY, **PLANS[plan], "data_dir": str(root / "data"), "checkpoint_dir": str(root / "ckpt"),
                          "run_name": name, **kw})


def final_val_loss(folder: Path) -> float:
    return checkpoints.load(folder / "last.pt")["metrics"]["val_loss"]  # in full: history.csv rounds it


def weights_apart(a: Path, b: Path) -> float:
    """The largest difference between two runs' final weights."""
    wa, wb = (checkpoints.load(f / "last.pt")["model"] for f in (a, b))
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].is_floating_point())


def stopped_in_epoch_2(cfg) -> Path:
    """A run stopped by SIGTERM in the middle of epoch 2 (batch 3 of 10; a plan that checks every
    3 steps stops at step 3 of 5); its folder."""
    return stopped_at_batch(cfg, 10 + 3).dir


@pytest.fixture(scope="module")
def runs(root):
    """Per plan, on first use: the uninterrupted run's folder ("whole"), or a run stopped in the
    middle of epoch 2 ("stopped")."""
    done = {}

    def get(plan: str, kind: str) -> Path:
        if (plan, kind) not in done:
            if kind == "whole":
                run = train.prepare(tiny(root, f"whole-{plan}", plan))
                list(train.epochs(run))
                done[plan, kind] = run.dir
            else:
                done[plan, kind] = stopped_in_epoch_2(tiny(root, f"stopped-{plan}", plan))
        return done[plan, kind]
    return get


def fresh(opt_name: str, fused: bool, channels_last: bool, device="cpu"):
    """test_resnet in a plan's layout, and its optimizer over every layer."""
    net = build_model("test_resnet", 10, "none").to(device, memory_format=torch.channels_last if channels_last
                                                    else torch.contiguous_format)
    cfg = make_config("cpu", optimizer=opt_name)
    stage = Stage("all", 1, tuple(layer_groups(net)), (1e-3,) * 6)
    return net, optimizer.make_optimizer(cfg, train.apply_stage(net, layer_groups(net), stage), fused)


def one_step(net, opt) -> None:
    net(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)).sum().backward()
    opt.step()


@pytest.mark.parametrize("opt_name,fused,channels_last", list(itertools.product(("adamw", "sgd"), (False, True),
                                                                                 (False, True))))
def test_a_fresh_optimizer_keeps_its_state_where_the_table_says(opt_name, fused, channels_last):
    net, opt = fresh(opt_name, fused, channels_last)
    one_step(net, opt)
    tensors = [(k, v) for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)]
    assert tensors and not optimizer.misplaced(opt), optimizer.misplaced(opt)
    if channels_last:  # the layout is really there to be kept
        assert any(v.dim() == 4 and not v.is_contiguous() for _, v in tensors)


def test_the_check_names_a_moment_in_the_other_layout_and_a_counter_of_another_type():
    net, opt = fresh("adamw", False, True)
    one_step(net, opt)
    p = next(p for p in opt.state if p.dim() == 4 and not p.is_contiguous())
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].contiguous()
    opt.state[p]["step"] = opt.state[p]["step"].double()
    wrong = optimizer.misplaced(opt)
    assert len(wrong) == 2 and "exp_avg" in wrong[1] and "step" in wrong[0], wrong


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("saved_plan,new_plan", list(itertools.product(PLANS, PLANS)))
def test_a_saved_state_lands_where_the_new_plans_fresh_optimizer_keeps_it(saved_plan, new_plan, opt_name):
    """Saved on the CPU under one plan, loaded onto parameters on `meta` (a GPU, stood in for) under
    another: each counter where the new plan's kernels read it (the parameter's device when fused,
    the CPU when not), each moment on the parameter's device in the parameter's layout."""
    s, n = PLANS[saved_plan], PLANS[new_plan]
    net, opt = fresh(opt_name, s["fused"], s["channels_last"])
    one_step(net, opt)
    state = opt.state_dict()
    net, opt = fresh(opt_name, False, n["channels_last"], device="meta")  # no fused kernels on meta: set below
    optimizer.load_optimizer_state(opt, state, fused=n["fused"])
    assert not optimizer.misplaced(opt)
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state[p].items():
                if key == "step":
                    assert value.device.type == ("meta" if n["fused"] else "cpu") and value.dtype == torch.float32
                else:
                    assert value.device.type == "meta" and optimizer.layout(value) == optimizer.layout(p)


@pytest.mark.parametrize("saved_plan,new_plan", list(itertools.product(PLANS, PLANS)))
def test_a_run_saved_under_one_plan_resumes_under_any_other(saved_plan, new_plan, runs, root):
    """Stopped in the middle of epoch 2 under one plan, resumed to the end under another. Under the
    same plan the history is the uninterrupted run's. Where only the layout or the fusion changes,
    its final weights, and its validation loss, are within ten times the float noise that such a
    change makes between uninterrupted runs (measured here: 1e-6 in the weights; this tiny run's
    validation loss does not move at these rates, so the weights are the measure). Moments left
    in the saved layout under a fused plan moved them 9e-5 away. Where the precision changes,
    the run completes."""
    name = f"{saved_plan}-to-{new_plan}"
    shutil.copytree(runs(saved_plan, "stopped"), root / "ckpt" / name)
    run = train.prepare(tiny(root, name, new_plan, resume=True))
    assert run.plan.fused == PLANS[new_plan]["fused"] and run.plan.precision == PLANS[new_plan]["precision"]
    list(train.epochs(run))
    rows = checkpoints.read_history(run.dir / "history.csv")
    reference = checkpoints.read_history(runs(saved_plan, "whole") / "history.csv")
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference] == ["1", "2"]
    if saved_plan == new_plan:
        assert [{k: v for k, v in r.items() if k not in TIMED} for r in rows] == \
               [{k: v for k, v in r.items() if k not in TIMED} for r in reference]
    elif saved_plan in FP32 and new_plan in FP32:
        pairs = list(itertools.combinations(FP32, 2))
        noise = max(weights_apart(runs(a, "whole"), runs(b, "whole")) for a, b in pairs)
        moved = weights_apart(run.dir, runs(saved_plan, "whole"))
        assert 0 < noise and moved <= 10 * noise, (moved, noise)  # moments paired wrongly: 300 times the noise
        val_noise = max(abs(final_val_loss(runs(a, "whole")) - final_val_loss(runs(b, "whole"))) for a, b in pairs)
        assert abs(final_val_loss(run.dir) - final_val_loss(runs(saved_plan, "whole"))) <= 10 * val_noise + 1e-6
    else:
        assert all(torch.isfinite(torch.tensor(float(r["val_loss"]))) for r in rows)


def test_a_resumed_run_opens_its_process_group_for_the_device_it_runs_on(runs, root, monkeypatch):
    """Saved with device=cpu and resumed without device=: the group's backend is chosen for the
    run's own device (a GPU machine would otherwise open NCCL for a model left on the CPU)."""
    shutil.copytree(runs("cpu", "stopped"), root / "ckpt" / "group")
    devices = []

    class Opened(Exception):
        pass

    def setup_distributed(device="auto"):
        devices.append(device)
        raise Opened
    monkeypatch.setattr(runtime, "setup_distributed", setup_distributed)
    cfg = make_config(**{**TINY, **PLANS["cpu"], "data_dir": str(root / "data"), "checkpoint_dir": str(root / "ckpt"),
                         "run_name": "group", "resume": True, "device": None})
    assert "device" not in cfg.given
    with pytest.raises(Opened):
        train.prepare(cfg)
    assert devices == ["cpu"]


def test_after_a_torchrun_resume_the_curves_next_point_is_rank_zeros_own(runs, root, monkeypatch):
    """Rank 0 resumes with every rank's loss sums but draws the curve from its own: the first point
    after the resume must be its own mean, as in a run never stopped. A second rank is stood in
    for by the sums it would add at the save, unlike rank 0's (123 over 40 images)."""
    from cifarlib.training import runstate

    class TwoRanks:  # runstate's runtime, with a second rank's sums in every sum over the ranks
        def __getattr__(self, name):
            return getattr(runtime, name)

        @staticmethod
        def sum_over_ranks(*values):
            return [float(v) + extra for v, extra in zip(values, (123.0, 40))]
    monkeypatch.setattr(runstate, "runtime", TwoRanks())
    stopped_in_epoch_2(tiny(root, "ranks", "cpu"))
    monkeypatch.undo()
    run = train.prepare(tiny(root, "ranks", "cpu", resume=True))
    at = run.trace.state()["points"][-1]["x"]  # where it stopped
    list(train.epochs(run))
    points = lambda folder: [q for q in checkpoints.load(folder / "last.pt")["trace"]["points"] if q["x"] > at]  # noqa: E731
    resumed, whole = points(run.dir), points(runs("cpu", "whole"))
    assert len(resumed) == len(whole) > 0
    assert all(abs(a["loss"] - b["loss"]) <= 5e-6 for a, b in zip(resumed, whole)), (resumed[0], whole[0])  # rounded to 1e-6


def test_the_budgets_probe_times_the_model_as_the_stage_trains_it(root, monkeypatch):
    """Through `loop.stage_model` (DDP under torchrun, compiled if asked), with the plan's kernels
    tuned first, as training tunes them."""
    from torch import nn

    from cifarlib.core.runtime import DevicePlan
    from cifarlib.training import trial
    seen = []

    class Compiled(nn.Module):  # torch.compile, stood in for: it only counts the steps through it
        def __init__(self, net, **kw):
            super().__init__()
            self.net = net

        def forward(self, x):
            seen.append("compiled")
            return self.net(x)
    monkeypatch.setattr(torch, "compile", Compiled)
    monkeypatch.setattr(DevicePlan, "tune", lambda self: seen.append("tuned"))
    run = train.prepare(tiny(root, "probe", "cpu", compile=True))
    trial.probe(run, steps=1, warmup=0)
    assert seen[0] == "tuned" and seen.count("compiled") == 2 * run.cfg.accum_steps  # a step of each stage
