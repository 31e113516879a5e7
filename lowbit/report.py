"""``lowbit-report <sweep dir>``: the jobs' results.json files as one markdown table and a CSV."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from lowbit.rundir import RESULTS

# leading columns, in this order; metrics and costs follow
ID_COLS = ["job", "model", "method", "bits", "dataset", "sampler", "status"]
COST_COLS = ["size_mb", "size_x", "ops", "ops_x", "calib_s", "finetune_s", "train_s", "sample_s",
             "total_s", "peak_mem_mb",
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
            rows.append({"job": job, **_row(json.loads(path.read_text(errors="replace")))})
        except (OSError, ValueError, TypeError, AttributeError) as e:
            rows.append({"job": job, "status": "unreadable",
                         "error": f"{path.name}: {type(e).__name__}: {e}"[:300]})
    # the FP baseline is the first row of every table, as in the papers
    return sorted(rows, key=lambda r: r.get("method") != "fp")


def _row(res: object) -> dict:
    if not isinstance(res, dict):
        raise TypeError(f"a JSON {type(res).__name__}, not an object")
    metrics, cost = res.get("metrics") or {}, res.get("cost") or {}
    if not isinstance(metrics, dict) or not isinstance(cost, dict):
        raise TypeError(f"'metrics' and 'cost' must be objects (got {type(metrics).__name__}, "
                        f"{type(cost).__name__})")
    row = {k: _cell(res.get(k)) for k in ID_COLS[1:]}
    row["sampler"] = _sampler(res)
    if res.get("error"):
        row["error"] = str(res["error"])[:300]
    row.update({k: _cell(v) for k, v in metrics.items()})
    row.update({k: _cell(v) for k, v in cost.items() if k in COST_COLS})
    return row


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


def columns(rows: list[dict]) -> list[str]:
    metric_cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in ID_COLS and k not in COST_COLS and k != "error" and k not in metric_cols:
                metric_cols.append(k)
    present = {k for r in rows for k in r}
    return ([c for c in ID_COLS if c in present] + metric_cols
            + [c for c in COST_COLS if c in present] + (["error"] if "error" in present else []))


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], cols: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit-report", description=__doc__)
    p.add_argument("sweep_dir", type=Path, help="a multirun folder (or any folder of runs)")
    p.add_argument("--csv", type=Path, default=None, help="CSV path (default <sweep_dir>/results.csv)")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
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
    cols = columns(rows)
    table = to_markdown(rows, cols)
    print(table)
    write_csv(rows, cols, args.csv or args.sweep_dir / "results.csv")
    if args.md:
        args.md.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
