#!/usr/bin/env bash
# Regenerate the paper's tables with advmoe.py: a flat list of runs, one block per table, then the report.
#
#   bash train_all.sh                                   # everything, one job per visible GPU
#   DRY_RUN=1 bash train_all.sh                         # print the commands only
#   EPOCHS=1 DATASETS=synthetic ARCHS=resnet18 bash train_all.sh   # a reduced grid (runs on a CPU)
#
# Environment: EPOCHS (100), DATASETS, ARCHS, GPUS (indices; default: every GPU nvidia-smi lists, else the
# CPU), OUT (runs), DATA_DIR (data), EXTRA (more flags for every run), DRY_RUN (0).
# A run whose OUT/<name>/result.json exists is skipped, so the script can be re-run after an interruption
# (each run also resumes from its own checkpoint: --resume).
set -euo pipefail
cd "$(dirname "$0")"

EPOCHS=${EPOCHS:-100}
DATASETS=${DATASETS:-"cifar10 cifar100 tinyimagenet imagenet"}
ARCHS=${ARCHS:-"resnet18 wrn28_10 vgg16 densenet"}
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)}
OUT=${OUT:-runs}
DATA_DIR=${DATA_DIR:-data}
EXTRA=${EXTRA:-}
DRY_RUN=${DRY_RUN:-0}

JOBS=()
job() { local name=$1; shift; JOBS+=("$name|$*"); }

# ---- Table 1: SA, RA (PGD-50) and GFLOPs of AT(S-Dense), AT(MoE), AdvMoE and AT(Dense) ------------------
# N = 2 experts, r = 0.5, TRADES (beta 6), 2-step training attack; eps 8/255 (CIFAR), 2/255 (Tiny/ImageNet).
for dataset in $DATASETS; do
  for arch in $ARCHS; do
    for method in sdense moe advmoe dense; do
      job "table1/${dataset}_${arch}_${method}" --dataset "$dataset" --arch "$arch" --method "$method"
    done
  done
done

# ---- Not yet here (tracked in the issues): AT(Sparse), AutoAttack (Table 2), the Sec. 4 analyses and the
# ---- sweeps over N and r (Fig. 7, 8).

# ---- Runner: one job per GPU slot; on a machine without GPUs, one job at a time on the CPU --------------
read -r -a SLOTS <<< "${GPUS:-cpu}"
[[ ${#SLOTS[@]} -gt 0 ]] || SLOTS=(cpu)
declare -A PID=()
for entry in "${JOBS[@]}"; do
  name=${entry%%|*}
  args=${entry#*|}
  if [[ -f "$OUT/$name/result.json" ]]; then
    echo "skip $name (result.json exists)"
    continue
  fi
  cmd="python advmoe.py $args --epochs $EPOCHS --data-dir $DATA_DIR --out $OUT/$name --resume $EXTRA"
  if [[ $DRY_RUN == 1 ]]; then
    echo "$cmd"
    continue
  fi
  while true; do  # wait for a free slot
    for slot in "${SLOTS[@]}"; do
      pid=${PID[$slot]:-}
      if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then break 2; fi
    done
    sleep 5
  done
  mkdir -p "$OUT/$name"
  echo "[$slot] $cmd"
  if [[ $slot == cpu ]]; then
    $cmd --device cpu > "$OUT/$name/stdout.log" 2>&1 &
  else
    CUDA_VISIBLE_DEVICES=$slot $cmd > "$OUT/$name/stdout.log" 2>&1 &
  fi
  PID[$slot]=$!
done
wait

[[ $DRY_RUN == 1 ]] && exit 0
failed=0
for entry in "${JOBS[@]}"; do
  name=${entry%%|*}
  [[ -f "$OUT/$name/result.json" ]] || { echo "FAILED: $name (see $OUT/$name/stdout.log)"; failed=1; }
done
python advmoe.py report "$OUT"
exit $failed
