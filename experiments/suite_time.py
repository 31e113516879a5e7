"""The wall time of the whole digits suite: every table's runs (every seed), from each run's
``cost.total_s`` in its results.json — what the jobs took one after the other on one CPU thread
each; ``run.sh`` scripts that run two jobs at once take about half.

    python experiments/suite_time.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the digits tables and where their runs are (the binary table's sweep/; its older folders are
# the IR-QLoRA/QALoRA recording)
TABLES = {
    "ptq_digits": "sweep",
    "quest_efficientdm_digits": "sweep",
    "binary_digits": "sweep",
    "deepcache_digits": ".",
    "rglcd_digits": "runs",
}


def main() -> None:
    rows, total, jobs = [], 0.0, 0
    for table, sub in TABLES.items():
        secs, n = 0.0, 0
        for f in sorted((HERE / table / sub).rglob("results.json")):
            r = json.loads(f.read_text())
            if r.get("status") == "done" and "total_s" in r.get("cost", {}):
                secs += float(r["cost"]["total_s"])
                n += 1
        rows.append((table, n, secs))
        total += secs
        jobs += n
    print("| table | runs | one thread, one job after another (min) |")
    print("|---|---|---|")
    for table, n, secs in rows:
        print(f"| {table} | {n} | {secs / 60:.1f} |")
    print(f"| **all** | {jobs} | {total / 60:.1f} (≈ {total / 120:.1f} on 2 cores, two jobs at "
          f"once) |")


if __name__ == "__main__":
    main()
