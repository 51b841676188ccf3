"""Where a web app page's memory goes, and how fast it answers: PyTorch against onnxruntime.

    python benchmarks/bench_page.py CHECKPOINT [--pictures DIR] [--repeats 3]

For each engine, a fresh process does what a page's kernel does, one step at a time, and the
process's memory is read after each step (psutil: RSS, PSS and USS, in MB; USS is what the page
alone holds, what another page would add):

1. Python with ipykernel and ipywidgets imported (what every kernel of a page holds);
2. the page's imports (`cifarlib.serving.app`; for PyTorch also torch, timm and torchvision, which
   loading a checkpoint needs);
3. the model loaded (`Predictor.from_checkpoint`, or `OnnxPredictor.from_export` on the model
   `python -m cifarlib.export CHECKPOINT --cams` writes, exported here first);
4. one upload answered (`UploadApp.show_file`), with where the model looked; then the time per
   upload over every picture in DIR (default: the 20 real CIFAR-100 photos of
   ../shared/samples/cifar100), `--repeats` times, after that first one.

Prints one JSON line per engine and a last one with both. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory() -> dict:
    import psutil

    m = psutil.Process().memory_full_info()
    return {"rss_mb": round(m.rss / 1e6), "pss_mb": round(m.pss / 1e6), "uss_mb": round(m.uss / 1e6)}


def child(engine: str, checkpoint: str, model: str, pictures: list[Path], repeats: int) -> dict:
    """One engine's steps, in this process (a fresh one)."""
    steps, t0 = [], time.perf_counter()

    def step(name: str) -> None:
        steps.append({"step": name, "s": round(time.perf_counter() - t0, 2), **memory()})

    step("python")
    import ipykernel.kernelapp  # noqa: F401
    import ipywidgets  # noqa: F401
    step("ipykernel and ipywidgets")
    from cifarlib.serving.app import UploadApp, page_predictor
    if engine == "torch":
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    step("the page's imports")
    predictor = page_predictor(checkpoint, "") if engine == "torch" else page_predictor("", model)
    step("model loaded")
    app, files = UploadApp(predictor), [p.read_bytes() for p in pictures]
    app.show_file("first.png", files[0])
    step("first upload answered")
    times = []
    for _ in range(repeats):
        for data in files:
            t = time.perf_counter()
            app.show_file("p.png", data)
            times.append(1000 * (time.perf_counter() - t))
    step(f"{len(times)} more uploads")
    return {"engine": engine, "steps": steps, "uploads": len(times), "median_ms": round(statistics.median(times), 1),
            "mean_ms": round(statistics.mean(times), 1), "modules_torch": "torch" in sys.modules}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--pictures", default=str(ROOT.parent / "shared" / "samples" / "cifar100"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="", help="the exported model (default: exported here, into a temporary folder)")
    ap.add_argument("--child", choices=["torch", "onnx"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    pictures = sorted(p for p in Path(args.pictures).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint, args.model, pictures, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            subprocess.run([sys.executable, "-m", "cifarlib.export", args.checkpoint, "--cams", "--out",
                            f"{tmp}/model.onnx"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            model = f"{tmp}/model.onnx"
        results = {}
        for engine in ("torch", "onnx", "torch", "onnx"):  # twice each, alternating; the second run is kept
            out = subprocess.run([sys.executable, __file__, args.checkpoint, "--model", model, "--child", engine,
                                  "--pictures", args.pictures, "--repeats", str(args.repeats)],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
            results[engine] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(results[engine]), flush=True)
    import psutil
    print(json.dumps({
        "checkpoint": args.checkpoint, "pictures": len(pictures),
        "uss_mb": {e: r["steps"][-1]["uss_mb"] for e, r in results.items()},
        "median_ms": {e: r["median_ms"] for e, r in results.items()},
        "load_average": os.getloadavg(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


if __name__ == "__main__":
    main()
