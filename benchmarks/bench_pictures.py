"""What each crafted picture costs to read as an upload (issue 29): peak memory beyond a small
photo's, and CPU time, each in a fresh process, by the rule the web app, `predict` and the
training folders share (`cifarlib.data.pictures.decode`).

    python benchmarks/bench_pictures.py [--out benchmarks/results/pictures.json]

The pictures are tests/hostile_pictures.py's. For each, a fresh Python process imports the rule,
reads a small photo (640 x 480 JPEG: the baseline, imports and allocator warm), notes its peak
resident memory (`VmHWM`), then reads the picture as an upload (`formats=UPLOAD_FORMATS`, at
least 160 px on the shorter side, what the app asks for) and reports the peak's growth and the
CPU seconds (user and system) the read took, or the one line it was refused with. The goal: at
most 150 MB and 1 s for every picture read. Prints a table and writes JSON. A benchmark, not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the crafted pictures are the tests'

CHILD = """
import io, json, sys, time
from PIL import Image
from cifarlib.core.errors import UserError
from cifarlib.data import pictures
def peak_kb():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's from before the exec)
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
buf = io.BytesIO()
Image.effect_noise((640, 480), 40).convert("RGB").save(buf, "JPEG")
pictures.decode(buf.getvalue(), 160, formats=pictures.UPLOAD_FORMATS)
before = peak_kb()
data = open(sys.argv[1], "rb").read()
t0 = time.process_time()
try:
    image = pictures.decode(data, 160, formats=pictures.UPLOAD_FORMATS)
    outcome = f"read, {image.size[0]}x{image.size[1]}"
except UserError as e:
    outcome = f"refused: {e}"
cpu = time.process_time() - t0
print(json.dumps({"peak_mb": round((peak_kb() - before) / 1024, 1), "cpu_s": round(cpu, 3), "outcome": outcome}))
"""


def main() -> None:
    import hostile_pictures

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the results as JSON to this file")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in hostile_pictures.write(Path(tmp)).items():
            done = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            result = json.loads(done.stdout) if done.returncode == 0 else {"outcome": f"crashed: {done.stderr[-300:]}"}
            rows.append({"picture": name, "bytes": path.stat().st_size, **result})
            print(f"{name:28s} {path.stat().st_size:>10,d} B  {result.get('peak_mb', '-'):>7} MB  "
                  f"{result.get('cpu_s', '-'):>6} s  {result['outcome'][:90]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
