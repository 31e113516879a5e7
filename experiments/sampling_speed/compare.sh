#!/usr/bin/env bash
# Quantized sampling time against FP at an earlier commit and at this checkout, row by row, one
# process at a time (the earlier commit's row, then this checkout's), one torch thread; then
# experiments/sampling_speed/{results.json,table.md}.
# Usage: bash experiments/sampling_speed/compare.sh <earlier commit>     (about 25 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
here=$(pwd); base=$1; tmp=$(mktemp -d)
git worktree add -f "$tmp/base" "$base" -q
mkdir -p "$tmp/base/experiments/sampling_speed"
cp experiments/sampling_speed/measure.py "$tmp/base/experiments/sampling_speed/"
export OMP_NUM_THREADS=1
n=$(python -c "import sys; sys.path.insert(0, 'experiments/sampling_speed'); import measure; print(len(measure.ROWS))")
for ((r = 0; r < n; r++)); do
  (cd "$tmp/base" && PYTHONPATH="$tmp/base" python experiments/sampling_speed/measure.py \
     --rows $r --repeats 2 --out "$tmp/before/$r")
  python experiments/sampling_speed/measure.py --rows $r --repeats 2 --out "$tmp/after/$r"
done
python experiments/sampling_speed/measure.py --combine "$tmp/before" "$tmp/after" --out "$here/experiments/sampling_speed"
git worktree remove --force "$tmp/base"
