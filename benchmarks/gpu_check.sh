#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh [DATA_DIR]
#
# What a person with a GPU runs (under 10 minutes, in a scratch folder it makes and keeps):
#   1. epoch throughput of the trainer on the GPU against a torchvision DataLoader
#      (benchmarks/epoch_throughput.py --device cuda), and what bf16 autocast, channels_last
#      and fused optimizers gain per net (benchmarks/train_speed.py --device cuda);
#   2. mlp trials per minute with 1, 2 and 4 trials at once on every GPU
#      (--workers-per-device K), 60 s of search each, no final step;
#   3. one short study of each kind (mlp, cnn, vgg16 with random weights: nothing is
#      downloaded), with its final step: retrain, save, reload, ONNX, report.
# DATA_DIR: MNIST IDX files (60,000 images); without it the offline mnist-5k is used.
# Paste its last table into the README's GPU section.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
data=(--data mnist-5k)
if [[ $# -ge 1 ]]; then data=(--data mnist --data-dir "$(cd "$1" && pwd)"); fi
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")"
cd "$work"
echo "scratch folder: $work"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true

echo "== 1. epoch throughput (60,000 images, lecture MLP)"
timeout 180 python "$repo/benchmarks/epoch_throughput.py" --device cuda --repeat 3 | tail -3

echo "== 1b. precision and optimizer kernel per net (one epoch of 6,400 images each)"
timeout 120 python "$repo/benchmarks/train_speed.py" --device cuda --repeat 2 \
  --nets "mlp lecture,mlp wide,cnn BN" | tail -1 || true

echo "== 2. mlp trials per minute by trials at once per GPU (60 s each)"
results=()
for k in 1 2 4; do
  db="sqlite:///k$k.db"
  start=$(date +%s)
  timeout 150 python -m search.run --study mlp "${data[@]}" --storage "$db" --no-final \
    --n-trials 100000 --timeout 60 --workers-per-device "$k" > "k$k.log" 2>&1 || true
  seconds=$(( $(date +%s) - start ))
  line=$(python - "$db" "$k" "$seconds" <<'EOF'
import sys
import optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
url, k, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
(summary,) = optuna.get_all_study_summaries(url)
study = optuna.load_study(study_name=summary.study_name, storage=url)
done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
best = max((t.value for t in done if t.value is not None), default=float("nan"))
span = (max(t.datetime_complete for t in done)
        - min(t.datetime_start for t in study.trials)).total_seconds() if done else 0
rate = len(done) / span * 60 if span else 0.0
print(f"| {k} | {len(done)} | {rate:.1f} | {best:.4f} | {seconds:.0f} s |")
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
  timeout 240 python -m search.run --study "$study" "${data[@]}" --n-trials 6 --epochs 3 \
    --final-seeds 1 "${extra[@]}" > "$study.log" 2>&1 && status=ok || status="FAILED ($?)"
  metrics=$(ls -d runs/"$study"-*/metrics.json 2>/dev/null | head -1)
  accuracy=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['accuracy'])" \
    "$metrics" 2>/dev/null || echo "-")
  echo "$study: $status in $(( $(date +%s) - start )) s, reloaded model test accuracy $accuracy"
done

echo
echo "| trials at once per GPU | trials finished | trials per minute | best val accuracy | wall |"
echo "|---|---|---|---|---|"
printf '%s\n' "${results[@]}"
