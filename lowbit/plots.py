"""Figures of a sweep: what ``lowbit-report --plot`` writes and the notebooks show.

A sweep folder (``lowbit -m ...``'s output, or any folder of runs) becomes a pandas DataFrame with
:func:`load_sweep`: one row per configuration, every numeric column averaged over its seeds with
``<col>_std`` beside it (the same grouping as ``lowbit-report``), plus the weight/activation bit
widths parsed from the ``bits`` preset; :func:`load_wandb_project` reads the same from W&B. The plotting functions take that frame:

- :func:`plot_metric_vs_bits`: a metric against the bit width, one line per method, seed error bars;
- :func:`plot_pareto`: a cost (model size, OPs, sampling time over FP, ...) against a metric, the
  Pareto front of the configurations that no other beats on both;
- :func:`plot_speed_quality`: sampling speed-up against a metric (caching, few-step samplers);
- :func:`grids_side_by_side`: the sample grids of one seed across the sweep's configurations,
  upscaled with nearest-neighbour so 16×16 digits are readable.

:func:`plot_sweep` writes every figure that the sweep's columns allow as PNG files.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from lowbit.report import MeanStd, aggregate, collect, result_row
from lowbit.rundir import GRID
from lowbit.tracking import upscale_nearest

#: metrics where lower is better (the rest: higher is better)
LOWER_IS_BETTER = {"fid", "kid", "sfid", "mse", "eps_mse", "eps_mse_weighted", "feat_dist",
                   "feat_cos_dist", "lpips"}
_BITS = re.compile(r"^w(\d+)a(\d+)")


def bit_widths(bits: object) -> tuple[float, float]:
    """``w4a8`` → (4, 8); ``fp`` → (32, 32); a preset with a suffix (``w4a4_pchan``) keeps its
    numbers; anything else → (nan, nan)."""
    if bits == "fp":
        return 32.0, 32.0
    m = _BITS.match(str(bits))
    return (float(m.group(1)), float(m.group(2))) if m else (math.nan, math.nan)


def load_sweep(sweep_dir: str | Path, per_seed: bool = False) -> pd.DataFrame:
    """The sweep's results as a DataFrame (see the module docstring). ``per_seed``: one row per
    job instead of one per configuration. Raises FileNotFoundError naming the folder when it holds
    no results.json."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no results.json under {sweep_dir}: pass a sweep's output "
                                f"folder (hydra.sweep.dir) whose jobs have finished")
    df = _frame(rows, per_seed)
    df.attrs["sweep_dir"] = str(sweep_dir)
    return df


def load_wandb_project(project: str, entity: str | None = None, per_seed: bool = False,
                       api: object | None = None) -> pd.DataFrame:
    """The runs of a W&B project (needs the network and a login) as :func:`load_sweep`'s
    columns: each run's summary holds its ``metrics/*`` and ``cost/*`` and its identity (model,
    method, bits, sampler, cache, status); its config is the run's resolved config, which groups
    the seeds. ``api``: a ``wandb.Api()`` (default: a new one)."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    rows = []
    for run in api.runs(path):
        summary = dict(run.summary)
        if "status" not in summary:
            continue  # not a lowbit job (e.g. a report run)
        res = {k: summary.get(k) for k in ("model", "method", "bits", "dataset", "sampler",
                                           "cache", "status", "seed")}
        res["metrics"] = {k.split("/", 1)[1]: v for k, v in summary.items()
                          if k.startswith("metrics/")}
        res["cost"] = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("cost/")}
        res["config"] = dict(run.config)
        rows.append({"job": run.name, **result_row(res)})
    if not rows:
        raise FileNotFoundError(f"no lowbit runs in the W&B project {path}")
    df = _frame(rows, per_seed)
    df.attrs["wandb_project"] = path
    return df


def _frame(rows: list[dict], per_seed: bool) -> pd.DataFrame:
    if not per_seed:
        rows = aggregate(rows)
    flat = []
    for r in rows:
        d: dict = {}
        for k, v in r.items():
            if k.startswith("_"):
                continue
            if isinstance(v, MeanStd):
                d[k], d[f"{k}_std"] = v.mean, v.std
            else:
                d[k] = v
        d["w_bits"], d["a_bits"] = bit_widths(d.get("bits"))
        flat.append(d)
    return pd.DataFrame(flat)


def label(row: pd.Series) -> str:
    """A configuration's name in legends: method label, bits, and the cache when there is one."""
    parts = [str(row.get("method")), str(row.get("bits"))]
    cache = row.get("cache")
    if isinstance(cache, str) and cache not in ("none", ""):
        parts.append(cache)
    return " ".join(parts)


def _done(df: pd.DataFrame, *cols: str) -> pd.DataFrame:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"the sweep has no column {', '.join(missing)}; columns: "
                       f"{', '.join(map(str, df.columns))}")
    ok = df if "status" not in df.columns else df[df["status"] == "done"]
    return ok.dropna(subset=list(cols))


def _err(df: pd.DataFrame, col: str) -> np.ndarray | None:
    std = f"{col}_std"
    if std not in df.columns:
        return None
    e = pd.to_numeric(df[std], errors="coerce").to_numpy(dtype=float)
    return np.where(np.isfinite(e), e, 0.0)


def plot_metric_vs_bits(df: pd.DataFrame, metric: str = "fid", ax=None):
    """``metric`` against the weight bit width (activation bits in the point labels), one line per
    method, with the standard deviation over seeds as error bars; FP at 32 bits as a dashed line."""
    data = _done(df, metric, "w_bits")
    fig, ax = _axes(ax)
    fp = data[data["bits"] == "fp"]
    q = data[data["bits"] != "fp"].copy()
    # one line per method and quantizer options (the bits label after its wXaY, e.g. +mse-w)
    q["_series"] = [f"{m}{_BITS.sub('', str(b))}" for m, b in zip(q["method"], q["bits"],
                                                                   strict=True)]
    for series, g in q.groupby("_series", sort=False):
        g = g.sort_values(["w_bits", "a_bits"])
        x = np.arange(len(g)) if g["w_bits"].isna().all() else g["w_bits"].to_numpy()
        ax.errorbar(x, g[metric].astype(float), yerr=_err(g, metric), marker="o", capsize=3,
                    label=str(series))
        for xi, yi, b in zip(x, g[metric].astype(float), g["bits"], strict=True):
            ax.annotate(str(b), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if len(fp):
        y = float(fp[metric].astype(float).mean())
        ax.axhline(y, ls="--", color="gray", label=f"FP ({_fmt(y)})")
    ax.set_xlabel("weight bits")
    ax.set_ylabel(metric + _direction(metric))
    ax.set_xscale("log", base=2)
    ticks = sorted(set(q["w_bits"].dropna()))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} against bits (mean ± std over seeds)")
    return fig


def pareto_front(cost: Sequence[float], quality: Sequence[float],
                 lower_is_better: bool = True) -> list[int]:
    """Indices of the points that no other point beats on both lower ``cost`` and better
    ``quality`` (ties kept), ordered by cost."""
    c = np.asarray(cost, dtype=float)
    q = np.asarray(quality, dtype=float) * (1 if lower_is_better else -1)
    keep = []
    for i in range(len(c)):
        dominated = np.any((c <= c[i]) & (q <= q[i]) & ((c < c[i]) | (q < q[i])))
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (c[i], q[i]))


def plot_pareto(df: pd.DataFrame, cost: str = "size_mb", metric: str = "fid", ax=None):
    """``cost`` (x) against ``metric`` (y) for every configuration, labelled, with the Pareto front
    of the configurations that no other beats on both."""
    data = _done(df, cost, metric).reset_index(drop=True)
    fig, ax = _axes(ax)
    x, y = data[cost].astype(float).to_numpy(), data[metric].astype(float).to_numpy()
    ax.errorbar(x, y, yerr=_err(data, metric), xerr=_err(data, cost), fmt="o", capsize=3)
    for i, row in data.iterrows():
        ax.annotate(label(row), (x[i], y[i]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    front = pareto_front(x, y, metric in LOWER_IS_BETTER)
    ax.plot(x[front], y[front], "-o", color="C3", mfc="none", ms=11, label="Pareto front")
    ax.set_xlabel(cost)
    ax.set_ylabel(metric + _direction(metric))
    if np.all(x > 0) and x.max() / max(x.min(), 1e-12) > 20:
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"{cost} against {metric}")
    return fig


def plot_speed_quality(df: pd.DataFrame, speed: str = "cache_speedup", metric: str = "fid",
                       ax=None):
    """Speed-up (x, higher is faster) against ``metric``; the Pareto front of the configurations
    that no other beats on both. Rows without a speed value (e.g. the uncached baseline) sit at
    1×."""
    data = df.copy()
    if speed not in data.columns:
        raise KeyError(f"the sweep has no column {speed}")
    data[speed] = pd.to_numeric(data[speed], errors="coerce").fillna(1.0)
    data = _done(data, speed, metric).reset_index(drop=True)
    fig, ax = _axes(ax)
    x, y = data[speed].to_numpy(dtype=float), data[metric].astype(float).to_numpy()
    ax.errorbar(x, y, yerr=_err(data, metric), xerr=_err(data, speed), fmt="o", capsize=3)
    for i, row in data.iterrows():
        ax.annotate(label(row), (x[i], y[i]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    front = pareto_front(-x, y, metric in LOWER_IS_BETTER)
    ax.plot(x[front], y[front], "-o", color="C3", mfc="none", ms=11, label="Pareto front")
    ax.set_xlabel(f"{speed} (×, higher is faster)")
    ax.set_ylabel(metric + _direction(metric))
    ax.legend(fontsize=8)
    ax.set_title(f"speed against {metric}")
    return fig


def grids_side_by_side(df: pd.DataFrame, seed: int | None = None, max_cols: int = 4,
                       min_tile: int = 48, image_size: int | None = None):
    """The ``grid.png`` of each configuration at one seed (default: the smallest one present), in
    the frame's order, upscaled with nearest-neighbour (``image_size``: the side of one sample in
    the grid, for the factor; default the grid's smaller side / 10)."""
    sweep = Path(df.attrs.get("sweep_dir", "."))
    panels = []
    for _, row in df.iterrows():
        jobs = str(row.get("job", "")).split(",")
        seeds = [s.strip() for s in str(row.get("seed", "")).split(",")]
        pick = 0
        if seed is not None and str(seed) in seeds:
            pick = seeds.index(str(seed))
        elif seed is not None:
            continue
        path = sweep / jobs[min(pick, len(jobs) - 1)] / GRID
        if path.is_file():
            panels.append((f"{label(row)} (seed {seeds[min(pick, len(seeds) - 1)]})", path))
    if not panels:
        raise FileNotFoundError(f"no {GRID} of the selected runs under {sweep}")
    cols = min(max_cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, path) in zip(axes.flat, panels, strict=False):
        img = np.asarray(Image.open(path).convert("RGB"))
        tile = image_size or max(1, min(img.shape[:2]) // 10)
        ax.imshow(upscale_nearest(img, min_tile, tile), interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None,
               metrics: Sequence[str] = ("fid", "kid", "psnr"),
               costs: Sequence[str] = ("size_mb", "ops", "sample_x_fp")) -> list[Path]:
    """Every figure the sweep's columns allow, as PNG files in ``out_dir`` (default
    ``<sweep_dir>/plots``): metric against bits when the sweep has quantized runs at more than
    one bit width or method, cost against metric with the Pareto front, speed-up against metric
    when runs were cached, the grids of the first seed side by side. Returns the files written."""
    df = load_sweep(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    have = [m for m in metrics if m in df.columns and df[m].notna().any()]
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    quantized = df[df.get("bits", pd.Series(dtype=str)) != "fp"]
    for m in have:
        if len(quantized) and quantized["w_bits"].notna().any():
            save(plot_metric_vs_bits(df, m), f"{m}_vs_bits")
        for c in costs:
            if c in df.columns and df[c].notna().sum() >= 2:
                save(plot_pareto(df, c, m), f"{c}_vs_{m}")
        if "cache_speedup" in df.columns and df["cache_speedup"].notna().any():
            save(plot_speed_quality(df, "cache_speedup", m), f"speedup_vs_{m}")
    with contextlib.suppress(FileNotFoundError):  # results without their grid.png
        save(grids_side_by_side(df), "grids")
    return written


def _axes(ax):
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        return fig, ax
    return ax.figure, ax


def _direction(metric: str) -> str:
    return " (lower is better)" if metric in LOWER_IS_BETTER else ""


def _fmt(v: float) -> str:
    return f"{v:.4g}"
