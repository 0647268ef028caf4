#!/usr/bin/env bash
# Checks and times the CUDA path on a GPU machine: the same recipes as on the CPU, with
# --device cuda, in fp32, bf16 and fp16; resume after SIGTERM; evaluate and predict on the GPU.
# Usage: FMNIST_DIR=<dir with the four IDX .gz files> OUT=<results dir> bash benchmarks/cuda_check.sh
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" CNNKIT_HOME="${CNNKIT_HOME:-/tmp/cnnkit-home}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/cuda-check}"; mkdir -p "$OUT"
RUNS=/tmp/cuda-runs; rm -rf "$RUNS"
DATA=(--data-dir "${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}")
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))"

run() {  # name, then cnnkit train flags
  local name=$1; shift
  local t0=$(date +%s.%N)
  python3 -m cnnkit --quiet train "${DATA[@]}" --device cuda --output "$RUNS" --name "$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s.%N)
  if [ $rc -eq 0 ]; then
    python3 - "$RUNS/$name" "$name" "$t0" "$t1" <<'PY' | tee -a "$OUT/summary.tsv"
import json, sys, statistics
run, name, wall = sys.argv[1], sys.argv[2], float(sys.argv[4]) - float(sys.argv[3])
s = json.load(open(f"{run}/summary.json"))
m = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
print(f"{name}\t{100 * s['test_accuracy']:.2f}%\t{wall:.1f} s wall\t{s['train_time_s']:.1f} s train\t"
      f"{statistics.median(r['train_images_per_s'] for r in m):.0f} img/s\t{s['epochs_run']} epochs\t{s['device']}")
PY
  else
    echo -e "$name\tFAILED rc=$rc" | tee -a "$OUT/summary.tsv"; tail -5 "$OUT/$name.log"
  fi
}

run seed-fmnist-fp32 --recipe seed-fmnist
run fmnist-baseline-fp32 --recipe fmnist-baseline
run fmnist-baseline-bf16 --recipe fmnist-baseline --precision bf16
run fmnist-baseline-fp16 --recipe fmnist-baseline --precision fp16
# The fast recipes unchanged (precision auto: bf16 on GPUs that have it); CIFAR-10 is too big to
# carry to the lent machine, so Fashion-MNIST only. And a time budget on the GPU.
run fmnist-quick --recipe fmnist-quick
run fmnist-fast --recipe fmnist-fast
run fmnist-fast-budget-1m --recipe fmnist-fast --time-budget 1m
python3 -m cnnkit --quiet lr-find "${DATA[@]}" --recipe fmnist-quick --device cuda --output "$RUNS" --name lr-find \
    > "$OUT/lr-find.log" 2>&1 && echo -e "lr-find on cuda\tok\t$(tail -2 "$OUT/lr-find.log" | head -1)" | tee -a "$OUT/summary.tsv"
run resnet18-bf16-cl --recipe fmnist-baseline --model resnet18 --epochs 3 --batch-size 256 --lr 0.002 \
    --precision bf16 --channels-last true --augment light --tta flip

# Interrupt a run with SIGTERM, resume it, and check it ends where an uninterrupted run ends.
FLAGS=(--recipe seed-fmnist --epochs 2 --max-train-samples 40000 --batch-size 16 --deterministic true --seed 4)
python3 -m cnnkit --quiet train "${DATA[@]}" --device cuda --output "$RUNS" --name ref "${FLAGS[@]}" > "$OUT/ref.log" 2>&1
python3 -m cnnkit --quiet train "${DATA[@]}" --device cuda --output "$RUNS" --name cut "${FLAGS[@]}" > "$OUT/cut.log" 2>&1 &
pid=$!
while [ ! -f "$RUNS/cut/config.json" ]; do sleep 0.1; done; sleep 2; kill -TERM $pid; wait $pid; echo "SIGTERM exit code: $?"
python3 -m cnnkit --quiet train --resume "$RUNS/cut" > "$OUT/resume.log" 2>&1; echo "resume exit code: $?"
python3 - "$RUNS" <<'PY' | tee -a "$OUT/summary.tsv"
import sys, torch
from cnnkit.checkpoint import load_checkpoint
a = load_checkpoint(__import__("pathlib").Path(sys.argv[1]) / "ref/checkpoints/last").model
b = load_checkpoint(__import__("pathlib").Path(sys.argv[1]) / "cut/checkpoints/last").model
print("resume-after-SIGTERM\tidentical weights:", all(torch.equal(a[k], b[k]) for k in a),
      "\tmax abs diff:", max(float((a[k].float() - b[k].float()).abs().max()) for k in a))
PY
python3 -m cnnkit evaluate "$RUNS/fmnist-baseline-fp32" --device cuda --json > "$OUT/evaluate.json" && echo "evaluate on cuda: ok"
echo "---"; cat "$OUT/summary.tsv"
