#!/usr/bin/env bash
# Reproduces experiments/ptq_digits: the papers' naive PTQ (every layer at the bits, min-max
# ranges, per-tensor activations, skip-conv split only) against FP on the digits model, three
# seeds each at 1,000 samples, DDIM 20, guidance 2.
# Usage: bash experiments/ptq_digits/run.sh   (one CPU thread per job; wall times in README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/ptq_digits
common=(logger=none threads=${THREADS:-1} metrics.num_samples=1000 seed=0,1,2)
start=$(date +%s)
lowbit -m method=fp "${common[@]}" hydra.sweep.dir=$out/sweep/fp
lowbit -m method=ptq bits=w8a8 "${common[@]}" hydra.sweep.dir=$out/sweep/naive
lowbit -m method=ptq bits=w4a4 "${common[@]}" hydra.sweep.dir=$out/sweep/naive_w4a4
echo "wall time: $(( $(date +%s) - start )) s"
bash experiments/finish_sweep.sh $out
