#!/usr/bin/env bash
# The end of every experiments/<table>/run.sh: the table of the sweep (table.md, results.csv),
# then keep only what a reader needs of each job (results.json, grid.png): samples, Hydra files,
# checkpoints, logs and saved students are dropped.
# Usage: bash experiments/finish_sweep.sh experiments/<table>
set -euo pipefail
out=$1
lowbit-report "$out/sweep" --md "$out/table.md" --csv "$out/results.csv"
find "$out/sweep" -mindepth 2 \( -name samples -o -name .hydra -o -name checkpoints \
     -o -name wandb -o -name train_logs -o -name adaround -o -name '.staging-*' \) -type d \
     -prune -exec rm -rf {} +
find "$out/sweep" -mindepth 2 \( -name '*.log' -o -name student.safetensors -o -name .lock \
     -o -name multirun.yaml -o -name attempt.json -o -name quant_map.json \) -delete
