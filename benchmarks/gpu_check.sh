#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh [DATA_DIR]
#
# What a person with a GPU runs (under 10 minutes, in a scratch folder it makes and keeps):
#   0. the machine: torch and CUDA versions, the driver, each GPU's name, memory and compute
#      capability, and the precision the trainer picks on it;
#   1. epoch throughput of the trainer on the GPU against a torchvision DataLoader
#      (benchmarks/epoch_throughput.py --device cuda), and what bf16 autocast, channels_last
#      and fused optimizers gain per net (benchmarks/train_speed.py --device cuda);
#   2. mlp trials per minute with 1, 2 and 4 trials at once on every GPU
#      (--workers-per-device K), 60 s of search each, no final step, with the most GPU
#      memory in use meanwhile;
#   3. one short study of each kind (mlp, cnn, vgg16 with random weights: nothing is
#      downloaded), with its final step: retrain, save, reload, ONNX, report.
# DATA_DIR: MNIST IDX files (60,000 images); without it the offline mnist-5k is used.
# A step that fails prints FAILED and the last 20 lines of its log, and the next one runs.
# On a machine where CUDA cannot run it says so in one line and exits 0.
# Paste its last table into benchmarks/RESULTS.md.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

python "$repo/benchmarks/machine.py"  # date, commit, CPU, GPUs, versions
echo
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    2>/dev/null; then
  echo "gpu_check: CUDA cannot run here (no GPU, no driver, or torch without CUDA); nothing to measure"
  exit 0
fi

data=(--data mnist-5k)
if [[ $# -ge 1 ]]; then data=(--data mnist --data-dir "$(cd "$1" && pwd)"); fi
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")"
cd "$work" || exit 1
echo "scratch folder: $work"
failed=0

# step NAME LOG COMMAND...: run COMMAND with its output in LOG; on failure say so, show the
# log's end, and go on
step() {
  local name=$1 log=$2 status
  shift 2
  "$@" > "$log" 2>&1
  status=$?
  if [[ $status -eq 0 ]]; then
    return 0
  fi
  echo "FAILED: $name (exit $status); the last 20 lines of $work/$log:"
  tail -n 20 "$log" | sed 's/^/    /'
  failed=$((failed + 1))
  return 1
}

echo "== 0. the machine"
python "$repo/benchmarks/machine.py"
step "machine" machine.log python - <<'EOF' && cat machine.log
import subprocess

import torch

from search.models import MLP
from search.train import Speed

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30).stdout.split()[0]
except (OSError, IndexError, subprocess.SubprocessError):
    driver = "unknown (nvidia-smi did not answer)"
print(f"driver {driver}")
for index in range(torch.cuda.device_count()):
    device = torch.device(f"cuda:{index}")
    props = torch.cuda.get_device_properties(index)
    speed = Speed.of(MLP(4, (2,), 2), device)
    print(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
          f"{props.major}.{props.minor}: the trainer picks {speed.describe()}")
EOF

echo "== 1. epoch throughput (60,000 images, lecture MLP)"
step "epoch throughput" throughput.log \
  timeout 180 python "$repo/benchmarks/epoch_throughput.py" --device cuda --repeat 3 \
  && tail -3 throughput.log

echo "== 1b. precision and optimizer kernel per net (one epoch of 6,400 images each)"
step "train speed" speed.log \
  timeout 180 python "$repo/benchmarks/train_speed.py" --device cuda --repeat 2 \
  --nets "mlp lecture,mlp wide,cnn BN" && tail -1 speed.log

echo "== 2. mlp trials per minute by trials at once per GPU (60 s each)"
results=()
for k in 1 2 4; do
  db="sqlite:///k$k.db"
  start=$(date +%s)
  # the most memory in use on any GPU while the search runs, sampled every 0.5 s
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 \
    > "memory-k$k.log" 2>/dev/null &
  sampler=$!
  step "search, $k trials per GPU" "k$k.log" \
    timeout 150 python -m search.run --study mlp "${data[@]}" --storage "$db" --no-final \
    --n-trials 100000 --timeout 60 --workers-per-device "$k"
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  seconds=$(( $(date +%s) - start ))
  memory=$(sort -n "memory-k$k.log" 2>/dev/null | tail -1)
  line=$(python - "$db" "$k" "$seconds" "${memory:--}" <<'EOF'
import sys

import optuna

optuna.logging.set_verbosity(optuna.logging.ERROR)
url, k, seconds, memory = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
memory = f"{memory} MiB" if memory.isdigit() else "-"
try:
    summaries = optuna.get_all_study_summaries(url)
except Exception as exc:  # noqa: BLE001 - no database, or not one: a row all the same
    summaries, why = [], f"no study ({type(exc).__name__})"
else:
    why = "no study"
if not summaries:
    print(f"| {k} | 0 | 0.0 | - | {memory} | {seconds:.0f} s | {why} |")
    raise SystemExit
study = optuna.load_study(study_name=summaries[0].study_name, storage=url)
done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")
        and t.datetime_complete is not None]
started = [t.datetime_start for t in study.trials if t.datetime_start is not None]
best = max((t.value for t in done if t.value is not None), default=None)
span = ((max(t.datetime_complete for t in done) - min(started)).total_seconds()
        if done and started else 0.0)
rate = len(done) / span * 60 if span > 0 else 0.0
print(f"| {k} | {len(done)} | {rate:.1f} | {'-' if best is None else f'{best:.4f}'} | "
      f"{memory} | {seconds:.0f} s | |")
EOF
)
  results+=("$line")
  echo "$line"
done

echo "== 3. one short study of each kind, with the final step"
for study in mlp cnn vgg16; do
  extra=()
  if [[ $study == vgg16 ]]; then extra=(--weights none); fi
  start=$(date +%s)
  status=ok
  step "$study study" "$study.log" \
    timeout 240 python -m search.run --study "$study" "${data[@]}" --n-trials 6 --epochs 3 \
    --final-seeds 1 "${extra[@]}" || status=FAILED
  metrics=$(find runs -path "runs/$study-*/metrics.json" 2>/dev/null | head -n 1)
  accuracy=-
  if [[ -n $metrics ]]; then
    accuracy=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['accuracy'])" \
      "$metrics" 2>/dev/null || echo -)
  fi
  echo "$study: $status in $(( $(date +%s) - start )) s, reloaded model test accuracy $accuracy"
done

echo
echo "| trials at once per GPU | trials finished | trials per minute | best val accuracy | most GPU memory in use | wall | note |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${results[@]}"
echo
echo "steps failed: $failed (logs in $work)"
