#!/usr/bin/env bash
# Regenerate the paper's tables and the data behind its figures with advmoe.py: a flat list of runs, one
# block per table, then the report (python advmoe.py report $OUT -> $OUT/report.md).
#
#   bash train_all.sh                                              # everything, one job per visible GPU
#   DRY_RUN=1 bash train_all.sh                                    # print the commands only
#   EPOCHS=1 DATASETS=synthetic ARCHS=resnet18 bash train_all.sh   # a reduced grid (runs on a CPU)
#   GRID=smoke bash train_all.sh                                   # check a machine first: one short run per method,
#                                                                  # an --eval-only, the report and the bench
#   GRID=laptop bash train_all.sh                                  # the real-CIFAR-10 laptop study on a 2-core CPU
#
# Environment:
#   EPOCHS (100)        training epochs of every run (AT(Sparse): fine-tuning epochs)
#   DATASETS, ARCHS     the Table 1 grid (default: all four of each)
#   NS ("2 4 6 8 10"), RATIOS ("0.2 0.5 0.8")   the sweeps (Fig. 7: N x r for AdvMoE; Fig. 8: r for each method)
#   AA_N (1000)         test images for AutoAttack (Table 2)
#   GPUS                GPU indices, one job per GPU (default: every GPU nvidia-smi lists; none: the CPU)
#   OUT (runs), DATA_DIR (data), EXTRA (more flags for every run), DRY_RUN (0)
#   GRID (paper | smoke | laptop | learnability), CPU_JOBS (1; else 2): runs at a time without GPUs, each on
#   $(nproc)/CPU_JOBS threads
# A run whose OUT/<name>/result.json exists is skipped, so the script can be re-run after an interruption
# (each training run also resumes from its own checkpoint: --resume). A job waits for the runs it starts
# from (AT(Sparse) for AT(Dense), evaluations for their checkpoints); if one of them failed, it is skipped.
set -euo pipefail
cd "$(dirname "$0")"

GRID=${GRID:-paper}
[[ $GRID == paper || $GRID == smoke || $GRID == laptop || $GRID == learnability ]] || { echo "train_all.sh: GRID=$GRID: choose paper, smoke, laptop or learnability" >&2; exit 2; }
if [[ $GRID == smoke ]]; then  # the machine's name: cpu, or the GPU's last word (h100, h200, a100, ...)
  DEVICE_NAME=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else 'cpu')")
  # a fresh folder every time (the default's old runs are removed; a given OUT must not exist yet)
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    [[ -z ${OUT:-} ]] && rm -rf "runs/smoke_$DEVICE_NAME"
    [[ -e ${OUT:-runs/smoke_$DEVICE_NAME} ]] && { echo "train_all.sh: GRID=smoke: OUT=$OUT exists: give a new folder" >&2; exit 2; }
  fi
  EPOCHS=${EPOCHS:-1}; OUT=${OUT:-runs/smoke_$DEVICE_NAME}; CPU_JOBS=${CPU_JOBS:-2}
fi
if [[ $GRID == laptop ]]; then
  EPOCHS=${EPOCHS:-12}; OUT=${OUT:-results/cifar10_laptop}; CPU_JOBS=${CPU_JOBS:-2}; GPUS=${GPUS-}
fi
if [[ $GRID == learnability ]]; then
  EPOCHS=${EPOCHS:-12}; OUT=${OUT:-results/moe_learnability}; CPU_JOBS=${CPU_JOBS:-2}; GPUS=${GPUS-}
fi
EPOCHS=${EPOCHS:-100}
CPU_JOBS=${CPU_JOBS:-1}
DATASETS=${DATASETS:-"cifar10 cifar100 tinyimagenet imagenet"}
ARCHS=${ARCHS:-"resnet18 wrn28_10 vgg16 densenet"}
NS=${NS:-"2 4 6 8 10"}
RATIOS=${RATIOS:-"0.2 0.5 0.8"}
AA_N=${AA_N:-1000}
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)}
OUT=${OUT:-runs}
DATA_DIR=${DATA_DIR:-data}
EXTRA=${EXTRA:-}
DRY_RUN=${DRY_RUN:-0}

NAMES=(); declare -A ARGS=() DEPS=()
# job NAME "DEPENDENCIES" FLAGS...: a run writing OUT/NAME, started once the named runs have finished
job() { local name=$1 deps=$2; shift 2; NAMES+=("$name"); ARGS[$name]="$*"; DEPS[$name]=$deps; }
ckpt() { echo "$OUT/$1/checkpoint.pt"; }
has() { [[ " $1 " == *" $2 "* ]]; }  # has "LIST" WORD

# ---- GRID=laptop: the paper's comparison on real CIFAR-10 at laptop scale (results/cifar10_laptop/README.md)
# ResNet-18 at width 1/4 (Dense 16-32-64-128 channels), N = 2, r = 0.5, TRADES, the paper's routing (no balance
# term, one learning rate); 20,000 training images, 500 more held out for validation, 12 epochs. SA, PGD-50, the
# soft attack and Square (1,000 queries) on the same 2,000 test images for every run; AutoAttack (standard) on
# 500 for seed 1 of AT(S-Dense), AT(MoE) and AdvMoE. The authors' configuration is a further arm: the global
# router with class-mod-N router supervision at their weight (6). Seed 1 of everything first, so that a study
# cut short already holds its comparison; a rerun skips what has finished and resumes the rest. Round 1's
# MoE-CNNs have the paper's independent experts (--no-shared-core, advmoe.py's default before deviation 14).
if [[ $GRID == laptop ]]; then
  lap=(--dataset cifar10 --arch resnet18 --width 0.25 --n-experts 2 --ratio 0.5 --train-n 20000 --val-n 500
       --eval-n 2000 --eval-attacks pgd,soft,square --square-queries 1000 --quick-eval-n 500)
  authors=(--router global --router-supervision 6 --no-shared-core)
  for seed in 1 2; do
    aa=(); [[ $seed == 1 ]] && aa=(--eval-attacks pgd,soft,square,autoattack --aa-n 500)
    for method in sdense moe advmoe; do
      job "${method}_s$seed" "" "${lap[@]}" --method $method --seed $seed "${aa[@]}" \
        $([[ $method != sdense ]] && echo --no-shared-core)
    done
    [[ $seed == 1 ]] && job dense_s1 "" "${lap[@]}" --method dense --seed 1
    for method in moe advmoe; do
      job "${method}_authors_s$seed" "" "${lap[@]}" --method $method "${authors[@]}" --seed $seed
    done
  done
  # Round 2 (results/moe_learnability, round 3): the same comparison on the MoE-CNN that learns best under
  # natural training, upcycled experts with the balance term, AutoAttack on 500 images for every run; and
  # AdvMoE with the authors' exact routing (--router authors). AT(S-Dense) is reused from round 1. (`up` is
  # advmoe.py's default recipe, given in full; its --eval-attacks, the later one, wins over lap's.)
  up=(--shared-core --tie-epochs 3 --balance 0.1 --eval-attacks pgd,soft,square,autoattack --aa-n 500)
  for seed in 1 2; do
    for method in moe advmoe; do
      job "${method}_upcycle_balance_s$seed" "" "${lap[@]}" --method $method "${up[@]}" --seed $seed
    done
  done
  for seed in 1 2; do
    job "advmoe_routerauthors_s$seed" "" "${lap[@]}" --method advmoe --router authors --seed $seed \
      --eval-attacks pgd,soft,square,autoattack --aa-n 500
  done
fi

# ---- GRID=learnability: why the MoE-CNN learns worse than S-Dense (results/moe_learnability/README.md) ----
# Natural training (--loss natural: cross-entropy, no attack) at the laptop recipe: S-Dense, today's MoE-CNN,
# and one MoE-CNN per hypothesis: a shared BatchNorm (1); the expert layout (2): one expert index everywhere
# (the global router without supervision, and the same frozen at init); routers at a
# tenth of the learning rate, or frozen at init (3); raw router input (4); and twice the learning rate (an
# expert gets the gradient of the inputs routed to it only, about 1/N of a batch's). Seed 2 of the informative
# ones. Rounds 1 and 2 predate deviation 14 (advmoe.py's default recipe): their flags turn it off.
if [[ $GRID == learnability ]]; then
  nat=(--dataset cifar10 --arch resnet18 --width 0.25 --n-experts 2 --ratio 0.5 --train-n 20000 --val-n 500
       --loss natural --eval-n 2000 --test-steps 10 --quick-eval-n 0)
  declare -A VARIANT=([moe]="--no-shared-core" [moe_sharedbn]="--no-shared-core --shared-bn"
                      [moe_global]="--no-shared-core --router global"
                      [moe_routerlr0.1]="--no-shared-core --router-lr 0.1" [moe_frozen]="--no-shared-core --router-lr 0"
                      [moe_rawrouter]="--no-shared-core --no-router-standardize"
                      [moe_globalfrozen]="--no-shared-core --router global --router-lr 0"
                      [moe_lr0.2]="--no-shared-core --lr 0.2")
  job sdense_s1 "" "${nat[@]}" --method sdense --seed 1
  for v in moe moe_sharedbn moe_global moe_routerlr0.1 moe_globalfrozen moe_lr0.2; do
    job "${v}_s1" "" "${nat[@]}" --method moe ${VARIANT[$v]} --seed 1
  done
  job sdense_s2 "" "${nat[@]}" --method sdense --seed 2
  job moe_frozen_s1 "" "${nat[@]}" --method moe ${VARIANT[moe_frozen]} --seed 1
  for v in moe moe_globalfrozen moe_frozen; do
    job "${v}_s2" "" "${nat[@]}" --method moe ${VARIANT[$v]} --seed 2
  done
  job moe_rawrouter_s1 "" "${nat[@]}" --method moe ${VARIANT[moe_rawrouter]} --seed 1
  # Round 2 (the known remedies for gated CNNs, and the authors' exact routing), 2 seeds each: experts that
  # share a core; upcycling (the experts' filters tied for the first quarter of the epochs); the authors'
  # routing (the dense-to-sparse warm-up, moe_soft, lost: its runs are reproduced by commit 242e0bb).
  VARIANT+=([moe_sharedcore]="--shared-core --tie-epochs 0 --balance 0"
            [moe_upcycle]="--shared-core --tie-epochs 3 --balance 0"
            [moe_authors]="--router authors")
  for seed in 1 2; do
    for v in moe_sharedcore moe_upcycle moe_authors; do
      job "${v}_s$seed" "" "${nat[@]}" --method moe ${VARIANT[$v]} --seed $seed
    done
  done
  # Round 3: upcycling with one BatchNorm per layer (tied, it is then exactly S-Dense: with a BatchNorm per
  # expert it trails S-Dense by 5 points already while tied), and with the balance term against the collapse
  # that disqualified it in seed 2 (the winner, advmoe.py's default since: deviation 14). Then the budget
  # curve: S-Dense and round 1's MoE at 24 and 48 epochs, and the best arm (upcycling with the balance term) at 48.
  for seed in 1 2; do
    job "moe_upcycle_sharedbn_s$seed" "" "${nat[@]}" --method moe ${VARIANT[moe_upcycle]} --shared-bn --seed $seed
    job "moe_upcycle_balance_s$seed" "" "${nat[@]}" --method moe ${VARIANT[moe_upcycle]} --balance 0.1 --seed $seed
  done
  for e in 24 48; do
    job "sdense_e${e}_s1" "" "${nat[@]}" --method sdense --seed 1 --epochs $e
    job "moe_e${e}_s1" "" "${nat[@]}" --method moe ${VARIANT[moe]} --seed 1 --epochs $e
  done
  job moe_upcycle_balance_e48_s1 "" "${nat[@]}" --method moe --shared-core --tie-epochs 12 --balance 0.1 --seed 1 \
    --epochs 48
fi

# ---- GRID=smoke: check a machine in minutes before the full grid (README, "Check a machine first") --------
# One short run of each Table 1 method on real CIFAR-10 when DATA_DIR has it (the synthetic set otherwise), an
# --eval-only of the AdvMoE run, then (after the runner) the report and the bench of ResNet-18.
if [[ $GRID == smoke ]]; then
  SMOKE_DATA=synthetic
  [[ -f $DATA_DIR/cifar10_train.npz || -d $DATA_DIR/cifar-10-batches-py ]] && SMOKE_DATA=cifar10
  if [[ $DEVICE_NAME == cpu ]]; then  # small CPU settings: a quarter-width ResNet-18, 512 images
    small=(--width 0.25 --train-n 512 --eval-n 64 --test-steps 5 --quick-eval-n 0 --batch-size 64)
  else                                # one GPU: 10,000 images at full width
    small=(--train-n 10000 --eval-n 1000 --test-steps 10 --quick-eval-n 0)
  fi
  for method in dense sdense moe advmoe; do
    job "$method" "" --dataset $SMOKE_DATA --method $method "${small[@]}"
  done
  job sparse dense --dataset $SMOKE_DATA --method sparse --init "$(ckpt dense)" "${small[@]}"
  job advmoe_eval advmoe --eval-only "$(ckpt advmoe)"
fi

if [[ $GRID == paper ]]; then  # ---- GRID=paper (the default): Tables 1-2, Figs. 7-8, Sec. 4 (not Fig. 6, Table 3), to the Runner below
# ---- Table 1: SA, RA (PGD-50), GFLOPs of AT(S-Dense), AT(Sparse), AT(MoE), AdvMoE and AT(Dense) --------
# N = 2 experts, r = 0.5, TRADES (beta 6), 2-step training attack; eps 8/255 (CIFAR), 2/255 (Tiny/ImageNet).
# AT(Sparse) prunes the AT(Dense) model of its cell (HYDRA: scores, then fine-tuning), so it runs after it.
for dataset in $DATASETS; do
  for arch in $ARCHS; do
    t=table1/${dataset}_${arch}
    job "${t}_dense" "" --dataset "$dataset" --arch "$arch" --method dense
    for method in sdense moe advmoe; do
      job "${t}_${method}" "" --dataset "$dataset" --arch "$arch" --method "$method"
    done
    job "${t}_sparse" "${t}_dense" --dataset "$dataset" --arch "$arch" --method sparse \
      --init "$(ckpt "${t}_dense")"
  done
done

# ---- Table 2: AutoAttack (RA-AA) of the Table 1 models, CIFAR-10/100 x ResNet-18, WRN-28-10 -------------
# (The synthetic set stands in for CIFAR in a reduced grid.)
for dataset in $DATASETS; do
  has "cifar10 cifar100 synthetic" "$dataset" || continue
  for arch in $ARCHS; do
    has "resnet18 wrn28_10" "$arch" || continue
    for method in sdense sparse moe advmoe dense; do
      t=${dataset}_${arch}_${method}
      job "table2/$t" "table1/$t" --eval-only "$(ckpt "table1/$t")" --eval-attacks pgd,autoattack --aa-n "$AA_N"
    done
  done
done

# ---- Analyses (Sec. 4 and 5) on the first data set and ResNet-18 (or the first backbone) ----------------
read -r -a _d <<< "$DATASETS"; read -r -a _a <<< "$ARCHS"
D=${_d[0]}; A=${_a[0]}; has "$ARCHS" resnet18 && A=resnet18
base=(--dataset "$D" --arch "$A")

# Sec. 4, Insights 1-3: standard training of an MoE-CNN, then AT of its routers only (backbone frozen), then
# AT of its backbone on top (routers frozen). RA and the 4-way split after each stage; the report sets them
# beside AT(S-Dense), AT(Sparse) and AT(MoE) of Table 1.
s=study/${D}_${A}
job "${s}_1_standard" "" "${base[@]}" --method moe --loss natural
job "${s}_2_routers" "${s}_1_standard" "${base[@]}" --method moe --train-params routers --init "$(ckpt "${s}_1_standard")"
job "${s}_3_backbone" "${s}_2_routers" "${base[@]}" --method moe --train-params backbone --init "$(ckpt "${s}_2_routers")"

t=table1/${D}_${A}  # the Table 1 cell whose AT(Dense) run AT(Sparse) prunes in Fig. 8
# Fig. 7: AdvMoE's RA over r for N in NS. Where N*r > 1 the experts overlap in nothing: each owns its own
# r*C filters (N*r*C filters per layer, more than Dense's C), as in the authors' code. (N=2, r=0.5 is Table 1's.)
for n in $NS; do
  for r in $RATIOS; do
    [[ $n == 2 && $r == 0.5 ]] && continue
    job "fig7/${D}_${A}_advmoe_n${n}_r${r}" "" "${base[@]}" --method advmoe --n-experts "$n" --ratio "$r"
  done
done

# Fig. 8: every method over r (N = 2) against AT(Dense) (Table 1's run); AdvMoE at N = 2 comes from Fig. 7.
for r in $RATIOS; do
  [[ $r == 0.5 ]] && continue
  for method in sdense moe; do
    job "fig8/${D}_${A}_${method}_r${r}" "" "${base[@]}" --method "$method" --ratio "$r"
  done
  has "$NS" 2 || job "fig8/${D}_${A}_advmoe_r${r}" "" "${base[@]}" --method advmoe --ratio "$r"
  job "fig8/${D}_${A}_sparse_r${r}" "${t}_dense" "${base[@]}" --method sparse --ratio "$r" \
    --init "$(ckpt "${t}_dense")"
done

fi  # GRID=paper

# ---- Runner: a job starts once its dependencies have finished and a GPU (or, without GPUs, the CPU) is free
command_of() {
  local name=$1
  echo "python advmoe.py --epochs $EPOCHS ${ARGS[$name]} --data-dir $DATA_DIR --out $OUT/$name --resume $EXTRA"
}
if [[ $DRY_RUN == 1 ]]; then
  for name in "${NAMES[@]}"; do command_of "$name"; done
  echo "# ${#NAMES[@]} runs"
  exit 0
fi

read -r -a SLOTS <<< "${GPUS:-}"
if [[ ${#SLOTS[@]} -eq 0 ]]; then  # no GPU: CPU_JOBS runs at a time, sharing the cores
  for ((i = 0; i < CPU_JOBS; i++)); do SLOTS+=("cpu$i"); done
  THREADS=$(( $(nproc) / CPU_JOBS > 0 ? $(nproc) / CPU_JOBS : 1 ))
fi
declare -A STATE=() PID=() SLOT_OF=()   # STATE: pending | running | done | failed
for name in "${NAMES[@]}"; do
  if [[ -f "$OUT/$name/result.json" ]]; then STATE[$name]=done; echo "skip $name (result.json exists)"
  else STATE[$name]=pending; fi
done

pending() { local n; for n in "${NAMES[@]}"; do [[ ${STATE[$n]} == pending || ${STATE[$n]} == running ]] && return 0; done; return 1; }
free_slot() {
  local slot n busy
  for slot in "${SLOTS[@]}"; do
    busy=0
    for n in "${!SLOT_OF[@]}"; do [[ ${STATE[$n]} == running && ${SLOT_OF[$n]} == "$slot" ]] && busy=1; done
    [[ $busy == 0 ]] && { echo "$slot"; return 0; }
  done
  return 1
}

# Ctrl-C or SIGTERM: stop the running jobs too (each saves its last epoch and exits; a rerun resumes them)
stop_jobs() {
  echo "train_all.sh: stopping the running jobs (each keeps its last epoch; run the same command again to resume)" >&2
  local n
  for n in "${NAMES[@]}"; do [[ ${STATE[$n]} == running ]] && kill -TERM "${PID[$n]}" 2>/dev/null; done
  wait
  exit 130
}
trap stop_jobs INT TERM

while pending; do
  for name in "${NAMES[@]}"; do  # reap finished jobs
    if [[ ${STATE[$name]} == running ]] && ! kill -0 "${PID[$name]}" 2>/dev/null; then
      wait "${PID[$name]}" || true
      if [[ -f "$OUT/$name/result.json" ]]; then STATE[$name]=done; echo "done $name"
      else STATE[$name]=failed; echo "FAILED: $name (see $OUT/$name/stdout.log)"; fi
    fi
  done
  for name in "${NAMES[@]}"; do  # start what can start
    [[ ${STATE[$name]} == pending ]] || continue
    ready=1
    for dep in ${DEPS[$name]}; do
      case ${STATE[$dep]} in
        done) ;;
        failed) STATE[$name]=failed; echo "FAILED: $name (it needs $dep, which failed)"; ready=0; break ;;
        *) ready=0 ;;
      esac
    done
    [[ $ready == 1 ]] || continue
    slot=$(free_slot) || break
    mkdir -p "$OUT/$name"
    cmd=$(command_of "$name")
    echo "[$slot] $cmd"
    if [[ $slot == cpu* ]]; then
      OMP_NUM_THREADS=$THREADS $cmd --device cpu >> "$OUT/$name/stdout.log" 2>&1 &
    else
      CUDA_VISIBLE_DEVICES=$slot $cmd >> "$OUT/$name/stdout.log" 2>&1 &
    fi
    PID[$name]=$!; SLOT_OF[$name]=$slot; STATE[$name]=running
  done
  pending && sleep 2
done

failed=0
for name in "${NAMES[@]}"; do [[ ${STATE[$name]} == done ]] || failed=1; done
python advmoe.py report "$OUT" > /dev/null && echo "report: $OUT/report.md"

if [[ $GRID == smoke ]]; then  # the machine and the bench (training step, images/s, GFLOPs per method)
  {
    echo "machine: $(uname -m), $(nproc) cores; device: $DEVICE_NAME; $(python -c 'import torch; print("torch", torch.__version__)')"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown); date: $(date -u +%Y-%m-%dT%H:%MZ)"
  } > "$OUT/machine.txt"
  bench=(); [[ $DEVICE_NAME == cpu ]] && bench=(--width 0.25)
  python advmoe.py bench --out "$OUT/bench.json" "${bench[@]}" > "$OUT/bench.log" 2>&1 || failed=1
  if [[ $DEVICE_NAME != cpu ]]; then  # and the same with --compile: the warm-up is its first step
    python advmoe.py bench --out "$OUT/bench_compile.json" --compile "${bench[@]}" > "$OUT/bench_compile.log" 2>&1 || failed=1
  fi
  cat "$OUT/machine.txt" "$OUT/bench.log"
fi
exit $failed
