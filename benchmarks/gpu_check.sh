#!/usr/bin/env bash
# One prepared GPU check, for a machine with an NVIDIA GPU and no network (H100/H200 class).
#
#   benchmarks/gpu_check.sh            # on the GPU machine: under 4 minutes
#   benchmarks/gpu_check.sh --smoke    # anywhere, on the CPU, tiny sizes: proves the script works
#
# It runs with the machine's own python3 (no virtual environment needed; PYTHONPATH=.), never
# downloads anything, and writes every result to $OUT if set, else to benchmarks/results/:
#   gpu_env.txt          what the machine is (nvidia-smi, torch, CUDA, cuDNN)
#   train_gpu.json       bench_train.py at 224 px, ResNet-50: ours (bf16, channels_last,
#                        compile) against the original loop, full fine-tuning and head only
#   augment_gpu.json     bench_augment.py on the GPU
#   gpu_check.log        everything printed
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
export HF_HUB_OFFLINE=1 TORCH_HOME="${TORCH_HOME:-/tmp/cifarlib-torch-home}"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
exec > >(tee "$DEST/gpu_check.log") 2>&1
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }

step "environment"
{
  date -u
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  echo "usable cores: $(nproc)"; df -h /dev/shm 2>/dev/null | tail -1
  "$PY" - <<'EOF'
import torch, torchvision, timm
print("torch", torch.__version__, "torchvision", torchvision.__version__, "timm", timm.__version__)
print("cuda available", torch.cuda.is_available(), "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "memory GiB", round(p.total_memory / 2**30, 1), "bf16", torch.cuda.is_bf16_supported())
EOF
} | tee "$DEST/gpu_env.txt"

if [[ $SMOKE == 1 ]]; then
  DEV=cpu; SIZE=32; NET=resnet18; COMPILE=""; STEPS=2; WINDOWS=2; BATCH=32; AUG_BATCH=32
else
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: run with --smoke for the CPU check")'
  DEV=cuda; SIZE=224; NET=resnet50; COMPILE="--compile"; STEPS=12; WINDOWS=3; BATCH=256; AUG_BATCH=256
fi

step "a CUDA sanity check: bf16 matmul against fp32"
"$PY" - "$DEV" <<'EOF'
import sys, torch
dev = sys.argv[1]
a, b = torch.randn(512, 512, device=dev), torch.randn(512, 512, device=dev)
ref = a.double() @ b.double()
low = (a.bfloat16() @ b.bfloat16()).double() if dev == "cuda" else (a @ b).double()
err = ((low - ref).norm() / ref.norm()).item()
print(f"relative error {err:.2e}")
assert err < 2e-2, "matrix product is wrong on this device"
EOF

CORES=$(nproc)
step "training throughput: ours vs the original loop ($NET, $SIZE px${COMPILE:+, compiled})"
train() {
  "$PY" benchmarks/bench_train.py --device "$DEV" --image-size "$SIZE" --backbone "$NET" --steps "$STEPS" \
    --windows "$WINDOWS" --passes 1 --batch-size "$BATCH" --workers "4,$CORES" "$@" --out "$DEST/train_gpu.json" > /dev/null
}
if ! train $COMPILE; then
  [[ -n "$COMPILE" ]] || exit 1
  step "torch.compile failed here (see the log above); measuring without it"
  train
fi

step "augmentation throughput"
"$PY" benchmarks/bench_augment.py --device "$DEV" --batch-size "$AUG_BATCH" --image-size "$SIZE" \
  --windows 5 --per-window 4 --workers "$CORES" > "$DEST/augment_gpu.json"

step "summary"
"$PY" - "$DEST" <<'EOF'
import json, sys
d = sys.argv[1]
t, a = json.load(open(f"{d}/train_gpu.json")), json.load(open(f"{d}/augment_gpu.json"))
o = t["original"]["workers_4"]
print(f"{t['device_name']}, {t['backbone']} at {t['image_size']} px")
print(f"  full fine-tuning: ours {t['ours']['full']['images_per_s']} img/s vs original {o['full']['images_per_s']} -> x{t['ratio']}")
print(f"  head only:        ours {t['ours']['head_only']['images_per_s']} img/s vs original {o['head_only']['images_per_s']} -> x{t['ratio_head_only']}")
print(f"  augmentation:     ours {a['ours']['images_per_s']} img/s vs original {a['original']['images_per_s']} -> x{a['ratio']}")
EOF
step "done; results in $DEST"
