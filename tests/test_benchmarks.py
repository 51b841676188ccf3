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
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"gpu_env.txt", "gpu_cuda_tests.txt", "gpu_check.log", "gpu_probe_sgd.json", "gpu_summary.json",
                     "train_gpu_32.json", "train_gpu_32_compiled.json"}, names
    assert "device plan: cpu, fp32" in (tmp_path / "gpu_env.txt").read_text()
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    spared = ["throughput, 48 px, ours vs the original loop: spared in --smoke (the step above, at another size)",
              "probes with AdamW: spared in --smoke (the step above, with AdamW)"]
    assert summary["smoke"] and all(s.endswith(": ok") or s in spared for s in summary["steps"]), summary["steps"]
    assert [s.split(":")[0] for s in summary["steps"]] == [
        "environment", "tests/test_cuda.py", "throughput, 32 px, ours vs the original loop",
        "throughput, 48 px, ours vs the original loop", "probes with SGD", "probes with AdamW", "compiled training, 32 px"]
    assert summary["cuda_tests"].get("skipped", 0) > 0 and not summary["cuda_tests"].get("failed")  # no CUDA here
    probe = summary["probes"]["sgd"]
    assert list(summary["probes"]) == ["sgd"] and probe["syncs_per_step"] is None  # the same keys as on a GPU; CUDA only
    assert probe["recompiles"] <= 1 and probe["recompiles_within_a_stage"] == 0  # one graph per stage
    assert 0 < probe["save_share"] < 1 and probe["epoch_seconds"] > probe["save_seconds"] > 0
    assert summary["compile_used"] == "eager" and summary["compile_seconds"] > 0
    assert summary["training"]["32px"]["ratio"] > 0 and summary["training"]["32px"]["precision"] == "fp32"
    assert "48px" not in summary["training"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "compile used:" in log and "done in" in log  # flushed to its end before the script exits


def test_gpu_check_drops_the_steps_that_no_longer_fit_its_time(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_TOTAL": "14"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_summary.json").read_text())["steps"]
    assert len(steps) == 7 and steps[0].startswith("environment: dropped (only ") and steps[0].endswith("it needs 15)")
    assert all("dropped (only" in s for s in steps if "spared in --smoke" not in s), steps


def test_runs_table_benchmark_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "benchmarks/bench_runs.py", "--runs", "3", "--repeats", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["runs"] == 3 and result["epochs"] == 100 + 16 + 3 and len(result["cli_s"]["all"]) == 1


def test_real_photo_benchmark_runs_both_sides_on_a_tiny_folder(tmp_path, monkeypatch, capsys):
    """bench_real.py on a small synthetic folder, random weights: the preset through the CLI,
    then the plain loop, each one JSON line. (Its figures come from real photos: benchmarks/README.md.)
    The script's own part (warming the cache, starting and timing the run) runs in this process;
    each run is the fresh process it starts, as on the command line."""
    import runpy

    import torch
    from PIL import Image

    from cifarlib.data.synthetic import make_images
    labels = torch.arange(48) % 3
    for i, img in enumerate(make_images(labels, seed=0)):
        folder = tmp_path / "photos" / ["cat", "dog", "frog"][int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    common = ["backbone=resnet18", "image_size=32", "batch_size=8", f"cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs'
    monkeypatch.syspath_prepend(str(ROOT))
    results = []
    for extra in ([], ["--reference", "epochs=2"]):
        monkeypatch.setattr(sys, "argv", ["bench_real.py", str(tmp_path / "photos"), "none", *common, *extra])
        runpy.run_path(str(ROOT / "benchmarks" / "bench_real.py"), run_name="__main__")
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    ours, reference = results
    assert ours["who"] == "cpu preset" and ours["config"]["preset"] == "cpu" and ours["config"]["dataset"] == "folder"
    assert reference["who"] == "reference (plain loop)" and reference["config"]["image_size"] == 32
    for r in results:
        assert 0 <= r["val_top1"] <= 1 and r["val_loss"] > 0 and 0 < r["train_val_s"] <= r["command_s"]
    # plot_real.py draws them: only runs on a whole split (the tiny plain loop trained on 43 photos is left out)
    (tmp_path / "ours.jsonl").write_text(json.dumps(ours) + "\n")
    (tmp_path / "reference.jsonl").write_text(json.dumps(reference) + "\n")
    monkeypatch.setattr(sys, "argv", ["plot_real.py", str(tmp_path / "ours.jsonl"), "--reference",
                                      str(tmp_path / "reference.jsonl"), "--out", str(tmp_path / "real.png")])
    runpy.run_path(str(ROOT / "benchmarks" / "plot_real.py"), run_name="__main__")
    assert "1 runs drawn" in capsys.readouterr().out
    assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pace_prints_the_step_time_the_readme_compares_runs_by(monkeypatch, capsys):
    """benchmarks/pace.py in this process, one step after its warm-up, no fresh-process imports."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import pace
    result = pace.main(["--steps", "1", "--imports", "0"])
    assert json.loads(capsys.readouterr().out) == result
    assert result["resnet18_step_s"] > 0 and result["import_s"] is None and result["threads"] >= 1


def test_stream_loader_benchmark_runs_on_a_tiny_cache(tmp_path):
    """bench_stream.py loader with a cache of a few pictures: its file is written, read in both
    orders, timed, and deleted."""
    out = tmp_path / "stream.jsonl"
    r = subprocess.run([sys.executable, "benchmarks/bench_stream.py", "loader", "--ram-times", "0.0002", "--seconds", "0.2",
                        "--dir", str(tmp_path), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = json.loads(out.read_text())
    assert line["pictures"] > 0 and line["shuffle_images_per_s"] > 0 and line["block_images_per_s"] > 0
    assert list(tmp_path.iterdir()) == [out]  # the cache and its folder are gone
