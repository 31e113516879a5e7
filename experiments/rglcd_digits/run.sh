#!/usr/bin/env bash
# Reproduces experiments/rglcd_digits: teacher DDIM-20, LCD (β = 0) 4-step,
# RG-LCD 4-step at β 0.05 and 0.2 and 2-step at β 0.05, RG-LCD 4-step W8A8 (β 0.05); three seeds,
# 1,000 samples each.
# Training settings: conf/experiment/digits/rglcd.yaml. The reward is the digits *reward*
# classifier; FID/KID/cond. acc. come from the evaluation classifier (metrics=digits), reward_digits
# from the reward classifier, paired fidelity against the teacher's DDIM-20 samples.
# Usage: JOBS=2 [PARTS="teacher lcd rglcd w8a8"] bash experiments/rglcd_digits/run.sh
#   (a finished run is skipped, a failed one resumes: re-running completes the table)
#   one thread per job; JOBS jobs at once; wall time printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/rglcd_digits
seeds=(0 1 2)
# β > 0 sampled at 4 steps, and the ones also sampled at 2 steps (each row trains its own
# student: the run folder holds one sampler's results)
betas4=(0.05 0.2)
betas2=(0.05)
common=(logger=none threads=1 metrics.num_samples=1000)
start=$(date +%s)
export OMP_NUM_THREADS=1

pool() {  # run the given commands (one per line on stdin) at most $JOBS at once
  xargs -d '\n' -P "${JOBS:-1}" -I{} bash -c '{}'
}
for part in ${PARTS:-teacher lcd rglcd w8a8}; do
  for s in "${seeds[@]}"; do
    case $part in
      teacher)
        echo "lowbit ${common[*]} seed=$s method=fp sampler=ddim20 hydra.run.dir=$out/runs/teacher_ddim20_s$s" ;;
      lcd)  # β = 0: plain LCD; sampled at 4 steps (and 2 for the table's 2-step row)
        for n in 2 4; do
          echo "lowbit experiment=digits/rglcd ${common[*]} seed=$s method.beta=0 sampler=lcm$n hydra.run.dir=$out/runs/lcd_lcm${n}_s$s"
        done ;;
      rglcd)
        for b in "${betas4[@]}"; do
          echo "lowbit experiment=digits/rglcd ${common[*]} seed=$s method.beta=$b sampler=lcm4 hydra.run.dir=$out/runs/rglcd_b${b}_lcm4_s$s"
        done
        for b in "${betas2[@]}"; do
          echo "lowbit experiment=digits/rglcd ${common[*]} seed=$s method.beta=$b sampler=lcm2 hydra.run.dir=$out/runs/rglcd_b${b}_lcm2_s$s"
        done ;;
      w8a8)
        echo "lowbit experiment=digits/rglcd ${common[*]} seed=$s bits=w8a8 sampler=lcm4 hydra.run.dir=$out/runs/rglcd_w8a8_lcm4_s$s" ;;
    esac
  done
done | pool  # one pool for every part: no idle slot at a part's tail
echo "wall time: $(( $(date +%s) - start )) s"
lowbit-report "$out/runs" --md "$out/table.md" --csv "$out/table.csv"
