"""``lowbit-ablate``: does a component of a method act? The method against the same run with the
component switched off, seed by seed, on the held-out (1−ᾱ)-weighted ε error.

    lowbit-ablate experiment=digits/bidm --without method.tbs=false --seeds 0,1

Each run is the method's ``prepare`` on the config's model (no sampling, no metrics), measured
by :func:`lowbit.metrics.fidelity.eps_error_by_step` against the FP model on ``--n`` held-out FP
trajectories drawn from their own noise (seed 777, not a calibration seed). A variant is *worse*
than the full method when the full method's worst seed is below the variant's best by more than
``--margin`` times the larger seed spread of the two — the rule of the effect tests, which call
:func:`held_out_eps_error` too. Beside it the paired rule: the same seed shares calibration
data, initial state and batches, so a gap that holds seed by seed can hide inside the spread
between seeds; the variant is worse seed by seed when every difference is positive and their
mean exceeds twice their std.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: the paired rule: the mean per-seed difference must exceed this many times its std
PAIRED_MARGIN = 2.0
#: held-out trajectories: their own noise seed, size and number of kept steps
HELD_OUT_SEED, HELD_OUT_N, HELD_OUT_STEPS = 777, 32, 10


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``n`` torch threads inside the block (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def held_out_eps_error(overrides: Sequence[str], seed: int, output_dir: Path,
                       n: int = HELD_OUT_N, threads: int | None = 1) -> float:
    """Train the method that ``overrides`` compose (its ``prepare``, seeded with ``seed``) and
    return its (1−ᾱ)-weighted ε error against the FP model on ``n`` held-out FP trajectories.
    ``paths.cache_dir`` of the config caches the trajectories (and calibration sets)."""
    from hydra.utils import instantiate

    from lowbit.cli import compose_config
    from lowbit.data.trajectories import fp_trajectories
    from lowbit.methods import MethodContext, build_method
    from lowbit.methods.ptq import sampler_config
    from lowbit.metrics.fidelity import eps_error_by_step

    cfg = compose_config([*overrides, f"seed={seed}", "logger=none"], output_dir=output_dir)
    with torch_threads(threads):
        model = instantiate(cfg.model.loader)
        cache = Path(cfg.paths.cache_dir)
        ctx = MethodContext(cfg=cfg, output_dir=Path(output_dir), cache_dir=cache, model=model)
        held = fp_trajectories(model, sampler_config(cfg), n=n, calib_steps=HELD_OUT_STEPS,
                               seed=HELD_OUT_SEED, cache_dir=cache)
        torch.manual_seed(seed)
        student = build_method(cfg.method).prepare(model.net, ctx)
        return float(eps_error_by_step(student, model.net, held, batch_size=n)["weighted"])


@dataclass(frozen=True)
class Verdict:
    """One variant against the full method: its errors per seed and whether it is worse."""

    label: str
    errors: tuple[float, ...]
    spread: float  # the larger seed spread (max − min) of the full method and this variant
    worse: bool  # the full method's worst seed + margin · spread < this variant's best seed
    # seed by seed (same seed: same calibration data, initial state and batches): variant −
    # full, their mean and sample std — a consistent gap can hide inside the seeds' spread
    paired: tuple[float, ...]
    paired_mean: float
    paired_std: float
    # every seed's difference > 0 and their mean > PAIRED_MARGIN × their std: a one-sided
    # paired t above 2√n (3.5 at three seeds, p < 0.04 with 2 degrees of freedom)
    paired_worse: bool


def compare(full: Sequence[float], variant: Sequence[float], label: str,
            margin: float = 3.0) -> Verdict:
    """The effect tests' rule, ``max(full) + margin · spread < min(variant)``, and the
    per-seed differences."""
    spread = max(max(full) - min(full), max(variant) - min(variant))
    d = torch.tensor([v - f for f, v in zip(full, variant, strict=True)], dtype=torch.float64)
    mean, std = float(d.mean()), float(d.std()) if len(d) > 1 else 0.0
    return Verdict(label, tuple(variant), spread, max(full) + margin * spread < min(variant),
                   tuple(d.tolist()), mean, std,
                   bool((d > 0).all()) and mean > PAIRED_MARGIN * std)


def ablate_all(probe: Callable[..., float], overrides: Sequence[str],
               variants: Sequence[Sequence[str]], seeds: Sequence[int],
               margin: float = 3.0) -> tuple[list[float], list[Verdict]]:
    """``probe(seed, *overrides)`` (e.g. :func:`held_out_eps_error` bound to a folder) for the
    full run, once, and for it with each variant's overrides on top, over ``seeds``: the full
    run's errors and one :class:`Verdict` per variant."""
    full = [probe(s, *overrides) for s in seeds]
    return full, [compare(full, [probe(s, *overrides, *v) for s in seeds], ",".join(v), margin)
                  for v in variants]


def ablate(probe: Callable[..., float], overrides: Sequence[str], without: Sequence[str],
           seeds: Sequence[int], margin: float = 3.0) -> tuple[list[float], Verdict]:
    """:func:`ablate_all` for one variant, ``without``: the full run's errors and its
    :class:`Verdict`."""
    full, (verdict,) = ablate_all(probe, overrides, [without], seeds, margin)
    return full, verdict


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lowbit-ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the full method's run, e.g. "
                   "experiment=digits/binarydm")
    p.add_argument("--without", action="append", default=[], metavar="OVERRIDES",
                   help="a variant: comma-separated overrides on top (repeatable), e.g. "
                        "method.ebb=false")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--margin", type=float, default=3.0,
                   help="times the seed spread the full method must win by (default 3)")
    p.add_argument("--n", type=int, default=HELD_OUT_N, help="held-out trajectories")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", type=Path, help="also write the errors and verdicts here")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
    if len(seeds) < 2:
        p.error("--seeds: give at least two seeds (the verdict needs their spread)")
    if not a.without:
        p.error("give at least one --without variant (e.g. --without method.ebb=false)")
    from lowbit.cli import compose_config
    from lowbit.methods import build_method

    variants = {"full": []} | {w: [o for o in w.split(",") if o] for w in a.without}
    for label, ov in variants.items():  # a bad key or value fails here, before any training
        try:
            with tempfile.TemporaryDirectory(prefix="lowbit-ablate-") as tmp:
                build_method(compose_config([*a.overrides, *ov], output_dir=tmp).method)
        except Exception as e:  # noqa: BLE001 - named with the variant, before any compute
            p.error(f"{'the full run' if label == 'full' else f'--without {label}'}: {e}")
    with tempfile.TemporaryDirectory(prefix="lowbit-ablate-") as tmp:
        runs = itertools.count()

        def probe(seed: int, *ov: str) -> float:
            t0 = time.perf_counter()
            e = held_out_eps_error(list(ov), seed, Path(tmp) / f"{next(runs)}-{seed}", a.n,
                                   a.threads)
            label = ",".join(ov[len(a.overrides):]) or "full"
            print(f"{label} seed {seed}: {e:.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            return e

        full, verdicts = ablate_all(probe, a.overrides, list(variants.values())[1:], seeds,
                                    a.margin)
    print(f"\n| run | weighted ε error per seed ({a.seeds}) | worse than full "
          f"(> {a.margin:g}× spread) | minus full, seed by seed (mean ± std) | worse seed by "
          f"seed (all > 0, mean > {PAIRED_MARGIN:g}× std) |")
    print("|---|---|---|---|---|")
    print(f"| full | {' / '.join(f'{e:.5f}' for e in full)} | | | |")
    for v in verdicts:
        print(f"| {v.label} | {' / '.join(f'{e:.5f}' for e in v.errors)} | "
              f"{'yes' if v.worse else 'no'} (spread {v.spread:.5f}) | "
              f"{' / '.join(f'{e:+.5f}' for e in v.paired)} ({v.paired_mean:+.5f} ± "
              f"{v.paired_std:.5f}) | {'yes' if v.paired_worse else 'no'} |")
    if a.json:
        a.json.write_text(json.dumps({"overrides": a.overrides, "seeds": seeds, "full": full,
                                      "variants": [dataclasses.asdict(v) for v in verdicts]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
