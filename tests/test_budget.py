"""Train to the time you have (`budget_minutes`), and the learning-rate finder.

The planning is tested with given step times (no clock, no training); a few tiny real runs
(timm's `test_resnet`, 32 px) check that a budgeted run trains, validates, writes its plan and
resumes, that a stage may end inside an epoch, and that the probe and the finder leave no trace.
How close a run comes to its budget is measured in benchmarks/README.md, not asserted here.
"""

import json
import os
import signal

import pytest
import torch

from cifarlib.core.errors import UserError
from cifarlib.model import checkpoints
from cifarlib.training import budget, config, curves, train, trial
from cifarlib.training.budget import StageCost
from cifarlib.training.config import make_config
from cifarlib.evaluation import runs

TINY = dict(dataset="synthetic", weights="none", backbone="test_resnet", image_size=32, batch_size=16,
            max_train_samples=192, max_eval_samples=48, device="cpu")  # 12 steps an epoch


def tiny(tmp_path, name, **kw):
    return make_config(kw.pop("preset", "cpu"), **{**TINY, "data_dir": str(tmp_path.parent / "data"),
                                                    "checkpoint_dir": str(tmp_path / "ckpt"), "run_name": name, **kw})


# --- planning, with given step times -------------------------------------------------------------

COSTS = [StageCost("head", 1, 64, step_s=0.1, val_s=2.0), StageCost("all", 2, 88, step_s=0.5, val_s=3.0)]


def test_a_plan_keeps_the_presets_proportions_and_fits_the_time():
    for seconds in (60, 300, 3000):
        head, all_ = budget.fit(COSTS, 100, seconds)
        used = sum(budget.stage_seconds(c, n, 100) for c, n in zip(COSTS, (head, all_)))
        assert used <= seconds and abs(all_ / head - 2) < 0.1  # the preset's 1:2, in optimizer steps
        more = [round(n * 1.02) + 1 for n in (head, all_)]
        assert sum(budget.stage_seconds(c, n, 100) for c, n in zip(COSTS, more)) > seconds  # not much left over
    head, all_ = budget.fit(COSTS, 100, 300)
    assert (head, all_) == (251, 501)  # 2.51 and 5.01 epochs: stages end inside epochs, validating 3 and 6 times
    assert budget.stage_seconds(COSTS[0], 251, 100) + budget.stage_seconds(COSTS[1], 501, 100) == pytest.approx(
        251 * 0.1 + 3 * 2.0 + 501 * 0.5 + 6 * 3.0)  # 299.6 s


def test_too_small_a_budget_names_the_smallest_that_would_do():
    with pytest.raises(budget.TooSmall) as e:
        budget.make_plan(COSTS, 100, budget_s=60, spent_s=55, save_s=1)
    shortest = 55 + 1 + (0.1 + 2 + 1) + (0.5 + 3 + 1)  # spent, the last save, one step and one row per stage
    assert e.value.minimum_s == pytest.approx(shortest)
    plan = budget.make_plan(COSTS, 100, budget_s=shortest + 0.01, spent_s=55, save_s=1)
    assert [s["steps"] for s in plan.stages] == [1, 1]


def test_the_plan_is_described_recorded_and_reproducible():
    plan = budget.make_plan(COSTS, 100, budget_s=600, spent_s=30, save_s=1)
    assert budget.describe(plan) == "budget 10.0 min: head 4.7 epochs at 64 px, then all 9.3 epochs at 88 px; predicted 10.0 min"
    assert plan.predicted_minutes <= 10 and [s["predicted_s"] for s in plan.to_dict()["stages"]] == [61.7, 507.0]
    cpu = make_config("cpu")
    again = make_config("cpu", stages=budget.reproduce(cpu.stages, plan))
    assert [s.steps for s in again.stages] == [467, 934] and [s.lr for s in again.stages] == [s.lr for s in cpu.stages]
    assert config.stage_rows(again.stages[1], 100) == 10 and config.stage_steps(again.stages[0], 100) == 467


def test_the_predicted_time_never_exceeds_the_budget_by_rounding():
    """The recorded stages' seconds are rounded to 0.1 s; the predicted total is not made of them
    (two stages each rounded up by 0.05 s put a plan that fits 36 s at 0.601 min)."""
    costs = [StageCost("head", 1, 32, step_s=0.0137, val_s=0.211), StageCost("all", 2, 32, step_s=0.0391, val_s=0.263)]
    over = []
    for tenth in range(300, 1200):
        plan = budget.make_plan(costs, 3, budget_s=tenth / 10, spent_s=4.44, save_s=0.05)
        if plan.predicted_minutes > plan.budget_minutes:
            over.append((tenth / 10, plan.predicted_minutes))
        again = budget.replan(plan, 1, costs[1:], spent_s=4.44 + plan.stages[0]["predicted_s"])
        if again.predicted_minutes > plan.budget_minutes:
            over.append((tenth / 10, again.predicted_minutes, "replan"))
    assert not over, over[:5]


def test_a_plan_leaves_the_commands_end_its_seconds():
    """The run's last file is not the command's end (a notebook's kernel shuts down, its copy is
    written): a budget leaves EXIT_S for it, in the first plan and in every re-plan."""
    plain = budget.make_plan(COSTS, 100, budget_s=600, spent_s=30, save_s=1)
    plan = budget.make_plan(COSTS, 100, budget_s=600, spent_s=30, save_s=1, exit_s=budget.EXIT_S)
    assert plan.predicted_minutes * 60 <= 600 - budget.EXIT_S < plain.predicted_minutes * 60
    again = budget.replan(plan, 1, COSTS[1:], spent_s=30 + plan.stages[0]["predicted_s"])
    assert again.predicted_minutes * 60 <= 600 - budget.EXIT_S and again.exit_s == budget.EXIT_S
    with pytest.raises(budget.TooSmall) as e:
        budget.make_plan(COSTS, 100, budget_s=60, spent_s=55, save_s=1, exit_s=5)
    assert e.value.minimum_s == pytest.approx(55 + 1 + 5 + (0.1 + 2 + 1) + (0.5 + 3 + 1))


def test_a_replan_uses_the_time_left_and_the_speed_measured():
    plan = budget.make_plan(COSTS, 100, budget_s=600, spent_s=30, save_s=1)
    slower = [StageCost("all", 2, 88, step_s=0.5 * 1.5, val_s=3.0 * 1.5)]  # probed again: the machine is 1.5x slower now
    again = budget.replan(plan, 1, slower, spent_s=30 + 1.5 * plan.stages[0]["predicted_s"])
    assert again.stages[0] == plan.stages[0] and again.stages[1]["steps"] < plan.stages[1]["steps"]
    assert again.predicted_minutes <= 10 and again.replans[-1]["at_stage"] == 1
    late = budget.replan(plan, 1, slower, spent_s=700)  # no time left: one step, and say so in the times
    assert late.stages[1]["steps"] == 1 and late.predicted_minutes > 10


def test_budget_and_epochs_together_are_refused_for_a_new_run():
    with pytest.raises(UserError, match="budget_minutes=5 plans the stages' lengths itself, so epochs must be left unset"):
        make_config("cpu", budget_minutes=5, epochs=3)
    assert make_config("cpu", budget_minutes=5).budget_minutes == 5
    with pytest.raises(UserError, match="lr_scale above 0"):
        make_config("cpu", lr_scale=0)
    assert make_config("cpu", lr_scale=2).stages[1].lr == tuple(2 * r for r in make_config("cpu").stages[1].lr)


# --- real runs -----------------------------------------------------------------------------------

def _everything(run):
    return ({k: v.clone() for k, v in run.model.state_dict().items()}, [p.requires_grad for p in run.model.parameters()],
            [m.training for m in run.model.modules()], torch.get_rng_state(), run.aug.generator.get_state(), run.aug.size,
            train.train_loader(run).order(0))


def _same(a, b):
    return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:3] == b[1:3]
            and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4]) and a[5] == b[5] and torch.equal(a[6], b[6]))


def test_the_probe_and_the_finder_leave_no_trace_and_the_finder_suggests_inside_its_range(tmp_path):
    run = train.prepare(tiny(tmp_path, "untouched"))
    run.model.train()  # BatchNorm modes as a user may have left them
    before = _everything(run)
    costs = trial.probe(run, steps=2, warmup=1)
    assert [c.name for c in costs] == ["head", "all"] and all(c.step_s > 0 and c.val_s > 0 for c in costs)
    assert _same(before, _everything(run))
    curve = train.find_lr(run, steps=30)
    assert _same(before, _everything(run))
    assert 5 <= len(curve.losses) <= 30 and curve.stage == "head" and curve.peaks == (1e-3,)
    assert min(curve.scales) <= curve.steepest <= max(curve.scales) and curve.scales[0] == pytest.approx(1e-7)
    assert "lr_scale=" in curve.advice()
    fig = curves.lr_finder(curve)
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].get_lines()) == 4  # the curve, two marks, the peak


def test_a_run_that_called_the_finder_first_has_the_same_history(tmp_path):
    rows = []
    for name, first in (("plain", False), ("after-finder", True)):
        run = train.prepare(tiny(tmp_path, name, epochs=2, max_train_samples=96))
        if first:
            train.find_lr(run, steps=8)
        list(train.epochs(run))
        rows.append([{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in run.history])
    assert rows[0] == rows[1]


def test_a_stage_may_end_inside_an_epoch_and_writes_its_row_there(tmp_path):
    """Stages in optimizer steps (what a budget plans): the head 5 steps, then everything 17, with
    12 steps an epoch: rows after 5, 12 and 17 steps."""
    stages = json.dumps([{"name": "head", "share": 1, "groups": ["head"], "lr": [1e-3], "steps": 5},
                         {"name": "all", "share": 2, "groups": ["layer4", "head"], "lr": [1e-3, 1e-2], "steps": 17}])
    run = train.prepare(tiny(tmp_path, "steps", stages=stages))
    rows = list(train.epochs(run))
    assert [(r["epoch"], r["stage"], r["stage_epoch"]) for r in rows] == [(1, "head", 1), (2, "all", 1), (3, "all", 2)]
    assert [s.epochs for s in run.cfg.stages] == [1, 2]  # config.json: the rows each stage writes
    table = runs.table(str(tmp_path / "ckpt")).set_index("run")
    assert table.loc["steps", "status"] == "finished" and table.loc["steps", "epochs_done"] == 3


def test_a_budgeted_run_plans_trains_records_and_resumes(tmp_path, monkeypatch, capsys):
    """A generous budget for a tiny run; stopped during its first validation, then resumed: the
    plan is kept, the time already spent counts, and the end records the actual time."""
    real = train.validate
    monkeypatch.setattr(train, "validate", lambda r, m: (os.kill(os.getpid(), signal.SIGTERM), real(r, m))[1])
    cfg = tiny(tmp_path, "budget", budget_minutes=0.6, max_train_samples=96)
    run = train.prepare(cfg)
    out = capsys.readouterr().out
    assert "budget 0.6 min: head " in out and "predicted" in out and "budget_minutes=0 stages='[" in out
    planned = checkpoints.read_json(run.dir / "config.json")["plan"]["budget"]
    assert planned["predicted_minutes"] <= 0.6 and planned["spent_s"] > 0 and planned["actual_minutes"] is None
    assert [s.steps for s in run.cfg.stages] == [s["steps"] for s in planned["stages"]] and run.cfg.stages[0].steps >= 1
    with pytest.raises(train.guard.Interrupted):
        list(train.epochs(run))
    monkeypatch.undo()
    spent = checkpoints.load(run.dir / "last.pt")["resume"]["spent_s"]
    run = train.prepare(tiny(tmp_path, "budget", budget_minutes=0.6, max_train_samples=96, resume=True))
    assert run.cfg.plan["budget"]["stages"] == planned["stages"]  # the plan kept
    list(train.epochs(run))
    done = checkpoints.read_json(run.dir / "config.json")["plan"]["budget"]
    assert done["actual_minutes"] * 60 > spent and len(done["replans"]) == 1  # re-planned at the second stage
    assert "took" in capsys.readouterr().out
    row = runs.table(str(tmp_path / "ckpt")).set_index("run").loc["budget"]
    assert row["budget_min"] == 0.6 and row["planned_min"] > 0 and row["actual_min"] == done["actual_minutes"]


def test_too_small_a_budget_is_refused_before_training(tmp_path):
    with pytest.raises(UserError, match=r"budget_minutes=0.01 is too small.*The smallest budget that would work is "
                                        r"budget_minutes=\d+\.\d"):
        train.prepare(tiny(tmp_path, "tiny-budget", budget_minutes=0.01))


def test_the_finder_on_the_command_line_trains_nothing_and_makes_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "epochs", lambda run: pytest.fail("trained"))
    train.main(["preset=cpu", *[f"{k}={v}" for k, v in TINY.items()], f"data_dir={tmp_path.parent / 'data'}",
                f"checkpoint_dir={tmp_path / 'ckpt'}", "run_name=finder", "find_lr=True"])
    out = capsys.readouterr().out
    assert "learning-rate finder, stage 'head'" in out and "lr_scale=" in out
    plot = out.split("plot: ")[1].strip()
    assert os.path.isfile(plot) and not (tmp_path / "ckpt").exists()
    os.remove(plot)
