"""The benchmark scripts run (tiny sizes, CPU); their figures are not asserted: they are measurements."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_mode_runs_on_cpu_and_writes_its_results(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["augment_gpu.json", "gpu_check.log", "gpu_env.txt", "train_gpu.json"]
    train = json.loads((tmp_path / "train_gpu.json").read_text())
    assert {"ours", "original", "ratio", "ratio_head_only"} <= set(train)
    assert set(train["ours"]) == {"full", "head_only"} and "workers_4" in train["original"]
    assert json.loads((tmp_path / "augment_gpu.json").read_text())["ratio"] > 0
    assert "full fine-tuning: ours" in r.stdout


def test_runs_table_benchmark_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "benchmarks/bench_runs.py", "--runs", "3", "--repeats", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["runs"] == 3 and result["epochs"] == 100 + 16 + 3 and len(result["cli_s"]["all"]) == 1
