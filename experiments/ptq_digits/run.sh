#!/usr/bin/env bash
# Reproduces experiments/ptq_digits: FP, naive PTQ and Q-Diffusion (AdaRound) PTQ on digits.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/ptq_digits
common="logger=none threads=${THREADS:-1}"
lowbit $common hydra.run.dir=$out/sweep/fp
lowbit -m method=ptq bits=w8a8,w4a8,w4a4,w2a8,w4a4_tensor $common hydra.sweep.dir=$out/sweep/naive
lowbit -m method=ptq method.recon=adaround method.adaround.iters=${ADAROUND_ITERS:-200} \
  bits=w8a8,w4a8,w4a4,w4a4_tensor,w2a8 $common hydra.sweep.dir=$out/sweep/adaround
lowbit-report $out/sweep --md $out/table.md --csv $out/results.csv
