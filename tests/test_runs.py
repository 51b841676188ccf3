"""The runs table (cifarlib.evaluation.runs), its CLI and notebook 06, over run folders the tests write."""

import csv
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from cifarlib.model import GROUPS
from cifarlib.training.config import make_config, to_dict
from cifarlib.evaluation import runs

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_compare_runs.ipynb"
STARTED = datetime(2026, 1, 2, 3, 4, 5)


def write_run(root: Path, name: str, losses: list[tuple[str, float, float]], *, new_format: bool = True,
              metrics: dict | None = None, **cfg) -> Path:
    """A run folder as the training loop writes it: config.json (started at STARTED) and
    history.csv with one row per (stage, val_loss, val_acc); `new_format`: a learning rate per
    layer slot and images_per_s (older histories have one `lr` column and no speed)."""
    folder = root / name
    folder.mkdir(parents=True)
    cfg = {"epochs": 3, **cfg}  # the cpu preset at 3 epochs: head 1, all 2
    (folder / "config.json").write_text(json.dumps(to_dict(make_config("cpu", dataset="synthetic", backbone="resnet18",
                                                                       image_size=32, **cfg))))
    os.utime(folder / "config.json", (STARTED.timestamp(),) * 2)
    rows, previous = [], None
    for epoch, (stage, val_loss, val_acc) in enumerate(losses, start=1):
        stage_epoch = rows[-1]["stage_epoch"] + 1 if stage == previous else 1
        row = {"epoch": epoch, "stage": stage, "stage_epoch": stage_epoch, "train_loss": val_loss + 0.5,
               "val_loss": val_loss, "val_acc": val_acc}
        row.update({f"lr_{g}": 0.001 for g in GROUPS} if new_format else {"lr": 0.001})
        row.update({"seconds": 10.0 * epoch, **({"images_per_s": 100.0 * epoch} if new_format else {})})
        rows.append(row)
        previous = stage
    if rows:
        with open(folder / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps({"loss": 1.0, "per_class": {"a": 0.5}, **metrics}))
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """Runs of every kind, in one checkpoint folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    # cpu preset: stages head 1 + all 2 at epochs=3; patience 2, a stop ends only the stage
    write_run(root, "finished", [("head", 2.0, 0.30), ("all", 1.5, 0.50), ("all", 1.2, 0.55)], new_format=False,
              weights="/somewhere/my_resnet18.pth", metrics={"split": "test", "top1": 0.54, "top5": 0.81, "ece": 0.05})
    # epochs=5: head 2 + all 3; patience 1: the second epoch of "all" is no better, which ends that stage
    write_run(root, "stopped", [("head", 2.1, 0.20), ("head", 2.0, 0.25), ("all", 1.4, 0.60), ("all", 1.6, 0.58)],
              epochs=5, patience=1, weights="none", metrics={"split": "val", "top1": 0.6, "top5": 0.9, "ece": 0.02})
    unfinished = write_run(root, "unfinished", [("head", 2.2, 0.10)], weights="imagenet",
                           metrics={"split": "test", "top1": 0.6, "top5": 0.7, "ece": 0.1})
    (unfinished / "last.pt").write_bytes(b"not read")
    write_run(root, "just-started", [])
    (write_run(root, "interrupted", []) / "last.pt").write_bytes(b"not read")  # stopped inside its first epoch
    damaged = write_run(root, "damaged", [("head", 2.0, 0.3)])
    (damaged / "config.json").write_text('{"preset": "cpu", ')
    (damaged / "history.csv").write_text("epoch,stage,train_loss,val_loss,val_acc\n1,head,2.5,oops,0.3\n")
    (root / "weights-only").mkdir()
    (root / "weights-only" / "best.pt").write_bytes(b"never read")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / "README.md").write_text("a file, not a folder")
    return root


def test_table_columns_and_values(zoo):
    df = runs.table(str(zoo))
    assert list(df.columns) == runs.COLUMNS
    assert list(df["run"]) == ["stopped", "finished", "unfinished", "damaged", "interrupted", "just-started", "weights-only"]
    r = {name: df.set_index("run").loc[name] for name in df["run"]}
    assert [r[n]["status"] for n in ("finished", "stopped", "unfinished", "just-started", "interrupted")] == [
        "finished", "stopped early", "unfinished", "unfinished", "interrupted"]
    assert (r["interrupted"]["epochs_done"], r["interrupted"]["problem"]) == (0, "")
    assert r["finished"]["started"] == STARTED
    assert (r["finished"]["preset"], r["finished"]["backbone"], r["finished"]["dataset"]) == ("cpu", "resnet18", "synthetic")
    assert [r[n]["weights"] for n in ("finished", "stopped", "unfinished")] == ["my_resnet18.pth", "none", "imagenet"]
    assert (r["finished"]["image_size"], r["finished"]["batch_size"]) == (32, 64)
    assert [(r[n]["epochs_done"], r[n]["epochs_planned"]) for n in ("finished", "stopped", "unfinished", "just-started")] == [
        (3, 3), (4, 5), (1, 3), (0, 3)]
    s = r["stopped"]
    assert (s["best_val_acc"], s["best_val_acc_epoch"], s["best_val_loss"], s["best_val_loss_epoch"]) == (0.60, 3, 1.4, 3)
    assert (r["finished"]["best_val_acc"], r["finished"]["best_val_loss_epoch"]) == (0.55, 3)
    # metrics.json: test metrics only from the test split; the split shown either way
    assert (r["finished"]["metrics_split"], r["finished"]["test_top1"], r["finished"]["test_top5"], r["finished"]["ece"]) == (
        "test", 0.54, 0.81, 0.05)
    assert s["metrics_split"] == "val" and s[["test_top1", "test_top5", "ece"]].isna().all()
    assert r["unfinished"][["metrics_split", "test_top1"]].tolist() == ["test", 0.6]
    assert r["just-started"][["metrics_split", "test_top1"]].isna().all()
    # wall time and speed; the older history has no images_per_s
    assert (r["finished"]["wall_s"], s["wall_s"], s["images_per_s"]) == (60.0, 100.0, 250.0)
    assert r["finished"]["images_per_s"] != r["finished"]["images_per_s"]  # NaN: empty
    # problems are named, and only where there are problems
    assert [n for n in df["run"] if r[n]["problem"]] == ["damaged", "weights-only"]
    assert "config.json is unreadable" in r["damaged"]["problem"]
    assert "history.csv line 2: val_loss is 'oops'" in r["damaged"]["problem"]
    assert r["weights-only"]["problem"] == "config.json is missing; history.csv is missing"
    assert r["damaged"]["status"] == r["weights-only"]["status"] == "unfinished"
    assert r["damaged"][["preset", "epochs_done", "started"]].isna().all()


@pytest.mark.parametrize("losses, stages, patience, ends, expected", [
    ([3, 2, 1], [1, 2], 2, False, ("finished", 3)),
    ([3, 2, 2.5, 2.6, 1], [1, 4], 2, False, ("stopped early", 4)),    # stage 2 stopped after 3 of 4 epochs
    ([3, 2, 2.5, 2.6, 1, 0.9], [1, 4, 2], 2, False, ("stopped early", 6)),
    ([3, 2, 2.5, 2.6], [1, 3], 2, False, ("finished", 4)),            # the stop fell on the stage's last epoch
    ([3, 3.1], [2, 2], 1, True, ("stopped early", 2)),                # the stop ended the run after stage 1
    ([3, 2, 1, 1.5], [2, 2], 1, True, ("finished", 4)),               # the stop fell on the run's last epoch
    ([3, 2], [1, 2], 2, False, ("unfinished", 2)),
    ([], [1, 2], 2, False, ("unfinished", 0)),
    ([3, 2, 1, 0.5], [1, 2], 2, False, ("finished", 3)),              # one epoch more than planned
])
def test_status_replays_early_stopping(losses, stages, patience, ends, expected):
    assert runs.run_status(losses, stages, patience, ends) == expected


def test_a_longer_history_than_planned_is_a_problem(tmp_path):
    write_run(tmp_path, "odd", [("head", 2.0, 0.3), ("all", 1.5, 0.5), ("all", 1.2, 0.55), ("all", 1.1, 0.56)])
    row = runs.table(str(tmp_path)).iloc[0]
    assert row["status"] == "unfinished" and "4 epochs, more than config.json plans (3)" in row["problem"]


def test_choose_by_names_or_glob(zoo):
    df = runs.table(str(zoo))
    assert list(runs.choose(df, "")["run"]) == list(df["run"])
    assert list(runs.choose(df, " unfinished, finished ")["run"]) == ["finished", "unfinished"]
    assert sorted(runs.choose(df, "*finished")["run"]) == ["finished", "unfinished"]
    with pytest.raises(runs.UserError, match="no run named nope; the runs are: damaged, finished"):
        runs.choose(df, "finished,nope")
    with pytest.raises(runs.UserError, match=re.escape("no run matches 'x*'")):
        runs.choose(df, "x*")
    with pytest.raises(runs.UserError, match="metric must be 'val_acc' or 'val_loss'"):
        runs.sort(df, "top1")
    assert list(runs.sort(df, "val_loss")["run"])[:3] == ["finished", "stopped", "unfinished"]


def test_highlight_marks_only_the_best_of_each_metric_column(zoo):
    df = runs.table(str(zoo))
    for metric in ("val_acc", "val_loss"):
        shown = runs.sort(df, metric)
        html = runs.highlight(df, metric).to_html()
        marked = {(shown["run"][int(r)], runs.COLUMNS[int(c)]) for r, c in re.findall(r"#T_\w+_row(\d+)_col(\d+)", html)}
        assert marked == {("stopped", "best_val_acc"), ("finished", "best_val_loss"), ("unfinished", "test_top1"),
                          ("finished", "test_top5"), ("finished", "ece")}


def test_cli_prints_the_table_and_writes_csv(zoo, tmp_path, capsys):
    out = tmp_path / "sub" / "runs.csv"
    runs.main(["--checkpoint-dir", str(zoo), "--csv", str(out)])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == runs.COLUMNS
    assert [line.split()[0] for line in lines[1:]] == ["stopped", "finished", "unfinished", "damaged", "interrupted",
                                                       "just-started", "weights-only"]
    assert {"finished", "2026-01-02", "03:04", "0.5500", "my_resnet18.pth", "60.0"} <= set(lines[2].split())
    assert "nan" not in captured.out.lower() and f"table written to {out}" in captured.err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == runs.COLUMNS and len(rows) == 7
    finished = next(r for r in rows if r["run"] == "finished")
    assert finished["started"] == "2026-01-02 03:04:05" and finished["status"] == "finished"
    assert finished["epochs_done"] == "3" and finished["test_top1"] == "0.54" and finished["images_per_s"] == ""


def test_cli_errors_and_empty_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        runs.main(["--checkpoint-dir", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
    runs.main(["--checkpoint-dir", str(tmp_path)])
    assert capsys.readouterr().out.startswith("no runs under")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as e:
        runs.main(["--checkpoint-dir", str(tmp_path), "--csv", str(tmp_path / "a-file" / "runs.csv")])
    assert e.value.code == 2 and "cannot write the table to" in capsys.readouterr().err


def test_cli_default_folder_follows_the_path_rule(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs.runtime, "project_root", lambda: tmp_path)  # checkpoints/ is <root>/checkpoints
    (tmp_path / "checkpoints").symlink_to(zoo)
    runs.main([])
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "stopped"


def test_reads_a_run_the_suite_trained(trained_checkpoint, tmp_path):
    """The table's reading of what the training loop really writes (copied without metrics.json,
    which other tests may add)."""
    copy = tmp_path / "tiny"
    copy.mkdir()
    for name in ("config.json", "history.csv"):
        shutil.copy2(trained_checkpoint.parent / name, copy / name)
    row = runs.table(str(tmp_path)).iloc[0]
    with open(copy / "history.csv", newline="") as f:  # read apart from the module under test
        history = [{k: float(v) for k, v in r.items() if k in ("val_loss", "seconds")} for r in csv.DictReader(f)]
    assert (row["run"], row["status"], row["problem"], row["preset"], row["backbone"]) == ("tiny", "finished", "", "cpu", "resnet18")
    assert (row["epochs_done"], row["epochs_planned"]) == (3, 3)
    assert row["best_val_loss"] == min(r["val_loss"] for r in history)
    assert row["wall_s"] == pytest.approx(sum(r["seconds"] for r in history))


def test_notebook_compares_tiny_runs(zoo, tmp_path, notebook_kernel):
    import nbformat
    out = tmp_path / "compare"
    nb_out = tmp_path / "06.ipynb"
    notebook_kernel.run(NOTEBOOK, nb_out, checkpoint_dir=str(zoo), runs="*ed", metric="val_loss", out_dir=str(out))
    outputs = [o for c in nbformat.read(nb_out, as_version=4).cells for o in c.get("outputs", [])]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "font-weight: bold" in html and "damaged" in html and "weights-only" not in html
    assert "no curves (no finished epoch, or an unreadable history) for: damaged, interrupted, just-started" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "runs.csv", "test_metrics.png"]
