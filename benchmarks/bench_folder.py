"""Loading an image folder: extraction, the first load, and the cached load, timed separately.

    python benchmarks/bench_folder.py ../shared/real/cifar10-train-jpeg.tar.gz
    python benchmarks/bench_folder.py path/to/photos --store-size 64

PATH is a folder of pictures or an archive of one (see `cifarlib.data.folders`). Everything is
written to a fresh temporary `cache_dir` (or --cache-dir, which must be empty), so every run
starts from nothing:

- extraction: the archive into `cache_dir/extracted/` (absent for a folder);
- first load: `load_cifar("folder", ...)` from the extracted folder with an empty image cache:
  listing, picking the splits, decoding every picked file, writing the cache;
- cached load: the same call again, `--repeats` times (the median is reported): listing,
  picking, reading the cache.

The extracted files were just written, so the first load reads them from the page cache, as a
user's does right after extraction. Prints JSON, with the machine's load average before each
phase: other processes on a shared machine slow every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cifarlib.core import runtime
from cifarlib.data import folders, imagecache
from cifarlib.data.datasets import load_cifar


def timed(fn):
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = fn()
    return out, {"seconds": round(time.perf_counter() - start, 3), "load_average_1min_before": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a folder of pictures or a .tar, .tar.gz or .zip of one")
    p.add_argument("--store-size", type=int, default=32)
    p.add_argument("--cache-dir", default="", help="an empty folder for the extraction and the cache (default: a temporary one)")
    p.add_argument("--repeats", type=int, default=3, help="cached loads to time")
    args = p.parse_args()
    source = Path(os.path.normpath(runtime.resolve_path(args.path)))
    cache = Path(args.cache_dir).resolve() if args.cache_dir else Path(tempfile.mkdtemp(prefix="bench-folder-"))
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"--cache-dir {cache} is not empty; the benchmark starts from nothing.")
    try:
        result = {"path": str(source), "store_size": args.store_size, "threads": imagecache.cores(),
                  "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
        folder = source
        if source.is_file():
            folder, result["extraction"] = timed(lambda: folders.extract_archive(source, cache))
        load = lambda: load_cifar("folder", folder, cache_dir=cache, store_size=args.store_size, device="cpu")  # noqa: E731
        data, result["first_load"] = timed(load)
        result["images"] = {name: len(getattr(data, name)) for name in ("train", "val", "test")}
        result["skipped"] = len(data.skipped)
        cached = [timed(load)[1] for _ in range(args.repeats)]
        result["cached_load"] = {"seconds": statistics.median(c["seconds"] for c in cached), "runs": cached}
        result["cache_bytes"] = sum(f.stat().st_size for f in (cache / "image-cache").glob("*.u8"))
        print(json.dumps(result, indent=2))
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
