"""``lowbit-report <sweep dir>``: the jobs' results.json files as one markdown table and a CSV;
``--plot`` adds the sweep's figures as PNG files (:mod:`lowbit.plots`), ``--wandb-project`` logs
them with the table to W&B.

Jobs whose configs differ only in ``seed`` are one row: every metric and cost column is the mean
over the seeds with its sample standard deviation (``12.3 ± 0.4`` in the table; ``fid`` and
``fid_std`` in the CSV), ``n`` is the number of seeds and ``seed`` lists them. ``--per-seed``
keeps one row per job. Only finished jobs (``status`` done) are averaged; failed or unreadable
ones keep their own row, with their error.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from lowbit.rundir import RESULTS, fingerprint, result_config

# leading columns, in this order; metrics and costs follow
ID_COLS = ["job", "model", "method", "bits", "dataset", "sampler", "cache", "status", "seed", "n"]
#: a row's key for the jobs it may be averaged with (not a column)
GROUP_KEY = "_group"
COST_COLS = ["size_mb", "size_x", "ops", "ops_x", "flops_x", "cache_speedup", "calib_s",
             "finetune_s", "train_s", "sample_s", "sample_x_fp", "total_s", "peak_mem_mb",
             "trainable_params"]


def collect(sweep_dir: Path) -> list[dict]:
    """One row per results.json under ``sweep_dir`` (jobs of a multirun, or single runs). A file
    that cannot be read as a lowbit result gives a row whose ``error`` says why; it never stops
    the report."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob(RESULTS), key=_job_key):
        if any(part.startswith(".") for part in path.relative_to(sweep_dir).parts[:-1]):
            continue  # staging folders and failed attempts are not results
        job = _job_name(path, sweep_dir)
        try:
            res = json.loads(path.read_text(errors="replace"))
            rows.append({"job": job, **result_row(res)})
        except (OSError, ValueError, TypeError, AttributeError) as e:
            rows.append({"job": job, "status": "unreadable",
                         "error": f"{path.name}: {type(e).__name__}: {e}"[:300]})
    # the FP baseline is the first row of every table, as in the papers
    return sorted(rows, key=lambda r: r.get("method") != "fp")


def result_row(res: object) -> dict:
    """One results.json (a dict) as a report row: its identity, metrics and cost columns."""
    if not isinstance(res, dict):
        raise TypeError(f"a JSON {type(res).__name__}, not an object")
    metrics, cost = res.get("metrics") or {}, res.get("cost") or {}
    if not isinstance(metrics, dict) or not isinstance(cost, dict):
        raise TypeError(f"'metrics' and 'cost' must be objects (got {type(metrics).__name__}, "
                        f"{type(cost).__name__})")
    row = {k: _cell(res.get(k)) for k in ID_COLS[1:-1]}
    row["sampler"] = _sampler(res)
    row[GROUP_KEY] = _group(res)
    if res.get("error"):
        row["error"] = str(res["error"])[:300]
    row.update({k: _cell(v) for k, v in metrics.items()})
    row.update({k: _cell(v) for k, v in cost.items() if k in COST_COLS})
    return row


def _group(res: dict) -> str | None:
    """The fingerprint of the job's config without its seed (what shapes its results besides
    the seed), or None when the file has no config: such a row is never averaged."""
    config = res.get("config")
    if not isinstance(config, dict):
        return None
    c = {k: v for k, v in result_config(config).items() if k != "seed"}
    return fingerprint(c)


def _cell(v: object) -> object:
    return v if v is None or isinstance(v, (int, float, str)) else json.dumps(v)[:80]


def _sampler(res: dict) -> object:
    """The effective sampler (``ddim5`` for a ``ddim20`` preset run at 5 steps)."""
    sampler = (res.get("config") or {}).get("sampler") if isinstance(res.get("config"), dict) \
        else None
    if isinstance(sampler, dict) and "kind" in sampler and "steps" in sampler:
        return f"{sampler['kind']}{sampler['steps']}"
    return _cell(res.get("sampler"))


def _job_name(path: Path, root: Path) -> str:
    rel = path.parent.relative_to(root)
    return str(rel) if str(rel) != "." else path.parent.name


def _job_key(path: Path) -> tuple:
    # numeric job subdirs (0, 1, …, 10) sort as numbers
    parts = path.parent.parts
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


# -- seeds ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeanStd:
    """A column's value over the seeds of a row: mean and sample standard deviation (``ddof=1``;
    0 when every seed gave the same value, also ``inf``; NaN from one value) of the ``n`` seeds
    that recorded it, out of the row's ``of``."""

    mean: float
    std: float
    n: int
    of: int

    def __str__(self) -> str:
        std = "n/a" if math.isnan(self.std) else _num(self.std)
        return f"{_num(self.mean)} ± {std}" + (f" ({self.n} of {self.of})"
                                               if self.n < self.of else "")


def _number(v: object) -> float | None:
    """``v`` as a float when it is a number (``"inf"`` of identical images included)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "-inf", "nan"):
        return float(v)
    return None


def _combine(values: list[object]) -> object:
    """One cell for the values of a column over the seeds of a row."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    nums = [_number(v) for v in present]
    if all(x is not None for x in nums):
        same = all(x == nums[0] for x in nums)
        # stdev(inf, inf) is NaN, yet seeds that agree have none
        std = (math.nan if len(nums) == 1 else 0.0 if same else statistics.stdev(nums))
        return MeanStd(statistics.fmean(nums), std, len(nums), len(values))
    distinct = list(dict.fromkeys(str(v) for v in present))
    return present[0] if len(distinct) == 1 else ",".join(distinct)


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows of finished jobs whose configs differ only in ``seed`` as one row (see the module
    docstring); other rows unchanged with ``n`` = 1. Order: the first job of each row."""
    groups: dict[str, list[dict]] = {}
    out: list[list[dict]] = []
    for r in rows:
        key = r.get(GROUP_KEY)
        if key is None or r.get("status") != "done":
            out.append([r])
        elif key in groups:
            groups[key].append(r)
        else:
            groups[key] = [r]
            out.append(groups[key])
    merged = []
    for members in out:
        if len(members) == 1:
            merged.append({**members[0], "n": 1})
            continue
        keys = list(dict.fromkeys(k for r in members for k in r))
        row = {k: _combine([r.get(k) for r in members]) for k in keys
               if k not in ("job", "seed", "n")}
        row["job"] = ",".join(str(r.get("job")) for r in members)
        row["seed"] = ",".join(str(r.get("seed")) for r in members)
        row["n"] = len(members)
        merged.append(row)
    return merged


# -- output -----------------------------------------------------------------------------------------
def columns(rows: list[dict]) -> list[str]:
    metric_cols: list[str] = []
    for r in rows:
        for k in r:
            if (k not in ID_COLS and k not in COST_COLS and k != "error" and not k.startswith("_")
                    and k not in metric_cols):
                metric_cols.append(k)
    present = {k for r in rows for k in r}
    return ([c for c in ID_COLS if c in present] + metric_cols
            + [c for c in COST_COLS if c in present] + (["error"] if "error" in present else []))


def _num(v: float) -> str:
    return "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:.4g}"


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return _num(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], cols: list[str], path: Path) -> None:
    """The table as CSV: a column averaged over seeds is its mean, followed by ``<col>_std``."""
    averaged = {c for r in rows for c, v in r.items() if isinstance(v, MeanStd)}
    fields = [x for c in cols for x in ((c, f"{c}_std") if c in averaged else (c,))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            flat = {}
            for c in cols:
                v = r.get(c)
                if isinstance(v, MeanStd):
                    flat[c], flat[f"{c}_std"] = v.mean, v.std
                else:
                    flat[c] = v
            w.writerow(flat)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit-report", description=__doc__)
    p.add_argument("sweep_dir", type=Path, help="a multirun folder (or any folder of runs)")
    p.add_argument("--csv", type=Path, default=None, help="CSV path (default <sweep_dir>/results.csv)")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--per-seed", action="store_true",
                   help="one row per job instead of one per config (mean ± std over its seeds)")
    p.add_argument("--plot", action="store_true",
                   help="also write the sweep's figures (metric against bits, cost against "
                        "metric with the Pareto front, speed-up against metric, sample grids)")
    p.add_argument("--plot-dir", type=Path, default=None,
                   help="where the figures go (default <sweep_dir>/plots)")
    p.add_argument("--wandb-project", default=None,
                   help="log the table (and the figures with --plot) to this W&B project; "
                        "offline unless WANDB_MODE says otherwise")
    args = p.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"lowbit-report: {args.sweep_dir} is not a folder; pass the sweep's output folder "
              f"(logs/<task>/multiruns/<time>)", file=sys.stderr)
        return 2
    rows = collect(args.sweep_dir)
    if not rows:
        print(f"lowbit-report: no results.json under {args.sweep_dir}; did the jobs finish?",
              file=sys.stderr)
        return 1
    if not args.per_seed:
        rows = aggregate(rows)
    cols = columns(rows)
    table = to_markdown(rows, cols)
    print(table)
    write_csv(rows, cols, args.csv or args.sweep_dir / "results.csv")
    if args.md:
        args.md.write_text(table + "\n")
    figures = []
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")  # files only
        from lowbit.plots import plot_sweep

        figures = plot_sweep(args.sweep_dir, args.plot_dir)
        print(f"\n{len(figures)} figures in {args.plot_dir or args.sweep_dir / 'plots'}")
    if args.wandb_project:
        _log_wandb(args.wandb_project, args.sweep_dir, rows, cols, figures)
    return 0


def _log_wandb(project: str, sweep_dir: Path, rows: list[dict], cols: list[str],
               figures: list[Path]) -> None:
    """One W&B run for the report: the table and the figures (offline by default)."""
    import os

    from lowbit.tracking import WandbRun

    run = WandbRun(True, project=project, name=f"report-{Path(sweep_dir).name}",
                   job_type="report", mode=os.environ.get("WANDB_MODE", "offline"),
                   dir=str(sweep_dir))
    if run.run is None:
        return
    import wandb

    data = [[str(r.get(c)) if isinstance(r.get(c), MeanStd) else r.get(c) for c in cols]
            for r in rows]
    run.log({"report": wandb.Table(columns=cols, data=data),
             **{f"plots/{p.stem}": wandb.Image(str(p)) for p in figures}})
    run.finish()


if __name__ == "__main__":
    sys.exit(main())
