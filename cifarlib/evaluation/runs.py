"""The runs table: every run folder under a checkpoint folder, one row each, from its text files.

    table("checkpoints")                    # a DataFrame, best validation accuracy first
    python -m cifarlib.runs [--checkpoint-dir DIR] [--csv PATH]

A folder is a run if it holds any of `config.json`, `history.csv`, `best.pt` or `last.pt`. Only
`config.json`, `history.csv` and `metrics.json` are read (with the csv and json modules, never a
checkpoint), so a hundred runs take a fraction of a second (`benchmarks/bench_runs.py`). A file
that is missing or unreadable is named in the run's `problem`, and the table is built all the
same; a run with a config and no history yet is simply `unfinished`.

`status` replays the training loop's early-stopping rule (`cifarlib.training.stopping`) over the
history's validation losses: `finished` (every stage ran all its epochs), `stopped early` (the
run is complete, but a stop cut a stage short or ended the run), `interrupted` (a `last.pt` but
no finished epoch yet: stopped, or saved periodically, inside its first epoch, and resumable),
`unfinished` (anything else, a run still training included). `started` is the time `config.json` was written, when the run began.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from ..core import runtime
from ..core.errors import UserError, cli_errors
from ..core.files import write_atomically
from ..training.stopping import replay

COLUMNS = ["run", "started", "status", "preset", "backbone", "weights", "dataset", "image_size", "batch_size",
           "precision", "epochs_done", "epochs_planned", "best_val_acc", "best_val_acc_epoch", "best_val_loss",
           "best_val_loss_epoch", "metrics_split", "test_top1", "test_top5", "ece", "wall_s", "images_per_s",
           "budget_min", "planned_min", "actual_min", "problem"]
INTS = ["image_size", "batch_size", "epochs_done", "epochs_planned", "best_val_acc_epoch", "best_val_loss_epoch"]
FLOATS = ["best_val_acc", "best_val_loss", "test_top1", "test_top5", "ece", "wall_s", "images_per_s", "budget_min",
          "planned_min", "actual_min"]
HIGHER_IS_BETTER = ["best_val_acc", "test_top1", "test_top5"]
LOWER_IS_BETTER = ["best_val_loss", "ece"]
RUN_FILES = ("config.json", "history.csv", "best.pt", "last.pt")
NEEDED = ("epoch", "train_loss", "val_loss", "val_acc")   # history columns every version writes
NUMBERS = (*NEEDED, "seconds", "images_per_s")            # read as numbers where present
SORT = {"val_acc": ("best_val_acc", False), "val_loss": ("best_val_loss", True)}


class Fault(Exception):
    """What is wrong with one file of a run: becomes the run's `problem`, never stops the table."""


def is_run(folder: Path) -> bool:
    """A folder holding any of RUN_FILES; a folder that cannot be looked into is not a run."""
    try:
        return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)
    except OSError:
        return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # a bad encoding or bad JSON is a ValueError
        raise Fault(f"{path.name} is unreadable ({type(e).__name__}: {e})") from None


def read_history(folder: Path) -> list[dict[str, Any]] | None:
    """history.csv's rows with its numbers as floats; None if there is none; `Fault` if damaged.
    Columns other than those in NUMBERS (stage, learning rates, ...) are kept as text."""
    try:
        with open(folder / "history.csv", newline="") as f:
            reader = csv.DictReader(f)
            rows, names = list(reader), reader.fieldnames or []
    except FileNotFoundError:
        return None
    except (OSError, ValueError, csv.Error) as e:
        raise Fault(f"history.csv is unreadable ({type(e).__name__}: {e})") from None
    if not names:
        raise Fault("history.csv is empty")
    missing = [c for c in NEEDED if c not in names]
    if missing:
        raise Fault(f"history.csv has no {', '.join(missing)} column")
    for line, row in enumerate(rows, start=2):
        for c in NUMBERS:
            value = row.get(c, "")
            if value is None or (value == "" and c in NEEDED):
                raise Fault(f"history.csv line {line} has no {c}")
            try:
                row[c] = float(value) if value != "" else math.nan
            except ValueError:
                raise Fault(f"history.csv line {line}: {c} is {value!r}, not a number") from None
    return rows


def _plan(cfg: dict[str, Any]) -> tuple[list[int], int, bool]:
    """Each stage's epochs, the patience and stop_ends_run, as config.json holds them."""
    try:
        stages = [int(s["epochs"]) for s in cfg["stages"]]
        patience, stop_ends_run = int(cfg["patience"]), bool(cfg["stop_ends_run"])
    except (KeyError, TypeError, ValueError) as e:
        raise Fault(f"config.json lacks usable stages, patience or stop_ends_run ({type(e).__name__}: {e})") from None
    if not stages:
        raise Fault("config.json has no stages")
    return stages, patience, stop_ends_run


def run_status(val_loss: list[float], stages: list[int], patience: int, stop_ends_run: bool) -> tuple[str, int]:
    """The status of a history of validation losses, and how many of its epochs the plan covers:
    the training loop's own early-stopping rule, replayed (`cifarlib.training.stopping`)."""
    return replay(val_loss, stages, patience, stop_ends_run)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _weights(value: Any) -> str | None:
    return value if value in (None, "imagenet", "none") else Path(str(value)).name


def _from_config(row: dict[str, Any], cfg: dict[str, Any]) -> None:
    row.update(preset=_text(cfg.get("preset")), backbone=_text(cfg.get("backbone")), weights=_weights(cfg.get("weights")),
               dataset=_text(cfg.get("dataset")), image_size=_int(cfg.get("image_size")),
               batch_size=_int(cfg.get("batch_size")),
               precision=_text(cfg["plan"].get("precision")) if isinstance(cfg.get("plan"), dict) else None)
    budget = cfg["plan"].get("budget") if isinstance(cfg.get("plan"), dict) else None
    if isinstance(budget, dict):  # a run planned to a time: what it was given, planned and took
        row.update(budget_min=_number(budget.get("budget_minutes")), planned_min=_number(budget.get("predicted_minutes")),
                   actual_min=_number(budget.get("actual_minutes")))


def _from_history(row: dict[str, Any], history: list[dict[str, Any]]) -> None:
    row["epochs_done"] = len(history)
    for metric, pick in (("val_acc", max), ("val_loss", min)):
        valid = [r for r in history if not math.isnan(r[metric])]
        if valid:
            best = pick(valid, key=lambda r: r[metric])  # the first epoch that reached it
            row[f"best_{metric}"], row[f"best_{metric}_epoch"] = best[metric], int(best["epoch"])
    seconds = [r["seconds"] for r in history if not math.isnan(r["seconds"])]
    speeds = [r["images_per_s"] for r in history if not math.isnan(r["images_per_s"])]
    row["wall_s"] = sum(seconds) if seconds else None
    row["images_per_s"] = sum(speeds) / len(speeds) if speeds else None


def _from_metrics(row: dict[str, Any], metrics: Any) -> None:
    if not isinstance(metrics, dict):
        raise Fault("metrics.json is not a JSON object")
    row["metrics_split"] = _text(metrics.get("split"))
    if metrics.get("split") == "test":
        row.update(test_top1=_number(metrics.get("top1")), test_top5=_number(metrics.get("top5")),
                   ece=_number(metrics.get("ece")))


def _config(folder: Path, row: dict[str, Any]) -> dict[str, Any]:
    cfg = _read_json(folder / "config.json")
    if cfg is None:
        raise Fault("config.json is missing")
    if not isinstance(cfg, dict):
        raise Fault("config.json is not a JSON object")
    try:
        row["started"] = datetime.fromtimestamp((folder / "config.json").stat().st_mtime).replace(microsecond=0)
    except OSError:  # replaced or removed since it was read: leave it empty
        pass
    _from_config(row, cfg)
    return cfg


def _history(folder: Path, has_config: bool) -> list[dict[str, Any]]:
    history = read_history(folder)
    if history is None and not has_config:
        raise Fault("history.csv is missing")
    return history or []  # no history beside a config: a run that has not finished an epoch yet


def _status(row: dict[str, Any], history: list[dict[str, Any]], plan: tuple[list[int], int, bool]) -> None:
    status, covered = run_status([r["val_loss"] for r in history], *plan)
    if covered < len(history):
        raise Fault(f"history.csv has {len(history)} epochs, more than config.json plans ({covered})")
    row["status"] = status


def read_run(folder: Path) -> dict[str, Any]:
    """One row of the table (a dict over COLUMNS, None where empty). Each file is read on its
    own, so one damaged file leaves the rest of the row filled in."""
    row: dict[str, Any] = {**dict.fromkeys(COLUMNS), "run": folder.name, "status": "unfinished"}
    problems: list[str] = []

    def attempt(step, *args):
        try:
            return step(*args)
        except Fault as e:
            problems.append(str(e))

    cfg = attempt(_config, folder, row)
    history = attempt(_history, folder, cfg is not None)
    if history is not None:
        _from_history(row, history)
    plan = attempt(_plan, cfg) if cfg is not None else None
    if plan is not None:
        row["epochs_planned"] = sum(plan[0])
        if history is not None:
            attempt(_status, row, history, plan)
    if cfg is not None and history == [] and (folder / "last.pt").exists():
        row["status"] = "interrupted"  # stopped (or saved) in its first epoch: resume=True goes on from last.pt
    metrics = attempt(_read_json, folder / "metrics.json")
    if metrics is not None:
        attempt(_from_metrics, row, metrics)
    row["problem"] = "; ".join(problems)
    return row


def sort(df: pd.DataFrame, metric: str = "val_acc") -> pd.DataFrame:
    """Best first by `metric` ("val_acc": highest accuracy, "val_loss": lowest loss), runs without
    it last, ties by name."""
    if metric not in SORT:
        raise UserError(f"metric must be {' or '.join(map(repr, SORT))}, not {metric!r}.")
    column, ascending = SORT[metric]
    return df.sort_values([column, "run"], ascending=[ascending, True], na_position="last").reset_index(drop=True)


def table(checkpoint_dir: str = "checkpoints") -> pd.DataFrame:
    """Every run under `checkpoint_dir` (subfolders only), highest best_val_acc first."""
    root = runtime.resolve_path(checkpoint_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: train a run first (notebook 03 or python -m cifarlib.train), "
                        "or give the checkpoint folder that holds your runs.")
    try:
        folders = sorted(p for p in root.iterdir() if is_run(p))
    except OSError as e:
        raise UserError(f"cannot list the runs in {root} ({type(e).__name__}: {e}).") from None
    df = pd.DataFrame([read_run(p) for p in folders], columns=COLUMNS)
    df = df.astype({**{c: "Int64" for c in INTS}, **{c: "float64" for c in FLOATS}})
    df["started"] = pd.to_datetime(df["started"])
    return sort(df)


def choose(df: pd.DataFrame, runs: str = "") -> pd.DataFrame:
    """The rows `runs` names: run names separated by commas, or one glob such as "fast-*"; "" is all."""
    runs = runs.strip()
    if not runs:
        return df
    known = list(df["run"])
    listing = ", ".join(sorted(known)[:30]) + (" ..." if len(known) > 30 else "") if known else "none"
    if any(c in runs for c in "*?["):
        picked = df[[fnmatch.fnmatchcase(name, runs) for name in known]]
        if picked.empty:
            raise UserError(f"no run matches {runs!r}; the runs are: {listing}.")
        return picked
    names = [n.strip() for n in runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"no run named {', '.join(unknown)}; the runs are: {listing}.")
    return df[df["run"].isin(names)]


def histories(df: pd.DataFrame, checkpoint_dir: str = "checkpoints") -> dict[str, pd.DataFrame]:
    """The history of each run in `df` that has at least one readable epoch, in `df`'s order."""
    root, out = runtime.resolve_path(checkpoint_dir), {}
    for name in df["run"]:
        try:
            rows = read_history(root / name)
        except Fault:
            continue  # the table's `problem` says why
        if rows:
            out[name] = pd.DataFrame(rows)
    return out


FORMATS = {**{c: "{:.4f}" for c in ("best_val_acc", "best_val_loss", "test_top1", "test_top5", "ece")},
           "wall_s": "{:.1f}", "images_per_s": "{:.1f}", "started": "{:%Y-%m-%d %H:%M}",
           **{c: "{:.1f}" for c in ("budget_min", "planned_min", "actual_min")}}


def highlight(df: pd.DataFrame, metric: str = "val_acc"):
    """The table for a notebook, sorted by `metric`; in the metric columns, the highest accuracies
    and the lowest loss and ECE stand out."""
    df = sort(df, metric)
    present = lambda cols: [c for c in cols if df[c].notna().any()]  # noqa: E731
    props = "font-weight: bold; background-color: #c7e9c0"
    return (df.style.hide(axis="index").format(FORMATS, na_rep="")
            .highlight_max(subset=present(HIGHER_IS_BETTER), props=props)
            .highlight_min(subset=present(LOWER_IS_BETTER), props=props))


def as_text(df: pd.DataFrame) -> str:
    """The table as aligned text: words flush left, numbers flush right, empty cells blank."""
    shown = df.astype(object).where(df.notna(), "")
    for column, fmt in FORMATS.items():
        shown[column] = [fmt.format(v) if v != "" else "" for v in shown[column]]
    rows = [list(shown.columns)] + [[str(v) for v in row] for row in shown.itertuples(index=False)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(shown.columns))]
    numeric = [c in INTS + FLOATS for c in shown.columns]
    return "\n".join("  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)).rstrip()
                     for row in rows)


def write_csv(df: pd.DataFrame, path: str) -> Path:
    """The table as CSV (header: COLUMNS), written atomically; returns where it went."""
    out = runtime.resolve_path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, df.to_csv(index=False, date_format="%Y-%m-%d %H:%M:%S").encode())
    except OSError as e:  # a full disk is already a UserError from write_atomically
        raise UserError(f"cannot write the table to {out} ({type(e).__name__}: {e}).") from None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifarlib.runs", description=(
        "Print every run under a checkpoint folder as one table, highest best_val_acc first. "
        "Relative paths are from the project root."))
    parser.add_argument("--checkpoint-dir", default="checkpoints", metavar="DIR", help="folder of run folders (default: checkpoints)")
    parser.add_argument("--csv", metavar="PATH", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    with cli_errors(parser.prog):
        df = table(args.checkpoint_dir)
        print(as_text(df) if len(df) else f"no runs under {runtime.resolve_path(args.checkpoint_dir)}")
        if args.csv:
            print(f"table written to {write_csv(df, args.csv)}", file=sys.stderr)


if __name__ == "__main__":
    main()
