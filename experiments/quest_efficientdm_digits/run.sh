#!/usr/bin/env bash
# The sweep of this folder: FP, PTQ, QuEST (+ TLA/CMA ablation), EfficientDM and full QAT on the
# digits model, one thread, 500 samples per run. Run from the repository root:
#   bash experiments/quest_efficientdm_digits/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1
SWEEP=experiments/quest_efficientdm_digits/sweep
COMMON=(logger=none threads=1 hydra.sweep.dir=$SWEEP)
# Fine-tuning budget of digits (~30-60 s per run on one CPU thread, instead of the papers'
# thousands of GPU iterations); learning rates raised to match (see README.md).
QUEST=(method.tla.steps=30 method.cma.steps=40
       method.tla.lr=1e-3 method.tla.act_lr=1e-4 method.cma.lr=3e-4 method.cma.act_lr=1e-4)
EDM=(method.steps=60 method.lora_lr_div=100 method.act_lr=1e-4)
QAT=(method.steps=60 method.weight_lr=1e-4 method.act_lr=1e-4)

lowbit -m method=fp bits=fp "${COMMON[@]}" 'hydra.sweep.subdir=fp-${hydra.job.num}'
lowbit -m method=ptq bits=w8a8,w4a8,w4a4,w2a8 "${COMMON[@]}" 'hydra.sweep.subdir=ptq-${hydra.job.num}'
lowbit -m method=quest bits=w8a8,w4a8,w4a4 "${QUEST[@]}" "${COMMON[@]}" 'hydra.sweep.subdir=quest-${hydra.job.num}'
# QuEST Table 6: TLA only, CMA only (TLA+CMA is quest-2 above)
lowbit -m method=quest bits=w4a4 'method.stages=[tla],[cma]' "${QUEST[@]}" "${COMMON[@]}" 'hydra.sweep.subdir=quest_ablation-${hydra.job.num}'
lowbit -m method=efficientdm bits=w8a8,w4a8,w4a4,w2a8 "${EDM[@]}" "${COMMON[@]}" 'hydra.sweep.subdir=efficientdm-${hydra.job.num}'
lowbit -m method=qat bits=w8a8,w4a8,w4a4 "${QAT[@]}" "${COMMON[@]}" 'hydra.sweep.subdir=qat-${hydra.job.num}'

lowbit-report $SWEEP --md experiments/quest_efficientdm_digits/table.md
# keep results.json, grid.png and the Hydra configs; drop the bulky per-run files
find $SWEEP -mindepth 2 -maxdepth 2 \( -name samples -o -name checkpoints -o -name wandb \
     -o -name train_logs -o -name student.safetensors \) -exec rm -rf {} +
