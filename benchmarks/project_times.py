"""Projected wall-clock time of the presets from a measured bench_train.py result (a projection).

For each preset: sum over its stages of epochs x 45,000 training images / images/s, taking the
head-only rate for stages that train the head alone and the full fine-tuning rate for the rest
(a stage training part of the backbone lies between the two; counting it as full errs long).
Validation and checkpoints are left out. The loops were measured at the image size and batch
size in the JSON, which may differ from a preset's own.

    python benchmarks/project_times.py benchmarks/results/train_cpu_224.json
"""

from __future__ import annotations

import json
import sys

from cifarlib.config import PRESETS, make_config

TRAIN_IMAGES = 45_000


def hours(rate_full: float, rate_head: float, preset: str) -> float:
    cfg = make_config(preset)
    seconds = sum(s.epochs * TRAIN_IMAGES / (rate_head if s.groups == ("head",) else rate_full) for s in cfg.stages)
    return seconds / 3600


def main(path: str) -> None:
    r = json.load(open(path))
    ours, orig = r["ours"], r["original"]["workers_4"]
    print(f"{r['device_name']} ({r['device']}), {r['backbone']} at {r['image_size']} px; projections, not measurements:")
    for preset in PRESETS:
        mine = hours(ours["full"]["images_per_s"], ours["head_only"]["images_per_s"], preset)
        theirs = hours(orig["full"]["images_per_s"], orig["head_only"]["images_per_s"], preset)
        print(f"  {preset:9s} {make_config(preset).epochs:4d} epochs: this project's loop {mine:8.2f} h, "
              f"the original loop {theirs:8.2f} h")


if __name__ == "__main__":
    main(sys.argv[1])
