"""Validation accuracy against the wall time actually used, on real photographs: the `cpu`
preset's budgeted runs and the plain reference loop's runs, from `bench_real.py`'s JSON lines.

    python benchmarks/plot_real.py benchmarks/results/real_budget.jsonl \\
        --reference benchmarks/results/real_cpu_trials.jsonl --out benchmarks/results/real_budget.png

The preset's runs come from the files given first, the plain loop's from `--reference`. Only runs
on the whole split (45,000 training photos) are drawn: a subset's figures do not compare. Each point is one run: x, the whole command's minutes as `bench_real.py` timed it; y, the
validation top-1 after its last epoch. Budgeted runs are labelled with their budget, the others
with their settings, each with its date (the machine's speed varies from day to day); a dotted
line marks each budget. The preset as it has been since issue 28 (its second stage leaves the stem
and layer1 frozen) is drawn apart, its points labelled with their accuracy. A benchmark's
figure, not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure


def read(paths: list[str], who: str) -> list[dict]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    whole = lambda c: not c.get("max_train_samples") and c.get("train", 45_000) >= 45_000  # noqa: E731
    return [r for r in rows if r["who"] == who and whole(r.get("config", {}))]


def label(r: dict) -> str:
    c = r.get("config", {})
    if r["who"] == "cpu preset":
        b = c.get("budget_minutes") or 0
        when = f" ({r['date'][:10]})" if r.get("date") else ""
        return f"budget {b:g} min{when}" if b else f"cpu preset, {c.get('epochs')} epochs{when}"
    head = ", head at zero" if c.get("head_init") == "zero" else ""
    return f"plain loop, {c.get('image_size')} px, {c.get('epochs')} epochs{head} ({r.get('date', '')[:10]})"


def frozen_top(r: dict) -> bool:
    """The preset since issue 28: its second stage leaves the stem and layer1 frozen."""
    stages = r.get("config", {}).get("stages") or []
    return len(stages) > 1 and "stem" not in stages[-1].get("groups", ["stem"])


def draw(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    series = (("cpu preset", False, "o", "tab:blue", "the cpu preset, every layer trained in stage 2"),
              ("cpu preset", True, "D", "tab:green", "the cpu preset since issue 28 (stem, layer1 frozen)"),
              ("reference (plain loop)", False, "s", "tab:orange", "plain fine-tuning loop"))
    for who, frozen, marker, colour, name in series:
        mine = sorted((r for r in rows if r["who"] == who and frozen_top(r) == frozen), key=lambda r: r["command_s"])
        if not mine:
            continue
        xs, ys = [r["command_s"] / 60 for r in mine], [r["val_top1"] for r in mine]
        budgeted = [r for r in mine if r.get("config", {}).get("budget_minutes")]
        ax.plot(xs, ys, marker, color=colour, label=name)
        if budgeted and who == "cpu preset" and not frozen:
            ax.plot([r["command_s"] / 60 for r in budgeted], [r["val_top1"] for r in budgeted], "-", color=colour, lw=1)
        for i, (r, x, y) in enumerate(zip(mine, xs, ys)):
            text = f"{y:.1%}" if frozen else label(r)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, -10 if who != "cpu preset" else 4 + 9 * frozen * i),
                        fontsize=7)
    for b in sorted({r["config"]["budget_minutes"] for r in rows if r.get("config", {}).get("budget_minutes")}):
        ax.axvline(b, color="grey", ls=":", lw=0.8)
    ax.axhline(0.88, color="tab:green", ls="--", lw=0.8, label="goal at 10 min: 88%")
    ax.set_xlabel("whole command, minutes (dotted: the budgets)")
    ax.set_ylabel("validation top-1 (CIFAR-10 photos, 5,000)")
    ax.set_title("EfficientNet-Lite0, real ImageNet weights, 2-core CPU", fontsize=9)
    ax.margins(x=0.15, y=0.12)  # room for the labels
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON-lines files written by bench_real.py --out: the preset's runs")
    p.add_argument("--reference", nargs="*", default=[], help="JSON-lines files: the plain loop's runs")
    p.add_argument("--out", required=True, help="the PNG to write")
    a = p.parse_args()
    rows = read(a.results, "cpu preset") + read(a.reference, "reference (plain loop)")
    if not rows:
        raise SystemExit("no run on the whole split in these files")
    draw(rows).savefig(a.out, dpi=110, bbox_inches="tight")
    print(f"{len(rows)} runs drawn into {a.out}")


if __name__ == "__main__":
    main()
