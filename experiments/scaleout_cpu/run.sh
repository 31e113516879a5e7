#!/usr/bin/env bash
# Reproduces experiments/scaleout_cpu: one job as 1 and as 2 processes on this 2-core machine
# (trainer=ddp, gloo), one thread each. Sampling: the FP digits model, 1,000 samples in batches
# of 64 (DDIM 20). Fine-tune: EfficientDM W4A4 with its digits budget (60 steps, batch 16).
# finetune_b128: the same at batch 128, 20 steps (steps that are compute-bound, not latency-bound).
# Usage: bash experiments/scaleout_cpu/run.sh [sample] [finetune] [finetune_b128]  (sample and
# finetune by default; the table is written by summary.py at the end)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/scaleout_cpu/runs
export OMP_NUM_THREADS=1
common=(logger=none threads=1 time_vs_fp=false)
parts=${*:-sample finetune}
for world in 1 2; do
  ddp=()
  [[ $world == 2 ]] && ddp=(trainer=ddp trainer.accelerator=cpu trainer.devices=2)
  if [[ $parts == *sample* ]]; then
    lowbit "${common[@]}" "${ddp[@]}" method=fp metrics.num_samples=1000 sampler.batch_size=64 \
      force=true hydra.run.dir=$out/sample_fp_p$world
  fi
  if [[ " $parts " == *" finetune "* ]]; then
    lowbit "${common[@]}" "${ddp[@]}" experiment=digits/efficientdm bits=w4a4 \
      metrics.num_samples=128 force=true hydra.run.dir=$out/efficientdm_w4a4_p$world
  fi
  if [[ $parts == *finetune_b128* ]]; then  # 8x the batch, 20 steps: compute-bound steps
    lowbit "${common[@]}" "${ddp[@]}" experiment=digits/efficientdm bits=w4a4 \
      method.batch_size=128 method.steps=20 metrics.num_samples=128 force=true \
      hydra.run.dir=$out/efficientdm_w4a4_b128_p$world
  fi
done
python experiments/scaleout_cpu/summary.py
