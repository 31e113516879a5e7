"""Quantized sampling time against FP for the quantized rows of the digits tables, measured the
way a run measures ``cost.sample_x_fp`` (:func:`lowbit.pipeline._time_vs_fp`: a batch of 64,
DDIM 20 with guidance 2, the FP model and the student alternately on the same seed, the fastest
of each kept), here with more repeats and one torch thread as the tables' jobs ran.

Sampling time does not depend on the trained values, so each method trains a token budget here
(``method.steps=2``, small calibration sets): the student has the table row's layers, quantizers
and extras, not its weights.

    python experiments/sampling_speed/measure.py [--repeats 3] [--out experiments/sampling_speed]
    bash experiments/sampling_speed/compare.sh <earlier commit>   # both, row by row: the table
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PTQ_RULES = ("method.bits_rules={weight: {init: mse}, act: {init: mse}, first_last_bits: 8, "
             "time_emb_bits: 8}")
# (table, row, overrides): the rows of the tables' run.sh, with a token training budget
ROWS = [
    ("ptq_digits", "naive W8A8", ["method=ptq", "bits=w8a8", "method.calib_n=32"]),
    ("ptq_digits", "naive W4A4", ["method=ptq", "bits=w4a4", "method.calib_n=32"]),
    ("quest_efficientdm_digits", "PTQ W4A4 (MSE, 8-bit first/last)",
     ["method=ptq", "bits=w4a4", "method.calib_n=32", PTQ_RULES]),
    ("quest_efficientdm_digits", "QuEST W4A4",
     ["experiment=digits/quest", "bits=w4a4", "method.calib_n=32", "method.tla.steps=2",
      "method.cma.steps=2"]),
    ("quest_efficientdm_digits", "EfficientDM W4A4",
     ["experiment=digits/efficientdm", "bits=w4a4", "method.calib_n=32", "method.steps=2"]),
    ("quest_efficientdm_digits", "QAT W4A4",
     ["experiment=digits/qat", "bits=w4a4", "method.calib_n=32", "method.steps=2"]),
    ("binary_digits", "XNOR W1A4",
     ["experiment=digits/binarydm", "method=binary_baseline", "method.steps=2"]),
    ("binary_digits", "BinaryDM W1A4", ["experiment=digits/binarydm", "method.steps=2"]),
    ("binary_digits", "XNOR W1A1",
     ["experiment=digits/bidm", "method=binary_baseline", "method.steps=2"]),
    ("binary_digits", "BiDM W1A1", ["experiment=digits/bidm", "method.steps=2"]),
]


def measure(overrides: list[str], repeats: int) -> dict:
    from hydra.utils import instantiate

    from lowbit.cli import compose_config
    from lowbit.methods import MethodContext, build_method
    from lowbit.pipeline import _time_vs_fp, reference_sampler
    from lowbit.sampling import SamplerConfig

    with tempfile.TemporaryDirectory(prefix="lowbit-speed-") as tmp:
        cfg = compose_config([*overrides, "logger=none", f"paths.cache_dir={tmp}/cache"],
                             output_dir=Path(tmp) / "run")
        model = instantiate(cfg.model.loader)
        ctx = MethodContext(cfg=cfg, output_dir=Path(tmp) / "run", cache_dir=Path(tmp) / "cache",
                            model=model)
        student = build_method(cfg.method).prepare(model.net, ctx).eval()
        sampler = SamplerConfig.from_cfg(cfg.sampler)
        n = 64
        cond = model.make_cond(None, n)
        runs = [_time_vs_fp(model, model.net, student, None, sampler, cond, n, 0,
                            reference_sampler(cfg)) for _ in range(repeats)]
    fp = min(r["sample_batch_fp_s"] for r in runs)
    q = min(r["sample_batch_s"] for r in runs)
    return {"overrides": overrides, "sample_batch_fp_s": fp, "sample_batch_s": q,
            "sample_x_fp": q / fp, "sample_x_fp_per_repeat": [r["sample_x_fp"] for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="times _time_vs_fp runs per row")
    p.add_argument("--out", type=Path, default=HERE, help="folder of results.json and table.md")
    p.add_argument("--rows", default="", help="comma-separated row numbers (default: all)")
    p.add_argument("--combine", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                   help="only write the table of two folders of per-row results (compare.sh)")
    a = p.parse_args()
    if a.combine:
        combine(*a.combine, a.out)
        return
    torch.set_num_threads(1)
    pick = {int(i) for i in a.rows.split(",") if i} or set(range(len(ROWS)))
    rows = []
    start = time.perf_counter()
    for i, (table, row, ov) in enumerate(ROWS):
        if i not in pick:
            continue
        r = {"table": table, "row": row, **measure(ov, a.repeats)}
        rows.append(r)
        print(f"{table:26s} {row:36s} FP {r['sample_batch_fp_s']:6.2f} s  quantized "
              f"{r['sample_batch_s']:6.2f} s  ×{r['sample_x_fp']:.2f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=HERE).stdout.strip()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({
        "commit": commit, "torch": torch.__version__, "machine": platform.processor()
        or platform.machine(), "threads": 1, "batch": 64, "repeats": a.repeats,
        "wall_s": time.perf_counter() - start, "rows": rows}, indent=1))
    lines = ["| table | row | FP batch (s) | quantized batch (s) | × FP |", "|---|---|---|---|---|"]
    lines += [f"| {r['table']} | {r['row']} | {r['sample_batch_fp_s']:.2f} | "
              f"{r['sample_batch_s']:.2f} | {r['sample_x_fp']:.2f} |" for r in rows]
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def combine(before: Path, after: Path, out: Path) -> None:
    """results.json and table.md of ``compare.sh``: per row, the earlier commit and this one."""
    def load(folder: Path) -> tuple[str, list[dict]]:
        runs = [json.loads(f.read_text()) for f in sorted(folder.glob("*/results.json"),
                                                          key=lambda f: int(f.parent.name))]
        return runs[0]["commit"], [r for run in runs for r in run["rows"]]

    (cb, rb), (ca, ra) = load(before), load(after)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "torch": torch.__version__, "threads": 1, "batch": 64, "repeats": 2,
        "before": {"commit": cb, "rows": rb}, "after": {"commit": ca, "rows": ra}}, indent=1))
    lines = [f"| table | row | FP batch (s) {cb} | quantized (s) {cb} | × FP {cb} | "
             f"FP batch (s) {ca} | quantized (s) {ca} | × FP {ca} |",
             "|---|---|---|---|---|---|---|---|"]
    for b, a in zip(rb, ra, strict=True):
        lines.append(f"| {a['table']} | {a['row']} | {b['sample_batch_fp_s']:.2f} | "
                     f"{b['sample_batch_s']:.2f} | {b['sample_x_fp']:.2f} | "
                     f"{a['sample_batch_fp_s']:.2f} | {a['sample_batch_s']:.2f} | "
                     f"**{a['sample_x_fp']:.2f}** |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
