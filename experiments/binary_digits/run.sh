#!/usr/bin/env bash
# Reproduces experiments/binary_digits: BinaryDM at W1A4 against its XNOR baseline and its
# -EBB / -LRM ablations, BiDM at W1A1 against its XNOR baseline and its -TBS / -SPD ablations,
# with the digits budgets of lowbit/conf/experiment/digits/{binarydm,bidm}.yaml (a method and its
# baseline train exactly alike); three seeds, 1,000 samples, DDIM 20, guidance 2.
# Two lanes of one-thread jobs run at once (LANES=1: one after the other). Seeds 0 and 1 of every
# row come first, then seed 2 of the methods and baselines, then seed 2 of the ablations. A job
# whose results.json is done is skipped, an interrupted one continues from its checkpoint (a
# plain re-run resumes), so the script can be stopped and started again.
# Usage: bash experiments/binary_digits/run.sh        (wall time in README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/binary_digits
common=(logger=none threads=1)
job() {  # job <row> <seed> <overrides...>
  local row=$1 seed=$2; shift 2
  if grep -qs '"status": "done"' "$out/sweep/$row/$seed/results.json"; then return 0; fi
  lowbit -m "$@" "${common[@]}" seed="$seed" hydra.sweep.dir=$out/sweep/"$row" \
    hydra.sweep.subdir="$seed"
}
bidm() { job bidm "$1" experiment=digits/bidm; }
bidm_no_tbs() { job bidm_no_tbs "$1" experiment=digits/bidm method.tbs=false; }
bidm_no_spd() { job bidm_no_spd "$1" experiment=digits/bidm method.spd=false; }
xnor_w1a1() { job xnor_w1a1 "$1" experiment=digits/bidm method=binary_baseline; }
binarydm() { job binarydm "$1" experiment=digits/binarydm; }
binarydm_no_ebb() { job binarydm_no_ebb "$1" experiment=digits/binarydm method.ebb=false; }
binarydm_no_lrm() { job binarydm_no_lrm "$1" experiment=digits/binarydm method.lrm=false; }
xnor_w1a4() { job xnor_w1a4 "$1" experiment=digits/binarydm method=binary_baseline; }
# the two lanes take about the same time per seed
lane_a() {
  for s in 0 1; do bidm $s; bidm_no_tbs $s; xnor_w1a4 $s; binarydm_no_lrm $s; done
  bidm 2; xnor_w1a4 2; bidm_no_tbs 2; binarydm_no_lrm 2
}
lane_b() {
  for s in 0 1; do bidm_no_spd $s; xnor_w1a1 $s; binarydm $s; binarydm_no_ebb $s; done
  xnor_w1a1 2; binarydm 2; bidm_no_spd 2; binarydm_no_ebb 2
}
start=$(date +%s)
export OMP_NUM_THREADS=1
if [ "${LANES:-2}" = 1 ]; then lane_a; lane_b; else lane_a & a=$!; lane_b & b=$!; wait $a; wait $b; fi
echo "wall time: $(( $(date +%s) - start )) s"
bash experiments/finish_sweep.sh $out
