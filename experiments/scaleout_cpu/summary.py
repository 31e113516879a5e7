"""The scaling table of experiments/scaleout_cpu from its runs' results.json."""

import json
from pathlib import Path

runs = Path(__file__).parent / "runs"
rows = ["| job | processes | sampling s | fine-tune s | total s | FID | PSNR to FP |",
        "|---|---|---|---|---|---|---|"]
for job in ("sample_fp", "efficientdm_w4a4", "efficientdm_w4a4_b128"):
    for p in (1, 2):
        f = runs / f"{job}_p{p}" / "results.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        c, m = r["cost"], r["metrics"]
        ft = c.get("finetune_s")
        rows.append(f"| {job} | {c['processes']} | {c['sample_s']:.1f} | "
                    f"{'' if ft is None else f'{ft:.1f}'} | {c['total_s']:.1f} | "
                    f"{m['fid']:.3f} | {m['psnr']} |")
table = "\n".join(rows)
print(table)
(Path(__file__).parent / "table.md").write_text(table + "\n")
