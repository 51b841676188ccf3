"""Train to the time you have (`budget_minutes`), and the learning-rate finder.

The planning is tested with given step times (no clock, no training); a few tiny real runs
(timm's `test_resnet`, 32 px) check that a budgeted run trains, validates, writes its plan and
resumes, that a stage may end inside an epoch, and that the probe and the finder leave no trace.
How close a run comes to its budget is measured in benchmarks/README.md, not asserted here.
"""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from cifarlib.core.errors import UserError
from cifarlib.data.augment import BatchAugment
from cifarlib.model import checkpoints
from cifarlib.training import budget, config, curves, train, trial
from cifarlib.training.budget import StageCost
from cifarlib.training.config import make_config
from cifarlib.evaluation import runs

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="synthetic", weights="none", backbone="test_resnet", image_size=32, batch_size=16,
            max_train_samples=192, max_eval_samples=48, device="cpu")  # 12 steps an epoch


def tiny(tmp_path, name, **kw):
    return make_config(kw.pop("preset", "cpu"), **{**TINY, "data_dir": str(tmp_path.parent / "data"),
                                                    "checkpoint_dir": str(tmp_path / "ckpt"), "run_name": name, **kw})


# --- planning, with given step times -------------------------------------------------------------

COSTS = [StageCost("head", 1, 64, step_s=0.1, val_s=2.0), StageCost("all", 2, 88, step_s=0.5, val_s=3.0)]


def test_a_plan_keeps_the_presets_proportions_and_fits_the_time():
    for seconds in (60, 300, 3000):
        head, all_ = budget.proportional(COSTS, 100, seconds)
        used = sum(budget.stage_seconds(c, n, 100) for c, n in zip(COSTS, (head, all_)))
        assert used <= seconds and abs(all_ / head - 2) < 0.1  # the preset's 1:2, in optimizer steps
        more = [round(n * 1.02) + 1 for n in (head, all_)]
        assert sum(budget.stage_seconds(c, n, 100) for c, n in zip(COSTS, more)) > seconds  # not much left over
    head, all_ = budget.proportional(COSTS, 100, 300)
    assert (head, all_) == (251, 501)  # 2.51 and 5.01 epochs: stages end inside epochs, validating 3 and 6 times
    assert budget.stage_seconds(COSTS[0], 251, 100) + budget.stage_seconds(COSTS[1], 501, 100) == pytest.approx(
        251 * 0.1 + 3 * 2.0 + 501 * 0.5 + 6 * 3.0)  # 299.6 s


def test_a_stage_ends_at_an_epoch_boundary_unless_its_steps_past_it_pay_for_their_row():
    """The last of 501 steps is 0.5 s past the 5th epoch and brings a row of 3 s: the stage ends at
    500, and the 3.5 s go to the head, which grows; where the next whole epoch fits, the stage
    goes on to it; where the steps past the boundary take longer than their row, they stay."""
    head, all_ = budget.fit(COSTS, 100, 300)
    assert all_ == 500 and head > 251
    assert budget.stage_seconds(COSTS[0], head, 100) + budget.stage_seconds(COSTS[1], all_, 100) <= 300
    assert budget.at_boundaries(COSTS, [251, 501], 100, seconds=400) == [251, 600]  # its next whole epoch fits
    slow_rows = [StageCost("head", 1, 64, 0.1, 2.0), StageCost("all", 2, 88, 0.5, 30.0)]
    assert budget.at_boundaries(slow_rows, [251, 530], 100, seconds=420)[1] == 500  # 30 steps, 15 s < a 30-s row
    assert budget.at_boundaries(COSTS, [251, 530], 100, seconds=420) == [251, 530]  # 30 steps, 15 s > a 3-s row
    assert budget.at_boundaries(COSTS, [51, 90], 100, seconds=420) == [51, 90]  # under an epoch: its row is its end
    plan = budget.make_plan(COSTS, 100, budget_s=331, spent_s=30, save_s=0.0)  # the same, through the plan
    assert plan.stages[1]["steps"] % 100 == 0


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
    assert [c.name for c in costs] == ["head", "top"] and all(c.step_s > 0 and c.val_s > 0 for c in costs)
    assert _same(before, _everything(run))
    curve = train.find_lr(run, per_decade=3)
    assert _same(before, _everything(run))
    assert 5 <= len(curve.losses) <= 22 and curve.stage == "head" and curve.peaks == (1e-3,)
    assert min(curve.scales) <= curve.valley <= max(curve.scales) and curve.scales[0] == pytest.approx(1e-4)
    assert "lr_scale=" in curve.advice()
    fig = curves.lr_finder(curve)
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].get_lines()) == 4  # the curve, two marks, the peak


def test_a_run_that_called_the_finder_first_has_the_same_history(tmp_path):
    rows = []
    for name, first in (("plain", False), ("after-finder", True)):
        run = train.prepare(tiny(tmp_path, name, epochs=2, max_train_samples=96))
        if first:
            train.find_lr(run, per_decade=1)
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
    assert done["actual_minutes"] * 60 > spent and done["replans"][0]["at_stage"] == 1  # re-planned at the second stage
    assert all("at_step" in r for r in done["replans"][1:])  # and fitted again inside it, at its epoch boundaries
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


# --- issue 28: a planner that learns from the run, and a finder that can be trusted ---------------

def stage_costs(run):
    return [budget.StageCost(s.name, s.share, 32, 0.3, 0.5) for s in run.cfg.stages]


def planned(tmp_path, name, monkeypatch, **kw):
    """A budgeted tiny run whose probe is stood in for (0.3 s a step, 0.5 s a validation: more
    than this tiny run takes, so that it trains only a few epochs): its plan is arithmetic on
    given costs, whatever this machine's pace. No early stopping: each stage runs as planned."""
    monkeypatch.setattr(trial, "probe", lambda run, stages=None, **k: [stage_costs(run)[i] for i in
                                                                       (stages or range(len(run.cfg.stages)))])
    monkeypatch.setattr(train, "_keep_pace", lambda *a: None)  # nor is the pace measured: it would plan long
    return train.prepare(tiny(tmp_path, name, budget_minutes=kw.pop("budget_minutes", 0.5), max_train_samples=96,
                              patience=100, **kw))


def test_a_replan_takes_the_measured_pace_for_what_has_run_and_the_probe_for_what_has_not(tmp_path, monkeypatch):
    """Three stages, the second like the first (the head alone, 64 px), the third not (every layer,
    88 px): after the first ran at 0.89 of its probed step time, the second is planned at 0.89 of
    its probe's, the third at its probe's own (a pace measured on the head did not hold for the
    full stage on the real photos), and nothing is probed again."""
    from cifarlib.training import prepare as preparing
    stages = json.dumps([{"name": "head", "share": 1, "groups": ["head"], "lr": [1e-3], "image_size": 64},
                         {"name": "head2", "share": 1, "groups": ["head"], "lr": [1e-3], "image_size": 64},
                         {"name": "all", "share": 2, "groups": list(config.GROUPS), "lr": [1e-3] * 6}])
    run = planned(tmp_path, "pace", monkeypatch, stages=stages, image_size=88)
    plan = budget.BudgetPlan(**run.cfg.plan["budget"])
    monkeypatch.setattr(trial, "probe", lambda *a, **k: pytest.fail("probed again"))
    run.pace[0] = (0.267 * 50, 50, 1.0, 1)  # 50 steps of the head at 0.267 s, one validation of 1 s
    costs, basis = preparing._costs_now(run, plan, 1)
    assert costs[0].step_s == pytest.approx(0.3 * 0.89) and costs[0].val_s == pytest.approx(0.5 * 2)
    assert costs[1].step_s == pytest.approx(0.3) and costs[1].val_s == pytest.approx(0.5)
    assert basis == "the probe's, after the time spent (stage 'head' ran at 0.89x its probe)"
    run.cfg = preparing.replan(run, 1)
    assert run.cfg.plan["budget"]["replans"][-1]["basis"] == basis


def test_a_run_resumed_at_a_stage_boundary_plans_again_and_a_replan_updates_the_epochs(tmp_path, monkeypatch):
    """Stopped as its head stage ends (its last.pt at the next stage's step 0) and resumed: the
    next stage is planned again, from a fresh probe (this process has measured nothing), and
    config.json's epochs are the rows each stage writes as re-planned (the runs table replays
    them)."""
    real = train.validate

    def validate(r, m):  # the head stage's last validation: last.pt is written at the boundary
        if r.stage.index == 0 and len(r.history) + 1 == config.stage_rows(r.stage.stage, train.steps_per_epoch(r)):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(r, m)
    monkeypatch.setattr(train, "validate", validate)
    run = planned(tmp_path, "boundary", monkeypatch)
    with pytest.raises(train.guard.Interrupted):
        list(train.epochs(run))
    monkeypatch.setattr(train, "validate", real)
    run = planned(tmp_path, "boundary", monkeypatch, resume=True)
    assert run.at == train.Progress(1, 0)
    replans = []
    real_replan = train.replan
    monkeypatch.setattr(train, "replan", lambda r, si: replans.append(si) or real_replan(r, si))
    list(train.epochs(run))
    assert replans == [1]
    cfg = checkpoints.read_json(run.dir / "config.json")
    spe = cfg["plan"]["budget"]["steps_per_epoch"]
    assert [s["epochs"] for s in cfg["stages"]] == [-(-s["steps"] // spe) for s in cfg["stages"]]
    assert runs.table(str(tmp_path / "ckpt")).set_index("run").loc["boundary", "status"] == "finished"


def test_time_spent_between_the_plan_and_the_first_step_is_planned_for(tmp_path, monkeypatch):
    """The finder's cell or a pause in notebook 03 comes between prepare's plan and training: the
    first stage is planned again when it starts, with the time left then."""
    run = planned(tmp_path, "pause", monkeypatch)
    replans = []
    real_replan = train.replan
    monkeypatch.setattr(train, "replan", lambda r, si: replans.append(si) or real_replan(r, si))
    run.planned_at -= 10  # ten seconds ago
    run.started -= 10
    list(train.epochs(run))
    assert replans[0] == 0 and run.cfg.plan["budget"]["replans"][0]["at_stage"] == 0


def test_the_finders_valley_is_not_fooled_by_the_noise_of_its_first_points():
    """Simulated curves: flat with batch-loss noise, a real drop, then divergence, smoothed as the
    finder smooths them. The steepest slope over the whole curve picked one of the first 10 steps
    in most trials; the trimmed valley must pick none, and land in the drop."""
    import random
    rng, early, inside = random.Random(0), 0, 0
    for trial_ in range(300):
        scales = [1e-4 * 10 ** (i / 20) for i in range(141)]
        drop, noise = rng.uniform(0.3, 1.0), rng.uniform(0.1, 0.2)
        raw = [2.3 - drop / (1 + math.exp(-(math.log10(s) - 0) * 4)) + (0 if s < 30 else (math.log10(s) - 1.5) * 3)
               + rng.gauss(0, noise) for s in scales]
        avg, smooth = 0.0, []
        for i, v in enumerate(raw):
            avg = 0.98 * avg + 0.02 * v
            smooth.append(avg / (1 - 0.98 ** (i + 1)))
        curve = trial._suggest("head", ("head",), (1e-3,), scales, smooth, 141, 1.0)
        early += curve.scales.index(curve.valley) < 10
        inside += 1e-2 <= curve.valley <= 1e2
    assert early == 0 and inside >= 290, (early, inside)


def test_the_finders_valley_is_not_fooled_by_a_zero_heads_smooth_plateau():
    """A head that starts at zero: every batch's first loss is ln(10), so the sweep's first
    decades fall smoothly by tiny amounts, without noise, before the real drop. fastai's rule
    took that plateau for valley (on the real photos: 0.07 times the preset, left of the drop);
    the valley must lie in the drop."""
    scales = [1e-4 * 10 ** (i / 20) for i in range(141)]
    raw = [math.log(10) - 0.5 / (1 + math.exp(-(math.log10(s) - 0.5) * 3)) + (0 if s < 30 else (math.log10(s) - 1.5) * 3)
           for s in scales]
    avg, smooth = 0.0, []
    for i, v in enumerate(raw):
        avg = 0.98 * avg + 0.02 * v
        smooth.append(avg / (1 - 0.98 ** (i + 1)))
    curve = trial._suggest("head", ("head",), (1e-3,), scales, smooth, 141, 1.0)
    top, low = smooth[14], min(smooth)  # the smoothed curve's own fall, which lags the raw drop at 3 times the peak
    fall = [s for s, v in zip(scales, smooth) if s < scales[smooth.index(low)] and v < top - 0.05 * (top - low)]
    assert fall[0] <= curve.valley <= fall[-1], (curve.valley, fall[0], fall[-1])  # 0.71 to 32
    assert trial.valley(smooth[14:136]) < trial.valley(smooth[14:136], tol=0.005)  # without the tolerance: on the plateau


def test_the_finders_advice_is_the_runs_lr_scale_times_the_valley(tmp_path):
    curve = trial.LRCurve("head", ("head",), (5e-4,), [1.0], [1.0], valley=3.0, minimum_tenth=1.0, lr_scale=0.5)
    assert "set lr_scale=1.5 " in curve.advice() and "lr_scale=0.5" in curve.advice()


def test_the_finder_steps_the_effective_batch_and_sweeps_past_the_peak_until_the_loss_diverges(tmp_path, monkeypatch):
    calls, real = [], BatchAugment.__call__
    monkeypatch.setattr(BatchAugment, "__call__", lambda self, x, y: (calls.append(1), real(self, x, y))[1])
    run = train.prepare(tiny(tmp_path, "sweep", accum_steps=2, max_train_samples=96))
    curve = train.find_lr(run, per_decade=3)
    assert len(calls) == 2 * len(curve.losses)  # two micro-batches an optimizer step
    assert curve.scales[0] == pytest.approx(1e-4) and (max(curve.scales) > 10 or
                                                      curve.losses[-1] > 4 * min(curve.losses))


def test_find_lr_is_checked_as_every_setting_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "epochs", lambda run: pytest.fail("trained"))
    for value in ("1", "true"):
        with pytest.raises(SystemExit) as e:
            train.main(["preset=cpu", f"checkpoint_dir={tmp_path / 'ckpt'}", f"find_lr={value}"])
        assert e.value.code == 2 and "find_lr must be True or False" in capsys.readouterr().err


def test_notebook_03s_finder_leaves_no_run_folder_and_its_budget_line_can_be_followed(tmp_path, notebook_kernel):
    """find_lr=True twice with the same run_name: no folder, no 'already exists'; and `stages`,
    which a budget's plan prints, is a parameter of the notebook and of the command line."""
    import papermill as pm
    nb = ROOT / "notebooks" / "03_train.ipynb"
    for i in range(2):
        text = notebook_kernel.run(nb, tmp_path / f"{i}.ipynb", **{**TINY, "preset": "cpu", "max_train_samples": 48},
                                   data_dir=str(tmp_path.parent / "data"), checkpoint_dir=str(tmp_path / "ckpt"),
                                   run_name="finder", find_lr=True)
        assert "learning-rate finder, stage 'head'" in text and "nothing was trained" in text
    assert not (tmp_path / "ckpt").exists()
    assert "stages" in pm.inspect_notebook(str(nb)) and "stages='[" in train._usage()


def test_a_budgeted_runs_curves_count_the_epochs_of_data_it_saw(tmp_path, monkeypatch):
    """A head stage of half an epoch, then one and a half: the rows end at 0.5, 1.5 and 2 epochs
    of data, and the curves put them there; notebook 04's curves show the whole run, best.pt's
    row marked, though best.pt's own history stops at it."""
    from cifarlib.evaluation import plots
    stages = json.dumps([{"name": "head", "share": 1, "groups": ["head"], "lr": [1e-3], "steps": 6},
                         {"name": "all", "share": 2, "groups": ["layer4", "head"], "lr": [1e-3, 1e-2], "steps": 18}])
    run = train.prepare(tiny(tmp_path, "seen", stages=stages))
    rows = list(train.epochs(run))
    assert [r["data_epochs"] for r in rows] == [0.5, 1.5, 2.0]
    assert max(p["x"] for p in run.trace.points) == pytest.approx(2.0)
    fig = curves.loss_curves(rows, run.trace.points)
    val = next(line for line in fig.axes[0].get_lines() if line.get_label() == "validation loss")
    assert list(val.get_xdata()) == [0.5, 1.5, 2.0]
    best = checkpoints.load(run.dir / "best.pt")
    fig = plots.training_curves(best, run.dir)
    val = next(line for line in fig.axes[0].get_lines() if line.get_label() == "validation loss")
    star = next(line for line in fig.axes[0].get_lines() if line.get_label().startswith("best.pt"))
    assert len(val.get_xdata()) == 3 and star.get_xdata()[0] == rows[best["metrics"]["epoch"] - 1]["data_epochs"]


def test_the_last_stage_is_fitted_again_at_its_epoch_boundaries_at_its_own_pace():
    """A 10-minute plan whose last stage runs slower than planned: after its first epoch (100
    steps at 0.6 s, not the 0.5 planned) it gets what the time left allows at 0.6 s, and ends at
    an epoch boundary where the steps past it would not pay for their row."""
    plan = budget.make_plan(COSTS, 100, budget_s=600, spent_s=30, save_s=1)
    measured = StageCost("all", 2, 88, step_s=0.6, val_s=3.0)
    spent = 30 + plan.stages[0]["predicted_s"] + 100 * 0.6 + 3 + 1
    again = budget.refit_last(plan, 100, measured, spent)
    more = again.stages[1]["steps"] - 100
    left = 600 - spent - 1
    assert more * 0.6 + -(-more // 100) * 4 <= left < (more + 2) * 0.6 + -(-(more + 2) // 100) * 4
    assert again.stages[0] == plan.stages[0] and again.replans[-1]["at_step"] == 100
    tight = budget.refit_last(plan, 100, StageCost("all", 2, 88, step_s=0.6, val_s=30.0), 600 - 1 - 35)
    assert tight.stages[1]["steps"] == 100  # 1 step of 0.6 s would bring a 30-s row: the stage ends here


def test_a_refit_that_ends_the_last_stage_is_in_the_save_so_a_resume_trains_nothing_more(tmp_path, monkeypatch):
    """The last stage fitted again at its first epoch boundary, with no time left: it ends there.
    The row's save must say so (the run is done, its config the refitted one), or a resume, after
    a kill or of the finished run, would train the stage the old plan had left."""
    from cifarlib.training import prepare as prepare_module
    real = budget.refit_last
    monkeypatch.setattr(prepare_module.budget, "refit_last",
                        lambda plan, done, cost, spent_s: real(plan, done, cost, plan.budget_minutes * 60))
    run = train.prepare(tiny(tmp_path, "ends", budget_minutes=0.6, max_train_samples=96))
    assert run.cfg.stages[-1].epochs >= 2  # planned for more than the one row it will write
    rows = list(train.epochs(run))
    assert [r["stage"] for r in rows].count("top") == 1  # one row of the last stage: it ended at its first boundary
    saved = checkpoints.load(run.dir / "last.pt")
    assert (saved["resume"]["next_stage"], saved["resume"]["next_epoch"]) == (2, 0)
    assert saved["config"]["stages"][-1]["epochs"] == 1
    monkeypatch.undo()
    again = train.prepare(tiny(tmp_path, "ends", budget_minutes=0.6, max_train_samples=96, resume=True))
    assert list(train.epochs(again)) == []


def test_a_schedule_resized_under_way_goes_on_from_where_it_stood(tmp_path):
    from cifarlib.training import optimizer
    cfg, stage = make_config("cpu"), make_config("cpu").stages[1]
    net = torch.nn.Linear(2, 2)
    opt = optimizer.make_optimizer(cfg, [{"params": list(net.parameters()), "lr": 1e-3, "name": g} for g in ["x"]],
                                   fused=False)
    opt.param_groups[0]["lr"] = 1e-3
    stage = config.Stage("all", 1, ("head",), (1e-2,), warmup=0.1)
    sched = optimizer.make_schedule(cfg, opt, stage, 1000)
    for _ in range(300):
        opt.step()
        sched.step()
    before = opt.param_groups[0]["lr"]
    longer = optimizer.resize_schedule(cfg, opt, stage, sched, 1200)
    assert longer.last_epoch == 300 and longer.total_steps == 1200
    assert before < opt.param_groups[0]["lr"] <= 1e-2  # later in a longer anneal: a little higher, no jump to the start
