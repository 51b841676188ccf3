#!/usr/bin/env bash
# One prepared GPU check, for a machine with an NVIDIA GPU and no network (H100/H200 class),
# lent briefly: one command of at most 480 s.
#
#   benchmarks/gpu_check.sh            # on the GPU machine
#   benchmarks/gpu_check.sh --smoke    # anywhere, on the CPU, tiny sizes: every step's code runs
#                                      # (the two steps that rerun another's code are spared)
#
# It runs with the machine's own python3 (no virtual environment needed; PYTHONPATH=.), never
# downloads anything, and writes every result to $OUT if set, else to benchmarks/results/:
#   gpu_env.txt                  what the machine is (nvidia-smi, torch, CUDA, cuDNN)
#   gpu_cuda_tests.txt           tests/test_cuda.py's report
#   train_gpu_224.json           bench_train.py, eager: ours against the original loop, full fine-tuning
#   train_gpu_160.json           the same at 160 px
#   gpu_probe_sgd.json           host syncs per step, recompiles across a stage change, and the
#   gpu_probe_adamw.json         share of an epoch spent saving (benchmarks/probe_gpu_path.py)
#   train_gpu_224_compiled.json  ours compiled, 224 px (only if the time left allows)
#   gpu_summary.json             every figure, and each step's outcome: ok, failed (why) or dropped
#   gpu_check.log                everything printed
#
# The steps, in the order of what matters first, each with its own time limit (seconds):
#   1. the environment line                                         15
#   2. tests/test_cuda.py                                           75
#   3. throughput at 224 px, then at 160 px, ours vs the original   70 each (--smoke: the first)
#   4. the probes with SGD, then with AdamW                         80 each (--smoke: SGD)
#   5. compiled training at 224 px: only if the time left is at least the compile time measured
#      by an earlier run (gpu_summary.json where this run writes, else the committed one in
#      benchmarks/results/), or 150 s until one has, plus 30 s of steps.
# A step is dropped, not started, when less time is left of the total (480 s; 240 in --smoke)
# than its limit, the seconds timeout may take to kill it, and the summary's; a step that runs is
# capped so that it cannot eat into them, so the summary is always written within the total. A
# failed step is reported (which, and why) and not rerun, and the steps after it still run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
export HF_HUB_OFFLINE=1 TORCH_HOME="${TORCH_HOME:-/tmp/cifarlib-torch-home}"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
exec > >(tee "$DEST/gpu_check.log") 2>&1
TEE=$!
flush_log() { exec >&- 2>&-; wait "$TEE" 2>/dev/null; }  # the log is complete before the script ends
trap flush_log EXIT
start=$SECONDS
STEPS=()
KILL_S=5      # timeout's --kill-after
SUMMARY_S=20  # kept for the summary at the end (it takes about 2 s)
say() { echo "== [$((SECONDS - start)) s] $*"; }
left() { echo $((TOTAL - (SECONDS - start) - KILL_S - SUMMARY_S)); }  # what a step may still use

# run_step NAME LIMIT COMMAND...: dropped if less than LIMIT is left; else run with that limit
# and record "NAME: ok|failed (why)"
run_step() {
  local name=$1 limit=$2 rc
  shift 2
  if (( $(left) < limit )); then
    STEPS+=("$name: dropped (only $(left) s of the $TOTAL s left, it needs $limit)"); say "$name: dropped"
    return 0
  fi
  say "$name (limit ${limit} s)"
  timeout --kill-after=$KILL_S "$limit" "$@"
  rc=$?
  if [[ $rc == 0 ]]; then
    STEPS+=("$name: ok")
  elif [[ $rc == 124 || $rc == 137 ]]; then
    STEPS+=("$name: failed (ran past its limit of $limit s)"); say "$name: ran past its limit of $limit s"
  else
    STEPS+=("$name: failed (exit status $rc; see the log above)"); say "$name: failed with exit status $rc"
  fi
  return 0
}

if [[ $SMOKE == 1 ]]; then
  TOTAL=${GPU_CHECK_TOTAL:-240}  # the CPU check
  DEV=cpu; FIRST=32; SECOND=48; NET=test_resnet; BENCH_STEPS=2; WINDOWS=1; BATCH=16; WORKERS=1
  PROBE="--sync-steps 4 --save-images 64"; BACKEND=eager  # the compiled step's plumbing, without inductor's C++
  COMPILE_NEED=0
else
  TOTAL=${GPU_CHECK_TOTAL:-480}
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: run with --smoke for the CPU check"; exit 1
  fi
  DEV=cuda; FIRST=224; SECOND=160; NET=resnet50; BENCH_STEPS=12; WINDOWS=3; BATCH=256; WORKERS="4,$(nproc)"
  PROBE="--sync-steps 60 --save-images 45000"; BACKEND=inductor
  COMPILE_NEED=$("$PY" - "$DEST/gpu_summary.json" benchmarks/results/gpu_summary.json <<'EOF'
import json, sys
for path in sys.argv[1:]:  # where this run writes first: an earlier run here measured it
    try:
        print(int(json.load(open(path))["compile_seconds"]))
        break
    except Exception:
        pass
else:
    print(150)
EOF
)
fi

environment() {
  date -u
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  echo "usable cores: $(nproc)"
  "$PY" - <<'EOF'
import torch, torchvision, timm
print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)
print("cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
from cifarlib.core import runtime
print(runtime.resolve_plan("auto").describe())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "memory GiB", round(p.total_memory / 2**30, 1), "bf16", torch.cuda.is_bf16_supported())
    a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
    ref = a.double() @ b.double()
    err = (((a.bfloat16() @ b.bfloat16()).double() - ref).norm() / ref.norm()).item()
    print(f"bf16 matmul relative error {err:.2e}")
    assert err < 2e-2, "matrix product is wrong on this device"
EOF
}
cuda_tests() { "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee "$DEST/gpu_cuda_tests.txt"; return "${PIPESTATUS[0]}"; }
bench() {  # bench SIZE OUTFILE [extra flags]
  "$PY" benchmarks/bench_train.py --device "$DEV" --image-size "$1" --backbone "$NET" --steps "$BENCH_STEPS" \
    --windows "$WINDOWS" --passes 1 --batch-size "$BATCH" --workers "$WORKERS" --no-head-only "${@:3}" --out "$DEST/$2" > /dev/null
}
probe() {  # probe OPTIMIZER [PROBES]
  "$PY" benchmarks/probe_gpu_path.py --device "$DEV" --backbone "$NET" --image-size "$FIRST" --batch-size "$BATCH" \
    $PROBE --optimizers "$1" --probes "${2:-syncs,compile,save}" --out "$DEST/gpu_probe_$1.json"
}
export -f environment cuda_tests bench probe
export PY DEST DEV NET BENCH_STEPS WINDOWS BATCH WORKERS FIRST SECOND BACKEND PROBE

run_step "environment" 15 bash -c 'environment | tee "$DEST/gpu_env.txt"'
run_step "tests/test_cuda.py" 75 bash -c cuda_tests
run_step "throughput, $FIRST px, ours vs the original loop" 70 bash -c 'bench "$FIRST" "train_gpu_$FIRST.json"'
if [[ $SMOKE == 1 ]]; then  # the step above's code at another size: spare the test suite its time
  STEPS+=("throughput, $SECOND px, ours vs the original loop: spared in --smoke (the step above, at another size)")
else
  run_step "throughput, $SECOND px, ours vs the original loop" 70 bash -c 'bench "$SECOND" "train_gpu_$SECOND.json"'
fi
run_step "probes with SGD" 80 bash -c 'probe sgd'
if [[ $SMOKE == 1 ]]; then  # on the CPU's plan AdamW takes the SGD step's code; its fused kernel runs in tests/test_plan.py
  STEPS+=("probes with AdamW: spared in --smoke (the step above, with AdamW)")
else
  run_step "probes with AdamW" 80 bash -c 'probe adamw'
fi
need=$((COMPILE_NEED + 30))
if (( $(left) >= need )); then
  run_step "compiled training, $FIRST px" "$(left)" \
    bash -c 'bench "$FIRST" "train_gpu_${FIRST}_compiled.json" --compile --compile-backend "$BACKEND" --only-ours --warmup 1'
else
  STEPS+=("compiled training, $FIRST px: dropped (only $(left) s left; compiling needs about $COMPILE_NEED s and timing 30)")
  say "compiled training dropped: only $(left) s left"
fi

say "summary"
printf '%s\n' "${STEPS[@]}" > "$DEST/.steps"
"$PY" - "$DEST" "$FIRST" "$SECOND" "$SMOKE" <<'EOF'
import json, re, sys
from pathlib import Path
d, first, second, smoke = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
load = lambda name: json.loads((d / name).read_text()) if (d / name).is_file() else None
steps = (d / ".steps").read_text().splitlines()
(d / ".steps").unlink()
tests = (d / "gpu_cuda_tests.txt").read_text() if (d / "gpu_cuda_tests.txt").is_file() else ""
counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tests.splitlines()[-1] if tests else ""))
summary = {"smoke": smoke, "steps": steps, "cuda_tests": counts, "training": {}, "probes": {}}
for size in (first, second):
    t = load(f"train_gpu_{size}.json")
    if t:
        o = next(iter(t["original"].values()))["full"]
        summary["training"][f"{size}px"] = {"ours": t["ours"]["full"]["images_per_s"], "original": o["images_per_s"],
                                           "ratio": t["ratio"], "precision": t["ours"]["full"]["precision"]}
for optimizer in ("sgd", "adamw"):
    p = (load(f"gpu_probe_{optimizer}.json") or {}).get(optimizer)
    if p:
        summary["probes"][optimizer] = {k: p.get(k) for k in ("syncs_per_step", "recompiles", "recompiles_within_a_stage",
                                                              "save_share", "save_seconds", "epoch_seconds")}
compiled = load(f"train_gpu_{first}_compiled.json")
summary["compile_used"] = compiled["ours"]["full"]["compile"] if compiled else False
if compiled:
    c, eager = compiled["ours"]["full"], load(f"train_gpu_{first}.json")
    summary["compile_seconds"] = c["warmup_s"]  # the warm-up window: compiling, and a window's steps
    summary["training"][f"{first}px_compiled"] = {"ours": c["images_per_s"], "eager": eager["ours"]["full"]["images_per_s"] if eager else None}
(d / "gpu_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("\n".join(steps))
print(f"tests/test_cuda.py: {counts or 'not run'}")
for k, v in summary["training"].items():
    print(f"full fine-tuning {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
for k, v in summary["probes"].items():
    print(f"probes, {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
print(f"compile used: {summary['compile_used'] or 'no'}" + (f" ({summary['compile_seconds']} s to compile and warm up)" if compiled else ""))
EOF
failed=$(grep -c "failed" <<< "$(printf '%s\n' "${STEPS[@]}")")
say "done in $((SECONDS - start)) s; results in $DEST"
exit $(( failed > 0 ))
