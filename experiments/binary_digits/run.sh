#!/usr/bin/env bash
# Reproduces experiments/binary_digits: BinaryDM at W1A4 against its XNOR baseline and its
# -EBB / -LRM ablations, BiDM at W1A1 against its XNOR baseline and its -TBS / -SPD ablations,
# with the digits budgets of lowbit/conf/experiment/digits/{binarydm,bidm}.yaml (a method and its
# baseline train exactly alike); three seeds, 1,000 samples, DDIM 20, guidance 2.
# Two lanes of one-thread jobs run at once (LANES=1: one after the other); every seed of every row
# finishes before the next seed starts, so a cut-short run still has whole seeds.
# Usage: bash experiments/binary_digits/run.sh        (wall time in README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/binary_digits
common=(logger=none threads=1)
job() {  # job <row> <seed> <overrides...>
  local row=$1 seed=$2; shift 2
  lowbit -m "$@" "${common[@]}" seed="$seed" hydra.sweep.dir=$out/sweep/"$row" \
    hydra.sweep.subdir="$seed"
}
lane_a() {
  for s in ${SEEDS:-0 1 2}; do
    job bidm "$s" experiment=digits/bidm
    job bidm_no_tbs "$s" experiment=digits/bidm method.tbs=false
    job xnor_w1a1 "$s" experiment=digits/bidm method=binary_baseline
    job binarydm_no_lrm "$s" experiment=digits/binarydm method.lrm=false
  done
}
lane_b() {
  for s in ${SEEDS:-0 1 2}; do
    job bidm_no_spd "$s" experiment=digits/bidm method.spd=false
    job xnor_w1a4 "$s" experiment=digits/binarydm method=binary_baseline
    job binarydm "$s" experiment=digits/binarydm
    job binarydm_no_ebb "$s" experiment=digits/binarydm method.ebb=false
  done
}
start=$(date +%s)
export OMP_NUM_THREADS=1
if [ "${LANES:-2}" = 1 ]; then lane_a; lane_b; else lane_a & a=$!; lane_b & b=$!; wait $a; wait $b; fi
echo "wall time: $(( $(date +%s) - start )) s"
bash experiments/finish_sweep.sh $out
