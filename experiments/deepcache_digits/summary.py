"""The compact table of experiments/deepcache_digits/README.md from its sweep (mean ± sample std
over the seeds): `.venv/bin/python experiments/deepcache_digits/summary.py`."""

from __future__ import annotations

import math
from pathlib import Path

from lowbit.plots import load_sweep

COLS = [("fid", "FID ↓", 2), ("kid", "KID ↓", 1), ("cond_acc", "cond. acc.", 3),
        ("psnr", "PSNR to FP ↑", 2), ("feat_dist", "feat_dist ↓", 2), ("flops_x", "MACs ×", 2),
        ("cache_speedup", "speed-up ×", 2), ("sample_x_fp", "time / FP", 2)]


def cell(row, col: str, digits: int) -> str:
    v = row.get(col)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, str):
        return v
    s = row.get(f"{col}_std")
    std = "" if s is None or (isinstance(s, float) and math.isnan(s)) or math.isinf(v) \
        else f" ± {s:.{digits}f}"
    return f"{v:.{digits}f}{std}"


def main() -> None:
    df = load_sweep(Path(__file__).parent / "sweep")
    df["cache"] = df["cache"].fillna("none")
    df = df.sort_values(["method", "bits", "cache"], key=lambda c: c.astype(str))
    print("| method | bits | cache | n | " + " | ".join(h for _, h, _ in COLS) + " |")
    print("|---|---|---|---|" + "---|" * len(COLS))
    for _, r in df.iterrows():
        print(f"| {r['method']} | {r['bits']} | {r['cache']} | {r['n']} | "
              + " | ".join(cell(r, c, d) for c, _, d in COLS) + " |")


if __name__ == "__main__":
    main()
