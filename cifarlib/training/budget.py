"""Train to the time you have: the stages' lengths planned to a wall-clock budget.

Given what a stage costs (the seconds of one optimizer step at its image size with its trainable
layers, and of one validation pass at that size, measured by `cifarlib.training.trial.probe`), `fit`
chooses every stage's length in optimizer steps so that the whole run ends near the budget:

- the preset's proportions between stages are kept (a stage's share of the epochs), by one
  scale factor, the largest whose predicted time fits;
- lengths are optimizer steps, so a stage may end inside an epoch (the one-cycle schedule is
  sized to them in advance);
- a stage validates at every epoch boundary inside it and at its end, and each validation is
  counted;
- a stage ends at an epoch boundary, unless the steps past it take at least as long as the
  validation and save they bring with them; the time those steps would have taken goes to the
  stages before, or to the next whole epoch (`at_boundaries`);
- as the run goes, the stages not yet run are planned again from the pace it measured
  (`replan`), and the last stage is fitted again at each of its epoch boundaries (`refit_last`).

Pure arithmetic, no clock and no torch: the tests plan with given step times. fastai, timm and
Lightning all take a number of epochs; none plans a run to a time, so this is our own.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass


# What a command takes after its run's last file, which its budget must leave room for: a
# notebook's last cells, its kernel's shutdown and the executed copy's write under `make train`
# (3.5 s on the 2-core VM, 2026-12-07: the run's own clock said 15.0 min, the command 15.05), a
# process's exit on the command line.
EXIT_S = 5.0


class TooSmall(Exception):
    """The budget does not cover the fixed costs and the shortest run; `minimum_s` would."""

    def __init__(self, minimum_s: float):
        super().__init__(minimum_s)
        self.minimum_s = minimum_s


@dataclass(frozen=True)
class StageCost:
    name: str
    share: float         # the preset's share of the epochs
    image_size: int
    step_s: float        # seconds per optimizer step, augmentation included
    val_s: float         # seconds per validation pass at its image size


def stage_seconds(cost: StageCost, steps: int, steps_per_epoch: int, save_s: float = 0.0) -> float:
    """Predicted seconds of a stage of `steps` optimizer steps: its steps, and a validation (and
    the hand-off of a save) at every epoch boundary inside it and at its end."""
    rows = -(-steps // steps_per_epoch)
    return steps * cost.step_s + rows * (cost.val_s + save_s)


def _seconds(costs: list[StageCost], steps: list[int], steps_per_epoch: int, save_s: float) -> float:
    """The stages' predicted seconds, exactly: the total is not summed from the rounded figures
    `_stages` records, which could put a plan that fits its budget a little over it."""
    return sum(stage_seconds(c, n, steps_per_epoch, save_s) for c, n in zip(costs, steps))


def _steps(costs: list[StageCost], k: float, steps_per_epoch: int) -> list[int]:
    return [max(1, round(k * c.share * steps_per_epoch)) for c in costs]


def fit(costs: list[StageCost], steps_per_epoch: int, seconds: float, save_s: float = 0.0) -> list[int]:
    """Each stage's length in optimizer steps: the preset's proportions scaled by the largest
    factor whose predicted time fits in `seconds` (the budget left after what is already spent and
    the final save), then each stage's end moved to an epoch boundary where the steps past it do
    not pay for their row (`at_boundaries`). `TooSmall` if even one step per stage does not fit."""
    return at_boundaries(costs, proportional(costs, steps_per_epoch, seconds, save_s), steps_per_epoch, seconds, save_s)


def proportional(costs: list[StageCost], steps_per_epoch: int, seconds: float, save_s: float = 0.0) -> list[int]:
    """The preset's proportions, scaled by the largest factor whose predicted time fits in
    `seconds`; `TooSmall` if even one step per stage does not fit."""
    shortest = _seconds(costs, [1] * len(costs), steps_per_epoch, save_s)
    if shortest > seconds:
        raise TooSmall(shortest - seconds)
    return _largest(costs, [1] * len(costs), steps_per_epoch, seconds, save_s, shares=True)


def _largest(costs: list[StageCost], base: list[int], steps_per_epoch: int, seconds: float, save_s: float,
             shares: bool = False, after_s: float = 0.0) -> list[int]:
    """The longest stages that fit in `seconds` beside `after_s` seconds of stages after them: the
    preset's shares scaled (`shares`), or `base` scaled, by the largest factor that fits."""
    def steps(k: float) -> list[int]:
        return _steps(costs, k, steps_per_epoch) if shares else [max(1, round(k * n)) for n in base]
    total = lambda k: _seconds(costs, steps(k), steps_per_epoch, save_s) + after_s  # noqa: E731
    lo, hi = (0.0, 1.0) if shares else (1.0, 2.0)
    while total(hi) <= seconds:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            break
    for _ in range(60):  # bisection on the factor; the step counts change in whole steps
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= seconds else (lo, mid)
    return steps(lo)


def at_boundaries(costs: list[StageCost], steps: list[int], steps_per_epoch: int, seconds: float,
                  save_s: float = 0.0) -> list[int]:
    """Where each stage ends. A stage longer than an epoch ends at an epoch boundary, unless the
    steps past the boundary take at least as long as the validation and save they bring with
    them (the stage's last row). Steps that do not pay for their row are worth more elsewhere:
    the stage goes on to its next whole epoch where that fits in `seconds`, and otherwise ends at
    the boundary and gives their time, and their row's, to the stages before it, in proportion
    to those stages' lengths. From the last stage back, so that a stage that grows is checked
    after. A stage shorter than an epoch ends where it is planned: its one row is its end.

    Why: on 45,000 real photos a 10-minute plan ended its full stage 39 steps past an epoch
    boundary; those 21 s of steps brought a validation and a save of 14 s, and a row worse than
    the one before."""
    steps = list(steps)
    for i in reversed(range(len(costs))):
        past, c = steps[i] % steps_per_epoch, costs[i]
        if steps[i] <= steps_per_epoch or past == 0 or past * c.step_s >= c.val_s + save_s:
            continue
        whole = steps[:i] + [steps[i] + steps_per_epoch - past] + steps[i + 1:]
        if _seconds(costs, whole, steps_per_epoch, save_s) <= seconds:
            steps = whole
            continue
        steps[i] -= past
        if i:
            after = _seconds(costs[i:], steps[i:], steps_per_epoch, save_s)
            steps[:i] = _largest(costs[:i], steps[:i], steps_per_epoch, seconds, save_s, after_s=after)
    return steps


@dataclass
class BudgetPlan:
    """What a budgeted run planned, recorded in config.json and last.pt (under `plan`, beside the
    device plan) and updated as it goes: re-planned stages, and at its end the actual time."""
    budget_minutes: float
    steps_per_epoch: int
    stages: list[dict]             # per stage: name, image_size, steps, step_s, val_s, predicted_s
    spent_s: float                 # spent before training: loading, the probe (the command's start, on the CLI)
    save_s: float                  # the files of one history row
    predicted_minutes: float       # the whole run, as planned
    actual_minutes: float | None = None  # added at the run's end
    replans: list[dict] | None = None    # each re-plan at a stage boundary: where, the time spent, the new steps
    exit_s: float = 0.0            # left for the command's end after the run's (EXIT_S; 0 in runs from before it)

    def to_dict(self) -> dict:
        return asdict(self)


def _stages(costs: list[StageCost], steps: list[int], steps_per_epoch: int, save_s: float) -> list[dict]:
    return [{"name": c.name, "image_size": c.image_size, "steps": n, "step_s": round(c.step_s, 4),
             "val_s": round(c.val_s, 3), "predicted_s": round(stage_seconds(c, n, steps_per_epoch, save_s), 1)}
            for c, n in zip(costs, steps)]


def make_plan(costs: list[StageCost], steps_per_epoch: int, budget_s: float, spent_s: float, save_s: float,
              exit_s: float = 0.0) -> BudgetPlan:
    """The plan for a run that has spent `spent_s` (loading, the probe) and writes `save_s`
    seconds of files at each row, the last of them after training, and whose command needs
    `exit_s` after that (`EXIT_S`); `TooSmall` names the smallest budget that would do."""
    try:
        steps = fit(costs, steps_per_epoch, budget_s - spent_s - save_s - exit_s, save_s)
    except TooSmall as e:
        raise TooSmall(budget_s + e.minimum_s) from None
    predicted = spent_s + save_s + _seconds(costs, steps, steps_per_epoch, save_s)
    return BudgetPlan(round(budget_s / 60, 3), steps_per_epoch, _stages(costs, steps, steps_per_epoch, save_s),
                      round(spent_s, 1), round(save_s, 2), round(predicted / 60, 3), replans=[], exit_s=exit_s)


def replan(plan: BudgetPlan, start: int, costs: list[StageCost], spent_s: float, basis: str = "") -> BudgetPlan:
    """The stages from `start` on planned again with the time left after `spent_s` and their costs
    (already scaled to the speed measured so far, on which `basis` says); earlier stages keep what
    they ran. With no time left, each remaining stage gets one step."""
    left = plan.budget_minutes * 60 - spent_s - plan.save_s - plan.exit_s
    try:
        steps = fit(costs, plan.steps_per_epoch, left, plan.save_s)
    except TooSmall:
        steps = [1] * len(costs)
    stages = plan.stages[:start] + _stages(costs, steps, plan.steps_per_epoch, plan.save_s)
    predicted = spent_s + plan.save_s + _seconds(costs, steps, plan.steps_per_epoch, plan.save_s)
    note = {"at_stage": start, "spent_s": round(spent_s, 1), "steps": steps, **({"basis": basis} if basis else {})}
    return BudgetPlan(plan.budget_minutes, plan.steps_per_epoch, stages, plan.spent_s, plan.save_s,
                      round(predicted / 60, 3), replans=[*(plan.replans or []), note], exit_s=plan.exit_s)


def refit_last(plan: BudgetPlan, done: int, cost: StageCost, spent_s: float) -> BudgetPlan:
    """The last stage, `done` steps into it at one of its epoch boundaries, made as long as the
    time left allows at the pace measured in it (`cost`): the probe's figure, or a pace carried
    over from the stage before, was off by up to 19% on this machine, and the last stage is where
    that error would land on the budget. Its end then follows `at_boundaries`' rule; it may end
    now (`done` steps), where not one more epoch's row pays."""
    spe, last = plan.steps_per_epoch, len(plan.stages) - 1
    left = plan.budget_minutes * 60 - spent_s - plan.save_s - plan.exit_s
    rest = lambda n: n * cost.step_s + -(-n // spe) * (cost.val_s + plan.save_s)  # noqa: E731  (done is at a boundary)
    lo, hi = 0, 1
    while rest(hi) <= left and hi < 1 << 30:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if rest(mid) <= left else (lo, mid)
    more = lo
    past = more % spe
    if more and past and past * cost.step_s < cost.val_s + plan.save_s:
        more -= past  # its last row would not pay: end at the boundary before (it may be this one)
    stages = plan.stages[:last] + [{**plan.stages[last], "steps": done + more, "step_s": round(cost.step_s, 4),
                                    "val_s": round(cost.val_s, 3)}]
    predicted = spent_s + plan.save_s + rest(more)
    note = {"at_stage": last, "at_step": done, "spent_s": round(spent_s, 1), "steps": [done + more],
            "basis": "the pace measured in the stage"}
    return BudgetPlan(plan.budget_minutes, spe, stages, plan.spent_s, plan.save_s, round(predicted / 60, 3),
                      replans=[*(plan.replans or []), note], exit_s=plan.exit_s)


def describe(plan: BudgetPlan) -> str:
    """`budget 10.0 min: head 0.6 epoch at 64 px, then all 1.2 epochs at 88 px; predicted 9.5 min`"""
    parts = []
    for s in plan.stages:
        epochs = s["steps"] / plan.steps_per_epoch
        parts.append(f"{s['name']} {epochs:.2g} epoch{'' if epochs <= 1 else 's'} at {s['image_size']} px")
    return (f"budget {plan.budget_minutes:.1f} min: {', then '.join(parts)}; "
            f"predicted {plan.predicted_minutes:.1f} min")


def reproduce(stages, plan: BudgetPlan) -> str:
    """The `stages` JSON that runs the same stages without a budget."""
    out = []
    for st, s in zip(stages, plan.stages):
        d = {"name": st.name, "share": st.share, "groups": list(st.groups), "lr": list(st.lr), "warmup": st.warmup,
             "anneal": st.anneal, "steps": s["steps"]}
        if st.image_size:
            d["image_size"] = st.image_size
        out.append(d)
    return json.dumps(out)


def minutes(seconds: float) -> str:
    return f"{math.ceil(seconds / 6) / 10:.1f}"
