#!/usr/bin/env bash
# The IR-QLoRA vs QALoRA recording of experiments/binary_digits (lora_irqlora/, lora_qalora/):
# weight-only 4/3/2-bit LoRA fine-tuning, 100 steps, one seed, 300 samples, one thread.
# EfficientDM's QALoRA at weight-only bits has no activation quantizers, so no TALSQ.
# Usage: bash experiments/binary_digits/run_lora.sh   (~5 min)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
D=experiments/binary_digits
COMMON=(logger=none threads=1 metrics.num_samples=300)
run() { local name=$1; shift; lowbit -m "$@" "${COMMON[@]}" hydra.sweep.dir=$D/$name; }
run lora_irqlora method=irqlora bits=w4a16,w3a16,w2a16
run lora_qalora method=efficientdm bits=w4a16,w3a16,w2a16 ++method.talsq=false \
  '++method.supported_bits=[w4a16,w3a16,w2a16]'
for d in lora_irqlora lora_qalora; do
  find $D/$d -mindepth 1 \( -name samples -o -name .hydra -o -name checkpoints -o -name train_logs \) \
    -type d -prune -exec rm -rf {} +
  find $D/$d -mindepth 1 \( -name '*.log' -o -name student.safetensors -o -name .lock \
    -o -name attempt.json -o -name quant_map.json \) -delete
done
