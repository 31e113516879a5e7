#!/usr/bin/env bash
# Reproduces experiments/deepcache_digits: DeepCache on the FP digits model over
# N in {2, 3, 5} x uniform/non-uniform x branch 1/2 (conf/experiment/digits/deepcache.yaml), the
# FP model without cache, and a quantized student (naive W8A8 PTQ, W4A4 QuEST) without and with
# the cache; three seeds, 1,000 samples, DDIM 20, guidance 2.
# Usage: JOBS=2 bash experiments/deepcache_digits/run.sh [fp] [ptq] [quest]
#   one thread per job; JOBS sweeps at once (one per seed); wall time printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=experiments/deepcache_digits
seeds=(0 1 2)
common=(logger=none threads=1 metrics.num_samples=1000)
# the quantized rows: the best FP setting of the grid (see README.md)
best=(cache=deepcache cache.interval=5 cache.schedule=uniform cache.branch=1)
start=$(date +%s)
export OMP_NUM_THREADS=1

pool() {  # run the given commands (one per line on stdin) at most $JOBS at once
  xargs -d '\n' -P "${JOBS:-1}" -I{} bash -c '{}'
}
for part in ${@:-fp ptq quest}; do
  case $part in
    fp)
      for s in "${seeds[@]}"; do
        echo "lowbit -m ${common[*]} seed=$s method=fp cache=none hydra.sweep.dir=$out/sweep/fp_nocache_s$s"
        echo "lowbit -m experiment=digits/deepcache ${common[*]} seed=$s hydra.sweep.dir=$out/sweep/fp_deepcache_s$s"
      done | pool ;;
    ptq|quest)  # the quantized student without and with the best FP setting
      for s in "${seeds[@]}"; do
        for c in "cache=none" "${best[*]}"; do
          tag=$([[ $c == cache=none ]] && echo nocache || echo deepcache)
          if [[ $part == ptq ]]; then
            echo "lowbit -m method=ptq bits=w8a8 $c ${common[*]} seed=$s hydra.sweep.dir=$out/sweep/ptq_w8a8_${tag}_s$s"
          else
            echo "lowbit -m experiment=digits/quest bits=w4a4 $c ${common[*]} seed=$s hydra.sweep.dir=$out/sweep/quest_w4a4_${tag}_s$s"
          fi
        done
      done | pool ;;
  esac
done
echo "wall time: $(( $(date +%s) - start )) s"
bash experiments/finish_sweep.sh $out
