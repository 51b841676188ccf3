"""How long the runs table takes: `cifarlib.evaluation.runs.table` over many run folders, and the CLI.

Writes --runs fake run folders into a temporary folder, as the training loop and notebook 04
write them: `config.json` from a real preset (original at 100 epochs, fast at 16, cpu at 3, in turn),
`history.csv` with every planned epoch (two runs in three in the newer format, with a learning
rate per layer slot and images_per_s; the rest with one `lr` column), and a full-size
`metrics.json` (100 per-class accuracies, reliability bins, superclass confusion) for every
other run; a `best.pt` and `last.pt` of a few bytes stand in for the checkpoints, which the
table never opens. Then it times `table()` in this process (--repeats times; the folder is
in the OS's file cache, having just been written) and `python -m cifarlib.runs` as a fresh
process, up to 3 times (interpreter start and the pandas import included). Prints JSON.

    python benchmarks/bench_runs.py                 # 100 runs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cifarlib.model import GROUPS
from cifarlib.training.config import make_config, to_dict
from cifarlib.evaluation import runs

PRESETS = [("original", 100), ("fast", 16), ("cpu", 3)]


def write_fake_run(folder: Path, i: int) -> None:
    preset, epochs = PRESETS[i % len(PRESETS)]
    cfg = make_config(preset, dataset="cifar100", run_name=folder.name, epochs=epochs)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    new = i % 3 != 2
    rows, epoch = [], 0
    for stage in cfg.stages:
        for e in range(stage.epochs):
            epoch += 1
            row = {"epoch": epoch, "stage": stage.name, "stage_epoch": e + 1, "train_loss": 3.0 / epoch,
                   "val_loss": 2.0 / epoch + 0.01 * (i % 7), "val_acc": 1 - 1 / (epoch + 1)}
            row.update({f"lr_{g}": 1e-3 for g in GROUPS} if new else {"lr": 1e-3})
            row.update({"seconds": 120.5, **({"images_per_s": 3000.0 + i} if new else {})})
            rows.append(row)
    with open(folder / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if i % 2 == 0:
        metrics = {"top1": 0.8, "top5": 0.95, "loss": 0.7, "ece": 0.04, "superclass_top1": 0.88,
                   "per_class": {f"class_{c}": 0.8 for c in range(100)},
                   "most_confused": [{"true": "a", "predicted": "b", "count": 9}] * 10,
                   "reliability": [{"low": b / 15, "high": (b + 1) / 15, "count": 600, "accuracy": 0.8,
                                    "confidence": 0.8} for b in range(15)],
                   "superclass_confusion": [[25] * 20] * 20, "split": "test", "samples": 10000}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name in ("best.pt", "last.pt"):
        (folder / name).write_bytes(b"stand-in")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.runs):
            write_fake_run(root / f"run-{i:03d}", i)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            df = runs.table(str(root))
            times.append(time.perf_counter() - start)
        assert len(df) == args.runs and not df["problem"].any(), df[df["problem"] != ""]
        cli = []
        for _ in range(min(3, args.repeats)):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cifarlib.runs", "--checkpoint-dir", str(root)], check=True,
                           stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
            cli.append(time.perf_counter() - start)
    print(json.dumps({
        "runs": args.runs, "epochs": int(df["epochs_done"].sum()),
        "table_s": {"first": round(times[0], 4), "median": round(statistics.median(times), 4),
                    "all": [round(t, 4) for t in times]},
        "cli_s": {"median": round(statistics.median(cli), 3), "all": [round(t, 3) for t in cli]},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1min": os.getloadavg()[0]},
    }, indent=2))


if __name__ == "__main__":
    main()
