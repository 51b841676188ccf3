"""Training curves, and runs compared: a run's loss and learning rates within epochs
(`loss_curves`, redrawn live in notebook 03 by `LiveCurves`), the learning-rate finder's curve,
and several runs side by side (notebook 06). Figures are drawn one at a time (the lock of
`cifarlib.core.figures`), since the background saver draws loss_curves.png while a notebook
draws its live curves.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..core.figures import ShownFigure, _one_at_a_time, png_bytes


@_one_at_a_time
def loss_curves(history: list[dict], trace: list[dict] | None = None, soft_targets: bool = False,
                best: int | None = None):
    """Two panels over the epochs of data trained on (a budgeted run's rows may each be part of
    an epoch: its `data_epochs`), stage boundaries marked on both. Above: the training loss,
    smoothed, within epochs (the run's trace, recorded at the loop's checks), with the validation
    loss and accuracy at each epoch's end. Below: each layer group's learning rate on a log scale,
    within epochs (warm-up, peak and anneal per group, as fastai's `plot_sched` shows them), a
    frozen group's spans drawn dotted along the bottom. Runs without a trace (from before it)
    show each epoch's training loss and last rate instead. `soft_targets`: the policy mixes
    images (Mixup, CutMix), so the training loss is taken against soft targets. `best`: the
    epoch (row) whose weights are best.pt, marked on the validation loss.

    Drawn on a `matplotlib.figure.Figure` without pyplot, whose global state is not
    thread-safe: the background saver draws this while a notebook draws its live curves.
    """
    h, t = pd.DataFrame(history), pd.DataFrame(trace or [])
    fig = ShownFigure(figsize=(8, 5.2))
    ax, lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    what = "training loss" + (", smoothed" if len(t) else "") + (" (augmented, soft targets)" if soft_targets else " (augmented)")
    if len(t):
        ax.plot(t["x"], t["loss"], "-", lw=1, label=what)
    if len(h):
        h = h.astype({"epoch": int, "train_loss": float, "val_loss": float, "val_acc": float})
        h["x"] = h["data_epochs"].astype(float) if "data_epochs" in h else h["epoch"].astype(float)
        if not len(t):
            ax.plot(h["x"], h["train_loss"], "o-", ms=3, label=what)
        ax.plot(h["x"], h["val_loss"], "o-", ms=3, label="validation loss")
        if best is not None and (h["epoch"] == best).any():
            row = h[h["epoch"] == best].iloc[0]
            ax.plot([row["x"]], [row["val_loss"]], "*", ms=11, color="tab:red", label=f"best.pt (epoch {best})")
        acc = ax.twinx()
        acc.plot(h["x"], h["val_acc"], "s--", ms=3, color="tab:green", label="validation accuracy")
        acc.set_ylabel("accuracy")
        acc.set_ylim(0, 1)
        lines = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="center right")
    stages = t if len(t) else h
    _rates(lr, stages, "-" if len(t) else "o-")
    if len(stages):
        # where each stage begins: after the previous stage's last point (a point's x is where its
        # interval of training ends)
        x = stages["x"]
        starts = stages.index[stages["stage"] != stages["stage"].shift()]
        begin = [float(x[i - 1]) if i > 0 else 0.0 for i in starts]
        for panel in (ax, lr):  # vlines, not axvline: the panels' lines are the data alone
            panel.vlines(begin, 0, 1, transform=panel.get_xaxis_transform(), colors="grey", lw=0.8, linestyles=":")
        for b, i in zip(begin, starts):
            ax.text(b + 0.02, 0.98, stages.loc[i, "stage"], transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_ylabel("loss")
    lr.set_ylabel("learning rate")
    lr.set_xlabel("epochs of data")
    fig.tight_layout()
    return fig


def _rates(panel, frame: pd.DataFrame, style: str) -> None:
    """Each group's learning rate on a log scale; where a group is frozen (rate 0), a dotted line
    in its colour along the bottom of the panel."""
    slots = [c for c in frame.columns if c.startswith("lr_")] or [c for c in ("lr",) if c in frame]
    if not slots:
        return
    rates = frame[slots].astype(float)
    floor = rates[rates > 0].min().min() if (rates > 0).any().any() else 1e-8
    for k, c in enumerate(slots):
        line, = panel.plot(frame["x"], rates[c].where(rates[c] > 0), style, ms=2, lw=1, label=c.removeprefix("lr_"))
        frozen = rates[c].where(rates[c] == 0)
        if frozen.notna().any():  # one row per group below the lowest rate, apart on the log scale
            panel.plot(frame["x"], frozen.where(frozen.isna(), floor / 3 / 1.6 ** k), ":", lw=1.5, color=line.get_color())
    panel.set_yscale("log")
    panel.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), title="dotted below:\nfrozen",
                 title_fontsize=6)


@_one_at_a_time
def lr_finder(curve):
    """The learning-rate range test (`cifarlib.training.trial.find_lr`): the smoothed loss against the rate
    of the stage's last group (the others move in proportion), on a log axis, with the suggestion
    (the valley) and the minimum / 10 marked, each with the lr_scale that trains with it."""
    fig = ShownFigure(figsize=(6, 3.6))
    ax = fig.subplots()
    group, peak = curve.groups[-1], curve.peaks[-1]
    ax.plot([s * peak for s in curve.scales], curve.losses, "-", lw=1.2)
    for scale, style, label in ((curve.valley, "-", "valley (suggested)"), (curve.minimum_tenth, ":", "minimum / 10")):
        ax.axvline(scale * peak, color="tab:red", ls=style, lw=1,
                   label=f"{label}: {scale * peak:.2g} (lr_scale={scale * curve.lr_scale:.3g})")
    ax.axvline(peak, color="grey", ls="--", lw=0.8, label=f"this run's peak: {peak:.2g} (lr_scale={curve.lr_scale:g})")
    ax.set_xscale("log")
    ax.set_xlabel(f"learning rate of {group} (the stage's other groups in proportion)")
    ax.set_ylabel("training loss, smoothed")
    ax.set_title(f"learning-rate finder, stage {curve.stage!r}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


class LiveCurves:
    """In a notebook: one loss-curve figure, redrawn in place after every epoch."""

    def __init__(self):
        from IPython.display import display
        self.handle = display(None, display_id=True)

    def __call__(self, run) -> None:
        """Draw `run`'s curves (a `cifarlib.training.run.Run`: its history, its trace and whether its
        augmentation mixes images)."""
        from IPython.display import Image

        from ..data.augment import mixes
        # rendered by png_bytes, one figure at a time; IPython's own printer for figures would not wait
        fig = loss_curves(run.history, run.trace.points, mixes(run.aug.policy))
        self.handle.update(Image(png_bytes(fig)))


def run_colours(names) -> dict[str, tuple]:
    """One colour per run, the same in every comparison figure."""
    names = list(names)
    palette = sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))
    return dict(zip(names, palette))


def compare_curves(histories: dict[str, pd.DataFrame], metric: str = "val_acc", colours: dict | None = None):
    """Runs side by side: the validation `metric` per epoch (left) and the training loss (right),
    one colour per run; dotted lines in a run's colour mark where its stages begin (nudged apart
    so that runs with the same stages all show)."""
    colours = colours or run_colours(histories)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharex=True)
    for k, (name, h) in enumerate(histories.items()):
        nudge = (k - (len(histories) - 1) / 2) * min(0.05, 0.5 / len(histories))
        starts = h["epoch"][h["stage"] != h["stage"].shift()].iloc[1:] if "stage" in h else []
        for ax, column in zip(axes, (metric, "train_loss")):
            ax.plot(h["epoch"], h[column], "o-", ms=3, color=colours[name], label=name)
            for epoch in starts:
                ax.axvline(epoch - 0.5 + nudge, color=colours[name], ls=":", lw=1.2)
    axes[0].set_ylabel({"val_acc": "validation accuracy", "val_loss": "validation loss"}.get(metric, metric))
    axes[1].set_ylabel("training loss (on augmented images)")  # soft targets too, where a run's policy mixes
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    if histories:
        axes[0].legend(fontsize=7, loc="best")
    else:
        axes[0].text(0.5, 0.5, "no run has a finished epoch yet", ha="center", transform=axes[0].transAxes)
    fig.tight_layout()
    plt.close(fig)
    return fig


def metric_bars(table: pd.DataFrame, colours: dict | None = None):
    """Test top-1, top-5 and ECE of each run in `table` (rows holding test metrics), grouped by metric."""
    names = {"test_top1": "top-1 accuracy", "test_top5": "top-5 accuracy", "ece": "ECE (lower is better)"}
    long = table.melt(id_vars="run", value_vars=list(names), var_name="metric", value_name="value")
    long["metric"] = long["metric"].map(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 + 0.45 * len(long)), 3.5))
    sns.barplot(data=long, x="metric", y="value", hue="run", palette=colours or run_colours(table["run"]),
                errorbar=None, saturation=1, ax=ax)
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xlabel("")
    ax.set_ylabel("on the test split")
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize=7, title=None)
    fig.tight_layout()
    plt.close(fig)
    return fig
