#!/usr/bin/env bash
# Reproduces experiments/quest_efficientdm_digits: at deployable W4A4 (per-tensor activations),
# the PTQ start of the fine-tuning methods (the methods' quantizer rules: MSE ranges, 8-bit
# input/output layers and time embedding), QuEST (+ its TLA-only ablation), EfficientDM and full
# QAT, with the digits budgets of conf/experiment/digits/*.yaml; three seeds, 1,000 samples.
# Usage: bash experiments/quest_efficientdm_digits/run.sh   (one CPU thread; wall time in README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/quest_efficientdm_digits
common=(logger=none threads=${THREADS:-1} metrics.num_samples=1000 bits=w4a4 seed=0,1,2)
start=$(date +%s)
lowbit -m method=ptq "${common[@]}" hydra.sweep.dir=$out/sweep/ptq \
  'method.bits_rules={weight: {init: mse}, act: {init: mse}, first_last_bits: 8, time_emb_bits: 8}'
# the PTQ start of EfficientDM and QAT: the same rules with residual skip and downsample convs FP
lowbit -m method=ptq "${common[@]}" hydra.sweep.dir=$out/sweep/ptq_fpskip \
  'method.bits_rules={weight: {init: mse}, act: {init: mse}, first_last_bits: 8, time_emb_bits: 8, skip_fp: true}'
lowbit -m experiment=digits/quest "${common[@]}" hydra.sweep.dir=$out/sweep/quest
lowbit -m experiment=digits/efficientdm "${common[@]}" hydra.sweep.dir=$out/sweep/efficientdm
lowbit -m experiment=digits/qat "${common[@]}" hydra.sweep.dir=$out/sweep/qat
lowbit -m experiment=digits/quest 'method.stages=[tla]' "${common[@]}" \
  hydra.sweep.dir=$out/sweep/quest_tla
# QuEST from the same start as EfficientDM and QAT (skip and downsample convs FP)
lowbit -m experiment=digits/quest +method.bits_rules.skip_fp=true "${common[@]}" \
  hydra.sweep.dir=$out/sweep/quest_fpskip
# EfficientDM at W2A8 (the benchmark's 1.5x-FP target), same digits budget and rules
lowbit -m experiment=digits/efficientdm logger=none threads=${THREADS:-1} \
  metrics.num_samples=1000 bits=w2a8 seed=0,1,2 hydra.sweep.dir=$out/sweep/efficientdm_w2a8
echo "wall time: $(( $(date +%s) - start )) s"
bash experiments/finish_sweep.sh $out
