"""The binary_digits table from its runs' results.json: one row per configuration, mean ± sample
std over its seeds (n given), only finished runs, then each row's values per seed; the FP row is
the FP reference of ../ptq_digits (same model, sampler, seeds and N).

    python experiments/binary_digits/summary.py > experiments/binary_digits/summary.md
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWEEP = HERE / "sweep"
FP = HERE.parent / "ptq_digits" / "sweep" / "fp"

# (row label, sweep folder): the order of the table
ROWS = [
    ("FP (../ptq_digits)", FP),
    ("W1A4 XNOR baseline", SWEEP / "xnor_w1a4"),
    ("W1A4 BinaryDM", SWEEP / "binarydm"),
    ("W1A4 BinaryDM −EBB", SWEEP / "binarydm_no_ebb"),
    ("W1A4 BinaryDM −LRM", SWEEP / "binarydm_no_lrm"),
    ("W1A1 XNOR baseline", SWEEP / "xnor_w1a1"),
    ("W1A1 BiDM", SWEEP / "bidm"),
    ("W1A1 BiDM −TBS", SWEEP / "bidm_no_tbs"),
    ("W1A1 BiDM −SPD", SWEEP / "bidm_no_spd"),
]
COLS = [("FID", "fid", 2), ("KID ×10³", "kid", 1), ("cond. acc.", "cond_acc", 3),
        ("PSNR to FP", "psnr", 2), ("feat. dist. to FP", "feat_dist", 2),
        ("ε error (1−ᾱ)-weighted", "eps_mse_weighted", 4)]


def runs(folder: Path) -> list[dict]:
    done = []
    for f in sorted(folder.glob("*/results.json")):
        r = json.loads(f.read_text())
        if r.get("status") == "done":
            done.append(r)
    return sorted(done, key=lambda r: int(r["seed"]))


def values(done: list[dict], key: str) -> list[float]:
    """``metrics[key]`` of the runs that recorded it (the FP row has no fidelity to itself)."""
    return [float(r["metrics"][key]) for r in done if r["metrics"].get(key) is not None]


def fmt(values: list[float], digits: int) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    head = ["row", "label (bits)", "n", *[c[0] for c in COLS], "size ×", "OPs ×", "fine-tune s",
            "sampling × FP"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    per_seed = []
    for name, folder in ROWS:
        done = runs(folder)
        if not done:
            continue
        r0 = done[0]
        cells = [name, f"{r0['method']} ({r0['bits']})", str(len(done))]
        for _, key, digits in COLS:
            cells.append(fmt(values(done, key), digits))
        cost = [r["cost"] for r in done]
        cells.append(fmt([c["size_x"] for c in cost if "size_x" in c], 1))
        cells.append(fmt([c["ops_x"] for c in cost if "ops_x" in c], 1))
        cells.append(fmt([c["finetune_s"] for c in cost if "finetune_s" in c], 0))
        cells.append(fmt([c["sample_x_fp"] for c in cost if "sample_x_fp" in c], 2))
        print("| " + " | ".join(cells) + " |")
        seeds = "/".join(str(r["seed"]) for r in done)
        vals = "; ".join(
            f"{label} " + "/".join(f"{v:.{digits}f}" for v in values(done, key))
            for label, key, digits in COLS[:1] + COLS[3:4] + COLS[5:] if values(done, key))
        per_seed.append(f"- {name} (seeds {seeds}): {vals}")
    print("\nPer seed:\n")
    print("\n".join(per_seed))


if __name__ == "__main__":
    main()
