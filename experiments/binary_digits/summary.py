"""One table of every run under experiments/binary_digits with the binary papers' cost columns
(size, OPs = BOPs/64 + FLOPs, training time), which lowbit-report's fixed cost columns do not
show. Usage: .venv/bin/python experiments/binary_digits/summary.py > experiments/binary_digits/summary.md
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["fp", "w1_weights", "w1a4_baseline", "w1a4_binarydm", "w1a1_baselines", "w1a1_bidm",
         "w1a1_bidm_spd_only", "w1a1_long", "lora_irqlora", "lora_qalora"]


def fmt(v: object, spec: str) -> str:
    return "" if v is None else format(v, spec)


def main() -> None:
    rows = [(sweep, path, json.loads(path.read_text())) for sweep in ORDER
            for path in sorted((HERE / sweep).glob("*/results.json"),
                               key=lambda p: int(p.parent.name))]
    # method=fp records no OPs: take the FP model's numbers the other runs measured as reference
    ref = next((r["cost"] for _, _, r in rows if "ops_fp" in r.get("cost", {})), {})
    print("| sweep/job | method | bits | FID | cond. acc. | size MB | size × | OPs (M) | OPs × "
          "| train s | sample s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for sweep, path, r in rows:
        m, c = r.get("metrics", {}), r.get("cost", {})
        if r["method"] == "fp":
            c = {**c, "ops": ref.get("ops_fp"), "ops_x": 1.0}
        fp_mb, ops = c.get("size_fp_mb", ref.get("size_fp_mb")), c.get("ops")
        print(f"| {sweep}/{path.parent.name} | {r['method']} | {r['bits']} "
              f"| {fmt(m.get('fid'), '.2f')} | {fmt(m.get('cond_acc'), '.3f')} "
              f"| {fmt(c.get('size_mb'), '.3f')} "
              f"| {fmt(fp_mb / c['size_mb'] if fp_mb and c.get('size_mb') else None, '.1f')} "
              f"| {fmt(ops / 1e6 if ops else None, '.2f')} | {fmt(c.get('ops_x'), '.1f')} "
              f"| {fmt(c.get('train_s', c.get('finetune_s')), '.0f')} "
              f"| {fmt(c.get('sample_s'), '.0f')} |")


if __name__ == "__main__":
    main()
