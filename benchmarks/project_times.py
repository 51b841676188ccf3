"""Projected wall-clock time of the presets from measured bench_train.py results (a projection).

For each preset: sum over its stages of epochs x 45,000 training images / images/s, taking the
head-only rate for stages that train the head alone and the full fine-tuning rate for the rest
(a stage training part of the backbone lies between the two; counting it as full errs long),
each at the stage's own image size. Give one result per image size the presets use; a preset
with a stage at a size no result covers is skipped, with a note. Validation and checkpoints
are left out. The loops were measured at the batch size in each JSON, which may differ from a
preset's own.

    python benchmarks/project_times.py benchmarks/results/train_cpu_224.json
    python benchmarks/project_times.py benchmarks/results/train_cpu_64_2026-11-29.json benchmarks/results/train_cpu_88_2026-11-29.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # cifarlib, without an install
from cifarlib.training.config import PRESETS, make_config, stage_image_size  # noqa: E402

TRAIN_IMAGES = 45_000


def hours(rates: dict[int, tuple[float, float]], preset: str) -> float | None:
    """`rates`: image size -> (full, head-only) images/s. None if a stage's size is missing."""
    cfg = make_config(preset)
    seconds = 0.0
    for s in cfg.stages:
        size = stage_image_size(cfg, s)
        if size not in rates:
            return None
        full, head = rates[size]
        seconds += s.epochs * TRAIN_IMAGES / (head if s.groups == ("head",) else full)
    return seconds / 3600


def main(paths: list[str]) -> None:
    results = [json.load(open(p)) for p in paths]
    ours = {r["image_size"]: (r["ours"]["full"]["images_per_s"], r["ours"]["head_only"]["images_per_s"]) for r in results}
    orig = {r["image_size"]: (r["original"]["workers_4"]["full"]["images_per_s"],
                              r["original"]["workers_4"]["head_only"]["images_per_s"])
            for r in results if "workers_4" in r.get("original", {})}  # absent after --only-ours
    first = results[0]
    sizes = ", ".join(str(s) for s in sorted(ours))
    print(f"{first['device_name']} ({first['device']}), {first['backbone']} at {sizes} px; projections, not measurements:")
    for preset in PRESETS:
        mine, theirs = hours(ours, preset), hours(orig, preset)
        cfg = make_config(preset)
        if mine is None:
            need = sorted({stage_image_size(cfg, s) for s in cfg.stages})
            print(f"  {preset:9s} skipped: it trains at {', '.join(map(str, need))} px, and no result is at each")
            continue
        theirs = "not measured" if theirs is None else f"{theirs:8.2f} h"
        print(f"  {preset:9s} {cfg.epochs:4d} epochs: this project's loop {mine:8.2f} h, the original loop {theirs}")


if __name__ == "__main__":
    main(sys.argv[1:])
