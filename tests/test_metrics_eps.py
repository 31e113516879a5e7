"""ε error per timestep on held-out FP trajectories (lowbit.metrics.fidelity): the plain mean is
the t = 0 step's, the (1−ᾱ)-weighted summary is not; the ``eps_error`` metric records both."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from lowbit.cli import compose_config
from lowbit.config import ConfigError
from lowbit.data.datasets import DigitsDataset
from lowbit.data.trajectories import TrajectorySet, fp_trajectories
from lowbit.metrics import EpsError, MetricInputs, MetricSuite, eps_error_by_step, eps_mse
from lowbit.models.digits import load_digits_model
from lowbit.quant import QuantConfig, calibrate_, quantize_
from lowbit.sampling import SamplerConfig

STEPS = 10
SAMPLER = SamplerConfig(kind="ddim", steps=STEPS, guidance_scale=2.0, batch_size=64)


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory):
    """The digits model, a naive W4A4 PTQ student calibrated on 16 FP trajectories, and 16
    held-out trajectories of another seed (10 kept steps of DDIM-10)."""
    cache = tmp_path_factory.mktemp("cache")
    loaded = load_digits_model()
    calib = fp_trajectories(loaded, SAMPLER, n=16, calib_steps=STEPS, seed=1, cache_dir=cache)
    held = fp_trajectories(loaded, SAMPLER, n=16, calib_steps=STEPS, seed=2, cache_dir=cache)
    student = copy.deepcopy(loaded.net)
    quantize_(student, QuantConfig.from_dict(dict(compose_config(["bits=w4a4"]).bits)))
    calibrate_(student, calib.batches(32))
    return loaded, student.eval(), held, cache


def test_weighted_summary_is_not_dominated_by_one_step(w4a4):
    """The plain ε mean of a W4A4 PTQ student is, as documented, dominated by the t = 0 step (more
    than half the sum; measured 70 %), which barely changes the image; in the (1−ᾱ)-weighted
    summary no step holds more than twice its uniform share 1/S (measured at most 14 %)."""
    loaded, student, held, _ = w4a4
    r = eps_error_by_step(student, loaded.net, held, batch_size=32)
    print("t      ", r["timesteps"])
    print("share  ", [f"{x:.3f}" for x in r["share"]])
    print("w-share", [f"{x:.3f}" for x in r["weighted_share"]])
    assert r["timesteps"] == sorted(r["timesteps"], reverse=True) and r["timesteps"][-1] == 0
    assert len(r["mse"]) == len(r["share"]) == len(r["weighted_share"]) == STEPS
    # shares are fractions of one sum (float64 sums of STEPS terms: 1e-12 is rounding only)
    assert sum(r["share"]) == pytest.approx(1, abs=1e-12)
    assert sum(r["weighted_share"]) == pytest.approx(1, abs=1e-12)
    assert r["share"][-1] > 0.5, r["share"]  # the plain mean is the t = 0 step's
    assert max(r["weighted_share"]) < 2 / STEPS, r["weighted_share"]
    # the weights are 1−ᾱ_t: ~0 at t = 0, ~1 at the noisiest step
    assert r["weights"][-1] < 1e-3 < 0.9 < r["weights"][0] <= 1
    assert r["weighted"] == pytest.approx(
        sum(w * m for w, m in zip(r["weights"], r["mse"], strict=True)) / sum(r["weights"]))
    assert r["weighted"] < r["mean"]


def test_mean_is_the_plain_eps_mse_and_zero_for_the_teacher(w4a4):
    loaded, student, held, _ = w4a4
    two = TrajectorySet(held.xt[-2:, :2], held.timesteps[-2:], held.cond[:2],
                        held.guidance_scale, held.denoiser)  # two steps of two samples
    r = eps_error_by_step(student, loaded.net, two, batch_size=2)
    # every step holds the same number of values, so the mean over steps is the mean over all
    # inputs (float64 sums in another order: 1e-9 is far above the rounding)
    assert r["mean"] == pytest.approx(eps_mse(student, loaded.net, two, 2), rel=1e-9)
    r = eps_error_by_step(loaded.net, loaded.net, two, batch_size=2)
    assert r["mse"] == [0.0, 0.0] and r["weighted"] == 0.0 and r["share"] == [0.0, 0.0]


def _ctx(loaded, student, cache, seed=0):
    return MetricInputs(sample_dir=None, images=torch.zeros(1, 1, 16, 16, dtype=torch.uint8),
                        dataset=DigitsDataset(), cache_dir=cache, model=loaded, student=student,
                        sampler=SAMPLER, seed=seed)


def test_eps_error_metric_records_the_summaries(w4a4):
    loaded, student, _, cache = w4a4
    metric = EpsError(n=4, steps=3, batch_size=4, per_step=True)
    m = metric(_ctx(loaded, student, cache))
    per_step = {k: v for k, v in m.items() if k.startswith("eps_mse_t")}
    assert len(per_step) == 3 and "eps_mse_t0" in per_step
    assert 0 < m["eps_mse_weighted"] < m["eps_mse"]
    assert m["eps_mse"] == pytest.approx(sum(per_step.values()) / 3, rel=1e-9)
    # its trajectories are a seed stream of their own, cached: the same numbers on a re-run
    assert metric(_ctx(loaded, student, cache)) == m
    assert metric(_ctx(loaded, student, cache, seed=1))["eps_mse"] != m["eps_mse"]
    # an FP run: the student is the teacher, 0 without computing
    assert EpsError()(_ctx(loaded, loaded.net, None)) == {"eps_mse": 0.0, "eps_mse_weighted": 0.0}


def test_eps_error_needs_the_networks_and_checks_its_keys():
    suite = MetricSuite({"eps_error": EpsError()})
    with pytest.raises(ValueError, match="metrics.items.eps_error needs the networks"):
        suite(MetricInputs(sample_dir=None, images=torch.zeros(1, 1, 4, 4, dtype=torch.uint8)))
    with pytest.raises(ConfigError, match=r"metrics.items.eps_error.n=0.*eps_error=null"):
        MetricSuite({"eps_error": EpsError(n=0)}).check(None)
    with pytest.raises(ConfigError, match="metrics.items.eps_error.per_step"):
        MetricSuite({"eps_error": EpsError(per_step="yes")}).check(None)


def test_config_option_builds_and_checks(make_cfg):
    from lowbit.metrics import build_metrics

    suite = build_metrics(make_cfg("metrics.items.eps_error.steps=4",
                                   "metrics.items.eps_error.per_step=true").metrics)
    assert (suite.items["eps_error"].steps, suite.items["eps_error"].per_step) == (4, True)
    with pytest.raises(ConfigError, match="metrics.items.eps_error.batch_size"):
        build_metrics(make_cfg("metrics.items.eps_error.batch_size=-1").metrics).check(None)


# -- recorded by a run ------------------------------------------------------------------------------
TINY = ("threads=1", "metrics.num_samples=20", "sampler.steps=3", "logger=none",
        "metrics.items.eps_error.n=4")


def test_runs_record_fidelity_eps_error_and_the_fid_reference(make_cfg, tmp_path):
    """An FP run records its own fidelity row in a form a table shows (psnr "inf", distances 0);
    a W4A4 PTQ run records positive distances and ε errors; both name FID/KID's reference set."""
    from lowbit.pipeline import run_experiment

    fp = run_experiment(make_cfg(*TINY, output_dir=tmp_path / "fp"))
    on_disk = json.loads((tmp_path / "fp" / "results.json").read_text())["metrics"]
    assert on_disk == fp["metrics"]
    assert on_disk["psnr"] == "inf" and float(on_disk["psnr"]) == math.inf
    assert on_disk["mse"] == on_disk["feat_dist"] == on_disk["feat_cos_dist"] == 0.0
    assert on_disk["eps_mse"] == on_disk["eps_mse_weighted"] == 0.0
    assert on_disk["fid_ref"] == "digits/all" and on_disk["fid_ref_n"] == 1797
    assert on_disk["fid_n"] == 20 and on_disk["kid"] is not None

    q = run_experiment(make_cfg(*TINY, "method=ptq", "bits=w4a4", "method.calib_n=4",
                                "method.calib_steps=2", "method.calib_batch_size=4",
                                "dataset.reference_split=heldout",
                                output_dir=tmp_path / "ptq"))["metrics"]
    assert isinstance(q["psnr"], float) and q["mse"] > 0
    assert q["feat_dist"] > 0 and 0 < q["feat_cos_dist"] <= 2
    assert q["eps_mse"] > 0 and q["eps_mse_weighted"] > 0
    assert q["fid_ref"] == "digits/heldout" and q["fid_ref_n"] == round(1797 * 0.2)
    assert Path(tmp_path / "ptq" / "results.json").is_file()
