"""The rglcd_digits table from its runs' results.json: one row per configuration, mean ± sample
std over its seeds (n given), only finished runs.

    python experiments/rglcd_digits/summary.py > experiments/rglcd_digits/summary.md
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "runs"

# (row label, run-folder prefix): the order of the table
ROWS = [
    ("teacher DDIM-20 (CFG 2)", "teacher_ddim20"),
    ("LCD (β = 0), LCM-4", "lcd_lcm4"),
    ("LCD (β = 0), LCM-2", "lcd_lcm2"),
    ("RG-LCD β = 0.02, LCM-4", "rglcd_b0.02_lcm4"),
    ("RG-LCD β = 0.05, LCM-4", "rglcd_b0.05_lcm4"),
    ("RG-LCD β = 0.2, LCM-4", "rglcd_b0.2_lcm4"),
    ("RG-LCD β = 0.02, LCM-2", "rglcd_b0.02_lcm2"),
    ("RG-LCD β = 0.05, LCM-2", "rglcd_b0.05_lcm2"),
    ("RG-LCD β = 0.05, LCM-4, W8A8 student", "rglcd_w8a8_lcm4"),
]


def _calls(r: dict) -> int:
    """Network evaluations per sample: steps × 2 with classifier-free guidance (the teacher),
    steps for a w-embedding student (one conditional call per step)."""
    steps = int(r["config"]["sampler"]["steps"])
    return steps * (1 if r["config"]["method"]["name"] == "rglcd" else 2)


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return ""
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    cols = [("FID", "fid", 2), ("KID ×10³", "kid", 1), ("cond. acc.", "cond_acc", 3),
            ("reward (log p)", "reward_digits", 4), ("PSNR to teacher", "psnr", 2),
            ("feat. dist. to teacher", "feat_dist", 2)]
    head = ["row", "n", *[c[0] for c in cols], "calls / sample", "fine-tune s", "sampling s",
            "time / teacher"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, prefix in ROWS:
        done = []
        for d in sorted(RUNS.glob(f"{prefix}_s*")):
            f = d / "results.json"
            if f.is_file():
                r = json.loads(f.read_text())
                if r.get("status") == "done":
                    done.append(r)
        if not done:
            continue
        cells = [label, str(len(done))]
        for _, key, digits in cols:
            vals = [float(r["metrics"][key]) for r in done if key in r["metrics"]]
            vals = [v for v in vals if math.isfinite(v)]
            cells.append(_fmt(vals, digits) if vals else "–")
        cells.append(str(_calls(done[0])))
        cells.append(_fmt([r["cost"]["finetune_s"] for r in done if "finetune_s" in r["cost"]], 0)
                     or "–")
        cells.append(_fmt([r["cost"]["sample_s"] for r in done], 1))
        cells.append(_fmt([r["cost"]["sample_x_fp"] for r in done if "sample_x_fp" in r["cost"]],
                          3) or "1")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
