#!/usr/bin/env bash
# One prepared GPU check, for a machine with an NVIDIA GPU and no network (H100/H200 class).
#
#   benchmarks/gpu_check.sh            # on the GPU machine: at most 4.5 minutes
#   benchmarks/gpu_check.sh --smoke    # anywhere, on the CPU, tiny sizes: proves the script works
#
# It runs with the machine's own python3 (no virtual environment needed; PYTHONPATH=.), never
# downloads anything, and writes every result to $OUT if set, else to benchmarks/results/:
#   gpu_env.txt           what the machine is (nvidia-smi, torch, CUDA, cuDNN)
#   gpu_probe.json        host syncs per training step, recompiles across a stage change, and
#                         the share of an epoch spent saving (benchmarks/probe_gpu_path.py)
#   train_gpu_224.json    bench_train.py, eager: ours against the original loop, full fine-tuning
#   train_gpu_160.json    the same at 160 px
#   train_gpu_224_compiled.json   ours compiled, 224 px (skipped, with a note, if time is short)
#   gpu_summary.json      each step's outcome and the headline figures
#   gpu_check.log         everything printed
#
# Every step has its own time limit, and a failed step is reported (which, and why) and not
# rerun; the steps after it still run. The limits (seconds): environment 15, test suite 90
# (not in --smoke, which the suite itself runs), probes 45, eager training 75 (both sizes),
# compiled training 60, started only if that much of the 270-second total is left (of 90 in
# --smoke, which compiles with the "eager" backend: the same path, without inductor's minutes
# of C++ compiling on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
export HF_HUB_OFFLINE=1 TORCH_HOME="${TORCH_HOME:-/tmp/cifarlib-torch-home}"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
TOTAL=270
exec > >(tee "$DEST/gpu_check.log") 2>&1
TEE=$!
flush_log() { exec >&- 2>&-; wait "$TEE" 2>/dev/null; }  # the log is complete before the script ends
trap flush_log EXIT
start=$SECONDS
STEPS=()
say() { echo "== [$((SECONDS - start)) s] $*"; }

# run_step NAME LIMIT COMMAND...: run with a time limit; record "NAME: ok|failed (why)"
run_step() {
  local name=$1 limit=$2 rc
  shift 2
  say "$name (limit ${limit} s)"
  timeout --kill-after=5 "$limit" "$@"
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

environment() {
  date -u
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  echo "usable cores: $(nproc)"
  "$PY" - <<'EOF'
import torch, torchvision, timm
print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)
print("cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
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
export -f environment
export PY DEST
run_step "environment" 15 bash -c 'environment | tee "$DEST/gpu_env.txt"' 

if [[ $SMOKE == 1 ]]; then
  TOTAL=90  # the CPU check
  DEV=cpu; SIZES="32 48"; NET=resnet18; STEPS_=2; WINDOWS=2; BATCH=16; PROBE_STEPS=4; WORKERS=2
  BACKEND=eager  # the compiled step's plumbing, without inductor's minutes of C++ compiling
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "no CUDA device: run with --smoke for the CPU check"; exit 1
  fi
  DEV=cuda; SIZES="224 160"; NET=resnet50; STEPS_=12; WINDOWS=3; BATCH=256; PROBE_STEPS=20; WORKERS="4,$(nproc)"
  BACKEND=inductor
  # The suite (CPU tests pinned to the CPU; notebook and widget tests skip without their packages),
  # in three parallel parts so that it fits its limit on a many-core machine.
  suite() {
    local a="tests/test_interrupts.py tests/test_train.py"
    local b="tests/test_gpu_path.py tests/test_data_distributed.py tests/test_augment.py tests/test_folders.py tests/test_data.py"
    local parts=("$a" "$b" "$(for f in $a $b; do printf -- '--ignore=%s ' "$f"; done)--deselect tests/test_benchmarks.py")
    local pids=() rc=0
    for part in "${parts[@]}"; do
      "$PY" -m pytest -q -p no:cacheprovider $part &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
  }
  export -f suite
  run_step "test suite" 90 bash -c suite
fi

run_step "probes: syncs, recompiles, saving" 45 "$PY" benchmarks/probe_gpu_path.py --device "$DEV" --backbone "$NET" \
  --image-size "${SIZES%% *}" --batch-size "$BATCH" --steps "$PROBE_STEPS" --out "$DEST/gpu_probe.json"

bench() {  # bench SIZE OUTFILE [extra flags]
  "$PY" benchmarks/bench_train.py --device "$DEV" --image-size "$1" --backbone "$NET" --steps "$STEPS_" \
    --windows "$WINDOWS" --passes 1 --batch-size "$BATCH" --workers "$WORKERS" --no-head-only "${@:3}" --out "$DEST/$2" > /dev/null
}
read -r FIRST SECOND <<< "$SIZES"
export -f bench
export DEV NET STEPS_ WINDOWS BATCH WORKERS FIRST SECOND BACKEND
run_step "eager training, $FIRST and $SECOND px, ours vs the original loop" 75 \
  bash -c 'bench "$FIRST" "train_gpu_$FIRST.json" && bench "$SECOND" "train_gpu_$SECOND.json"' 

left=$((TOTAL - (SECONDS - start)))
if (( left >= 60 )); then
  run_step "compiled training, $FIRST px" 60 \
    bash -c 'bench "$FIRST" "train_gpu_${FIRST}_compiled.json" --compile --compile-backend "$BACKEND" --only-ours --warmup 2' 
else
  STEPS+=("compiled training: skipped (only $left s of the $TOTAL s left, it needs 60)")
  say "compiled training skipped: only $left s left of $TOTAL"
fi

say "summary"
printf '%s\n' "${STEPS[@]}" > "$DEST/.steps"
"$PY" - "$DEST" "$FIRST" "$SECOND" <<'EOF'
import json, sys
from pathlib import Path
d, first, second = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
load = lambda name: json.loads((d / name).read_text()) if (d / name).is_file() else None
steps = (d / ".steps").read_text().splitlines()
(d / ".steps").unlink()
probe, compiled = load("gpu_probe.json") or {}, load(f"train_gpu_{first}_compiled.json")
summary = {"steps": steps, "compile_used": compiled["ours"]["full"]["compile"] if compiled else False,
           "syncs_per_step": probe.get("syncs_per_step"), "recompiles": probe.get("recompiles"),
           "save_share": probe.get("save_share"), "training": {}}
for size in (first, second):
    t = load(f"train_gpu_{size}.json")
    if t:
        o = next(iter(t["original"].values()))["full"]
        summary["training"][f"{size}px"] = {"ours": t["ours"]["full"]["images_per_s"], "original": o["images_per_s"], "ratio": t["ratio"]}
if compiled:
    eager = load(f"train_gpu_{first}.json")
    c = compiled["ours"]["full"]["images_per_s"]
    summary["training"][f"{first}px_compiled"] = {"ours": c, "ratio": round(c / next(iter(eager["original"].values()))["full"]["images_per_s"], 2) if eager else None}
(d / "gpu_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("\n".join(steps))
print(f"compile used: {summary['compile_used'] or 'no'}")
print(f"host syncs per training step (outside scheduled checks): {summary['syncs_per_step']}; "
      f"recompiles across a stage change: {summary['recompiles']}; saving, share of an epoch: {summary['save_share']}")
for k, v in summary["training"].items():
    print(f"full fine-tuning {k}: ours {v['ours']} img/s" + (f" vs original {v['original']} -> x{v['ratio']}" if "original" in v else f" -> x{v['ratio']} the eager run's original loop"))
EOF
failed=$(grep -c "failed" <<< "$(printf '%s\n' "${STEPS[@]}")")
say "done in $((SECONDS - start)) s; results in $DEST"
exit $(( failed > 0 ))
