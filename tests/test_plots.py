"""The figures' helpers: what a preview shows, and drawing from two threads."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from cifarlib.data.augment import POLICIES
from cifarlib.data.datasets import Split
from cifarlib.training import curves
from cifarlib.training.run import Trace
from cifarlib.evaluation.plots import mixing_sample


def test_the_mixing_preview_pairs_pictures_of_different_classes_on_class_ordered_data():
    labels = torch.arange(3).repeat_interleave(10)  # as a folder's split comes: class after class
    split = Split(torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1).expand(30, 3, 2, 2), labels)
    images, picked = mixing_sample(split, 8, seed=0)
    assert len(images) == len(picked) == 8 and picked.unique().tolist() == [0, 1, 2]
    assert all(a != b for a, b in zip(picked[0::2].tolist(), picked[1::2].tolist()))  # each mixed pair
    assert torch.equal(labels[images[:, 0, 0, 0].long()], picked)  # each image with its own label
    assert len(set(images[:, 0, 0, 0].tolist())) == 8  # drawn without repeats
    again, _ = mixing_sample(split, 8, seed=0)
    other, _ = mixing_sample(split, 8, seed=1)
    assert torch.equal(again, images) and not torch.equal(other, images)  # seeded
    assert len(mixing_sample(split, 100, seed=0)[0]) == 30 and len(mixing_sample(split, 0)[0]) == 0


HISTORY = [{"epoch": 1, "stage": "all", "train_loss": 2.0, "val_loss": 1.5, "val_acc": 0.3, "lr_head": 1e-3}]


@pytest.mark.parametrize("draw", ["png_bytes", "loss_curves"])
def test_figures_are_drawn_one_at_a_time(monkeypatch, draw):
    """The saver thread draws loss_curves.png while a notebook draws its live figure; matplotlib's
    mathtext parser is shared, and two figures laid out or rendered at once fail on a log axis's
    labels. Here each layout and rendering takes 0.1 s, and three threads ask at once."""
    from matplotlib.figure import Figure

    from cifarlib.core import figures
    inside, most = [0], [0]

    def slow(self, *args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.1)
        inside[0] -= 1
    monkeypatch.setattr(Figure, "savefig", slow)
    monkeypatch.setattr(Figure, "tight_layout", slow)
    start = threading.Barrier(3)

    def work():
        start.wait()
        figures.png_bytes(Figure()) if draw == "png_bytes" else curves.loss_curves(HISTORY)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


def test_the_live_curves_are_drawn_under_that_lock_too(monkeypatch):
    """Not by IPython's printer for figures, which would draw them outside it."""
    drawn = []
    monkeypatch.setattr(curves, "png_bytes", lambda fig: drawn.append(fig) or b"\x89PNG")
    updates = []

    class Handle:  # what IPython's display(..., display_id=True) gives in a notebook
        update = updates.append
    monkeypatch.setattr("IPython.display.display", lambda obj, display_id: Handle())
    live = curves.LiveCurves()
    live(SimpleNamespace(history=HISTORY, trace=Trace(), aug=SimpleNamespace(policy=POLICIES["crop"])))
    assert len(drawn) == 1 and [u.data for u in updates] == [b"\x89PNG"]


def test_the_curves_show_the_loss_and_each_groups_rate_within_epochs():
    """From the trace: a head stage (the body frozen, dotted along the bottom) then everything;
    the rates rise and fall within each stage; 'soft targets' only where the policy mixes."""
    from cifarlib.model import GROUPS
    trace, history = Trace(), []
    for epoch, stage in enumerate(["head", "all"]):
        for k in range(1, 11):
            peak = 1e-2 * (1 - abs(k - 3) / 10)
            rates = {f"lr_{g}": (peak if g == "head" or stage == "all" else 0.0) for g in GROUPS}
            trace.add(epoch + k / 10, stage, 3.0 - epoch - k / 20, 5, rates)
        history.append({"epoch": epoch + 1, "stage": stage, "train_loss": 2.5 - epoch, "val_loss": 2.4 - epoch,
                        "val_acc": 0.3 + epoch / 10, **trace.points[-1]})
    fig = curves.loss_curves(history, trace.points, soft_targets=False)
    loss, rates = fig.axes[0], fig.axes[1]
    xs = loss.get_lines()[0].get_xdata()
    assert len(xs) == 20 and xs[0] == 0.1 and "soft targets" not in loss.get_lines()[0].get_label()
    assert rates.get_yscale() == "log"
    lines = rates.get_lines()
    frozen = [line for line in lines if line.get_linestyle() == ":"]
    assert len(lines) == 6 + 5 and len(frozen) == 5  # every group, and the five frozen in the head stage
    head = next(line for line in lines if line.get_label() == "head").get_ydata()
    assert max(head[:10]) > head[0] and max(head[:10]) > head[9]  # warm-up, peak and anneal within the stage
    mixed = curves.loss_curves(history, trace.points, soft_targets=True)
    assert "soft targets" in mixed.axes[0].get_lines()[0].get_label()


def test_the_confusion_figure_says_grouped_by_superclass_only_where_there_are_superclasses():
    from cifarlib.evaluation import plots
    cm = torch.eye(4, dtype=torch.long) * 5
    names = ["a", "b", "c", "d"]
    assert plots.class_confusion(cm, names).axes[0].get_title() == "classes"
    grouped = plots.class_confusion(cm, names, [1, 0, 1, 0])
    assert grouped.axes[0].get_title() == "classes (grouped by superclass)"
    assert [t.get_text() for t in grouped.axes[0].get_xticklabels()] == ["b", "d", "a", "c"]
