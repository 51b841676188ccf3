"""The upload app's time per picture, with and without "where it looked" (Grad-CAM), on the CPU.

    python benchmarks/bench_upload.py CHECKPOINT [--pictures N] [--repeats R]

Times `UploadApp.show_file` (size check, the one decode, the prediction, the map, the PNGs of the
three views) on N photo-like 640x480 JPEGs, after one untimed warm-up, alternating the two
settings picture by picture so that a change in the machine's load hits both alike. Prints one
JSON line: the median and mean milliseconds per picture for each setting and their ratio. A
benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo(seed: int) -> bytes:
    """A smooth 640x480 picture with a few blobs, as JPEG (a photo's size and kind of content)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    a = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], -1).astype(np.float32)
    for _ in range(4):
        cy, cx, r = rng.integers(0, 480), rng.integers(0, 640), rng.integers(30, 120)
        a[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--pictures", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from cifarlib.serving.app import UploadApp
    from cifarlib.serving.predict import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    apps = {"predict only": UploadApp(predictor, explain=False), "predict and where it looked": UploadApp(predictor)}
    files = [photo(i) for i in range(args.pictures)]
    for app in apps.values():
        app.show_file("warm-up.jpg", files[0])
    times: dict[str, list[float]] = {k: [] for k in apps}
    for _ in range(args.repeats):
        for data in files:
            for name, app in apps.items():
                t0 = time.perf_counter()
                app.show_file("p.jpg", data)
                times[name].append(1000 * (time.perf_counter() - t0))
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "checkpoint": args.checkpoint, "backbone": torch.load(args.checkpoint, weights_only=True)["backbone"],
        "image_size": predictor.size, "store_size": predictor.store_size, "pictures": len(files) * args.repeats,
        "median_ms": {k: round(v, 1) for k, v in medians.items()},
        "mean_ms": {k: round(statistics.mean(v), 1) for k, v in times.items()},
        "ratio_of_medians": round(medians["predict and where it looked"] / medians["predict only"], 2),
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


if __name__ == "__main__":
    main()
