"""Where the training pictures live (issue 30): training speed with them on the device, in the
host's memory and on disk, and the loader alone from a cache bigger than memory.

    python benchmarks/bench_stream.py train DATA [--rounds 5] [--out FILE]
    python benchmarks/bench_stream.py loader [--ram-times 1.5] [--seconds 60] [--dir DIR] [--out FILE]

`train`: the `cpu` preset's model (EfficientNet-Lite0, random weights: speed only) at 88 px on
the CPU, trained from an image folder DATA (3,000 of its pictures at store_size=32) placed with
`data_on=device`, `host` and `disk` in turn, one epoch each, `--rounds` times interleaved (this
machine's pace drifts); prints images/s per round and the medians. The disk's cache is warm (in
the page cache) after the first round, as it is for any cache smaller than memory.

`loader`: synthetic pictures at 224 px written straight into an image cache file `--ram-times`
this machine's RAM (the pictures are a repeated random block: what they show does not matter to
a loader), then read back through `Batches` (batches of 256, gathered 4 ahead by the background
thread, as training does) in a full shuffle and in the block order, each for `--seconds`, each
starting with the file evicted from the page cache (`posix_fadvise(DONTNEED)`, no root needed);
and the disk's own sequential read speed, cold, with 16 MB reads. The file is deleted at the end.
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifarlib.core import runtime  # noqa: E402
from cifarlib.data import imagecache  # noqa: E402
from cifarlib.data.datasets import Batches  # noqa: E402
from cifarlib.data.splits import Split  # noqa: E402


def train_speed(data: str, rounds: int, cache_dir: str) -> dict:
    from cifarlib.training import loop, train, trial
    from cifarlib.training.config import make_config
    speeds: dict[str, list[float]] = {f"{place}/{stage}": [] for stage in ("head", "top")
                                      for place in ("device", "host", "disk")}
    for r in range(rounds):
        for key in speeds:
            place, stage = key.split("/")
            cfg = make_config("cpu", dataset="folder", data_dir=data, cache_dir=cache_dir, weights="none",
                              backbone="tf_efficientnet_lite0", image_size=88, store_size=32, max_train_samples=3000,
                              max_eval_samples=100, data_on=place, order="shuffle", device="cpu", epochs=2,
                              run_name="stream", overwrite=True, checkpoint_dir=os.path.join(cache_dir, "ckpt"))
            run = train.prepare(cfg)
            assert run.plan.data_on == place
            st = trial._stage_run(run, 0 if stage == "head" else 1, 1000)
            t0 = time.perf_counter()
            loop.train_epoch(run, st, r)
            seconds = time.perf_counter() - t0
            speeds[key].append(len(loop.train_loader(run)) * cfg.batch_size / seconds)
            print(json.dumps({"round": r, "data_on": place, "stage": stage, "images_per_s": round(speeds[key][-1], 1)}),
                  flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    return {"kind": "train", "rounds": rounds, "medians": {k: round(v, 1) for k, v in med.items()},
            "vs_device": {k: round(v / med["device/" + k.split("/")[1]], 3) for k, v in med.items()},
            "all": {k: [round(x, 1) for x in v] for k, v in speeds.items()}}


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_cache(path: Path, count: int, size: int) -> None:
    """`count` pictures at `size` px in the cache's raw format (the trailer lists them)."""
    row = 3 * size * size
    block = torch.randint(0, 256, (max(1, (64 << 20) // row), row), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).numpy()
    with open(path, "wb") as f:
        done = 0
        while done < count:
            n = min(len(block), count - done)
            f.write(memoryview(block[:n]).cast("B"))
            done += n
        trailer = json.dumps({"version": imagecache.VERSION, "store_size": size, "count": count,
                              "paths": [f"{i}.jpg" for i in range(count)], "sizes": [0] * count,
                              "mtimes": [0] * count, "rows": list(range(count)), "reasons": [""] * count}).encode()
        f.write(trailer + len(trailer).to_bytes(8, "little") + imagecache.MAGIC)


def read_speed(split: Split, block: bool, seconds: float) -> tuple[float, float]:
    """Images/s delivered, and the CPU time spent (user and system, every thread) per second."""
    batches = Batches(split, 256, shuffle=True, block=block, ahead=4).epoch(0)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for x, _ in batches:
        n += len(x)
        if time.perf_counter() - t0 > seconds:
            break
    batches.close()
    wall = time.perf_counter() - t0
    return n / wall, (time.process_time() - c0) / wall


def sequential_speed(path: Path, seconds: float) -> float:
    evict(path)
    buf = bytearray(16 << 20)
    n, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while time.perf_counter() - t0 < seconds:
            got = f.readinto(buf)
            if not got:
                break
            n += got
    return n / (time.perf_counter() - t0)


def loader_speed(ram_times: float, seconds: float, folder: str) -> dict:
    size, ram = 224, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = int(ram * ram_times) // (3 * size * size)
    path = Path(tempfile.mkdtemp(dir=folder, prefix="bench-stream-")) / "cache.u8"
    try:
        t0 = time.perf_counter()
        write_cache(path, count, size)
        written = time.perf_counter() - t0
        images = imagecache._read(path, size).images
        split = Split(images, torch.zeros(count, dtype=torch.int64))
        out = {"kind": "loader", "pictures": count, "size": size, "cache_gb": round(path.stat().st_size / 1e9, 1),
               "ram_gb": round(ram / 1e9, 1), "write_s": round(written, 1),
               "free_memory_gb": round(runtime.available_memory(torch.device("cpu")) / 1e9, 1)}
        for name, block in (("shuffle", False), ("block", True)):
            evict(path)
            speed, cpu = read_speed(split, block, seconds)
            out[f"{name}_images_per_s"], out[f"{name}_cpu_per_s"] = round(speed, 1), round(cpu, 2)
            print(json.dumps({name: out[f"{name}_images_per_s"]}), flush=True)
        out["sequential_mb_per_s"] = round(sequential_speed(path, seconds / 2) / 1e6, 1)
        out["sequential_images_per_s"] = round(out["sequential_mb_per_s"] * 1e6 / (3 * size * size), 1)
        out["block_vs_shuffle"] = round(out["block_images_per_s"] / out["shuffle_images_per_s"], 2)
        return out
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("data")
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--cache-dir", default=tempfile.gettempdir() + "/bench-stream")
    t.add_argument("--out")
    ld = sub.add_parser("loader")
    ld.add_argument("--ram-times", type=float, default=1.5)
    ld.add_argument("--seconds", type=float, default=60)
    ld.add_argument("--dir", default=tempfile.gettempdir())
    ld.add_argument("--out")
    a = p.parse_args()
    result = train_speed(a.data, a.rounds, a.cache_dir) if a.what == "train" else loader_speed(a.ram_times, a.seconds, a.dir)
    result.update(date=time.strftime("%Y-%m-%d"), machine=platform.node(), cpus=os.cpu_count(), torch=torch.__version__,
                  command=" ".join(sys.argv))
    print(json.dumps(result), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
