#!/usr/bin/env bash
# The binary_digits tables: every run through the real CLI, one thread, same training steps
# for a method and its baselines. Usage: bash experiments/binary_digits/run.sh [part ...]
# parts: fp w1 w1a4 w1a1 bidm lora long (default: all but long). ~30 min on one CPU thread
# (long: ~10 min more).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
D=experiments/binary_digits
COMMON=(logger=none threads=1 metrics.num_samples=300)
# ++: a multirun composes its base config with the default method first (Hydra), where these
# keys do not exist yet
QAT=(++method.steps=100 ++method.batch_size=32)
run() { local name=$1; shift; .venv/bin/lowbit -m "$@" "${COMMON[@]}" hydra.sweep.dir=$D/$name; }
parts=("${@:-fp w1 w1a4 w1a1 bidm lora}")
for part in ${parts[@]}; do
  case $part in
    fp)   run fp method=fp bits=fp ;;
    w1)   run w1_weights bits=w1a32,w1a8 method=binary_baseline,binarydm "${QAT[@]}" ;;
    w1a4) run w1a4_baseline bits=w1a4 method=binary_baseline "${QAT[@]}"
          run w1a4_binarydm bits=w1a4 method=binarydm method.ebb=false,true \
              method.lrm=false,true "${QAT[@]}" ;;
    w1a1) run w1a1_baselines bits=w1a1 method=binary_baseline method.variant=xnor,react "${QAT[@]}" ;;
    bidm) run w1a1_bidm bits=w1a1 method=bidm method.tbs=true method.spd=true,false "${QAT[@]}"
          run w1a1_bidm_spd_only bits=w1a1 method=bidm method.tbs=false method.spd=true "${QAT[@]}" ;;
    # W1A1 collapses for every method at 100 steps: the same pair trained 6x longer
    long) LONG=(++method.steps=600 ++method.batch_size=32)
          run w1a1_long bits=w1a1 method=binary_baseline,bidm "${LONG[@]}" ;;
    # EfficientDM's QALoRA at weight-only bits: no activation quantizers, so no TALSQ
    lora) run lora_irqlora method=irqlora bits=w4a16,w3a16,w2a16
          run lora_qalora method=efficientdm bits=w4a16,w3a16,w2a16 ++method.talsq=false \
              '++method.supported_bits=[w4a16,w3a16,w2a16]' ;;
  esac
done
# keep results.json, grid.png and the Hydra config; drop samples, checkpoints, saved students
find $D -mindepth 2 \( -name samples -o -name checkpoints -o -name train_logs \) -type d -prune -exec rm -rf {} +
find $D -mindepth 2 -name student.safetensors -delete
