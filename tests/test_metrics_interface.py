"""The metrics interface: suites built from the ``metrics`` config group, the digits metrics with
unchanged numbers (clean-fid is the oracle), KID, and paired fidelity to the FP model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from lowbit.config import ConfigError
from lowbit.data.datasets import DigitsDataset, PromptsDataset
from lowbit.data.digits import load_digits_tensors, save_png_folder, to_uint8
from lowbit.metrics import (
    PSNR_IDENTICAL,
    DigitsFeatureExtractor,
    DigitsMetrics,
    EpsError,
    Metric,
    MetricInputs,
    MetricSuite,
    PairedFidelity,
    build_metrics,
    psnr_from_mse,
)
from lowbit.metrics.digits import _keep_size
from lowbit.models.digits import load_digit_classifier


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """200 held-out digits with noise, as a run's samples: uint8 images, labels and PNG folder."""
    ds = DigitsDataset()
    x, y = ds.images("heldout")[:200], ds.labels("heldout")[:200]
    g = torch.Generator().manual_seed(0)
    images = to_uint8(x + 0.3 * torch.randn(x.shape, generator=g))
    folder = tmp_path_factory.mktemp("samples")
    save_png_folder(images, folder, y)
    return folder, images, y


@pytest.fixture(scope="module")
def digits_suite(tmp_path_factory):
    from lowbit.cli import compose_config

    tmp = tmp_path_factory.mktemp("cfg")
    # the sample metrics only: the ε error reads networks (tests/test_metrics_eps.py)
    cfg = compose_config([f"paths.cache_dir={tmp}", "metrics.items.eps_error=null"],
                         output_dir=tmp / "run")
    return build_metrics(cfg.metrics), instantiate(cfg.dataset)


def _ctx(samples, dataset, cache, fp_images=None):
    folder, images, labels = samples
    return MetricInputs(sample_dir=folder, images=images, conditions=labels, dataset=dataset,
                        cache_dir=cache, fp_images=fp_images)


def test_metrics_config_builds_a_suite_with_every_key(make_cfg):
    cfg = make_cfg("metrics.items.digits.kid_subsets=7", "metrics.items.digits.batch_size=64")
    suite = build_metrics(cfg.metrics)
    assert isinstance(suite, MetricSuite) and suite.name == "digits"
    assert suite.num_samples == cfg.metrics.num_samples and suite.grid_size == cfg.metrics.grid_size
    digits, fidelity = suite.items["digits"], suite.items["fidelity"]
    assert isinstance(digits, DigitsMetrics) and isinstance(fidelity, PairedFidelity)
    assert (digits.kid_subsets, digits.batch_size, digits.kid) == (7, 64, True)
    assert isinstance(suite.items["eps_error"], EpsError)
    assert suite.needs_fp_images and suite.needs_models

    no_fp = build_metrics(make_cfg("metrics.items.fidelity=null",
                                   "metrics.items.eps_error=null").metrics)
    assert list(no_fp.items) == ["digits", "reward"] and not no_fp.needs_fp_images
    assert not no_fp.needs_models

    only = build_metrics(make_cfg("metrics=fidelity").metrics)
    assert list(only.items) == ["fidelity"] and only.needs_fp_images
    assert make_cfg("metrics=fidelity").metrics.num_samples >= 1


def test_digits_metrics_fid_equals_the_previous_computation(digits_suite, samples, cache, tmp_path):
    """The numbers of ``DigitsMetrics(...)(sample_dir, reference_folder, …)`` before the interface:
    clean-fid features of the classifier on both PNG folders, the reference written the old way."""
    from cleanfid import fid

    suite, dataset = digits_suite
    folder, images, labels = samples
    old_ref = tmp_path / "digits_ref_16"
    x, y = load_digits_tensors(16)
    save_png_folder(to_uint8(x), old_ref, y)
    extractor = DigitsFeatureExtractor(load_digit_classifier()).eval()

    def feats(d):
        return fid.get_folder_features(str(d), model=extractor, num_workers=0, batch_size=256,
                                       device=torch.device("cpu"), mode="clean",
                                       custom_fn_resize=_keep_size, verbose=False)

    expected = float(fid.fid_from_feats(feats(folder), feats(old_ref)))
    with torch.no_grad():
        pred = extractor.classifier(DigitsFeatureExtractor._to_model_space(images, 16)).argmax(1)
    m = suite(_ctx(samples, dataset, cache, fp_images=images))
    assert m["fid"] == pytest.approx(expected, rel=1e-9)
    assert m["cond_acc"] == pytest.approx(float((pred == labels).float().mean()))
    assert 1.0 < m["is"] <= 10.0
    assert set(suite.items["digits"](_ctx(samples, dataset, cache))) == {
        "fid", "kid", "fid_ref", "fid_ref_n", "fid_n", "cond_acc", "is"}
    assert set(m) == {"fid", "kid", "fid_ref", "fid_ref_n", "fid_n", "cond_acc", "is",
                      "cond_agreement", "feat_dist", "feat_cos_dist", "mse", "psnr",
                      "reward_digits"}


def test_fidelity_item_needs_the_fp_samples(digits_suite, samples, cache):
    suite, dataset = digits_suite
    with pytest.raises(ValueError, match="fp_images"):
        suite(_ctx(samples, dataset, cache))


def test_kid_is_seeded_and_orders_noise(digits_suite, samples, cache, tmp_path):
    suite, dataset = digits_suite
    digits = suite.items["digits"]
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    noisy = digits(_ctx(samples, dataset, cache))
    assert np.array_equal(np.random.get_state()[1], state), "global numpy RNG left untouched"
    assert digits(_ctx(samples, dataset, cache))["kid"] == noisy["kid"]

    clean = DigitsDataset().images("heldout")[:200]
    folder = tmp_path / "clean"
    save_png_folder(to_uint8(clean), folder)
    real = digits(MetricInputs(folder, to_uint8(clean), samples[2], dataset, cache))
    assert real["kid"] < noisy["kid"] and real["fid"] < noisy["fid"]


def test_reference_stats_file_gives_the_same_numbers(digits_suite, samples, cache, tmp_path):
    suite, dataset = digits_suite
    digits = suite.items["digits"]
    ref_feats = digits.folder_features(dataset.reference(cache))
    stats = tmp_path / "ref.npz"
    np.savez(stats, feats=ref_feats)
    from_stats = DigitsDataset(reference_stats=str(stats))
    a = digits(_ctx(samples, dataset, cache))
    b = digits(_ctx(samples, from_stats, cache))
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-9) and b["kid"] == a["kid"]
    # what FID/KID were measured against, and on how many images
    assert (a["fid_ref"], a["fid_ref_n"], a["fid_n"]) == ("digits/all", 1797, 200)
    assert (b["fid_ref"], b["fid_ref_n"], b["fid_n"]) == ("digits/stats:ref.npz", 1797, 200)

    mu_sigma = tmp_path / "mu.npz"
    np.savez(mu_sigma, mu=ref_feats.mean(0), sigma=np.cov(ref_feats, rowvar=False))
    no_kid = DigitsMetrics(kid=False)
    c = no_kid(_ctx(samples, DigitsDataset(reference_stats=str(mu_sigma)), cache))
    assert c["fid"] == pytest.approx(a["fid"], rel=1e-6) and "kid" not in c
    assert "fid_ref_n" not in c and c["fid_n"] == 200  # mu/sigma do not say how many images
    with pytest.raises(ValueError, match="kid=false"):
        digits(_ctx(samples, DigitsDataset(reference_stats=str(mu_sigma)), cache))


def test_cond_agreement_with_the_fp_samples(digits_suite, samples, cache):
    suite, dataset = digits_suite
    folder, images, labels = samples
    m = suite(_ctx(samples, dataset, cache, fp_images=images))
    assert m["cond_agreement"] == 1.0 and m["mse"] == 0.0 and m["psnr"] == "inf"
    other = images[torch.roll(torch.arange(len(images)), 1)]  # neighbours: other classes mostly
    assert suite(_ctx(samples, dataset, cache, fp_images=other))["cond_agreement"] < 0.5


def test_fid_reference_split_is_recorded(samples, cache):
    held = DigitsDataset(reference_split="heldout")
    m = DigitsMetrics(kid=False)(_ctx(samples, held, cache))
    assert (m["fid_ref"], m["fid_ref_n"], m["fid_n"]) == ("digits/heldout", round(1797 * 0.2), 200)


def test_feature_distance_to_the_fp_twins(samples):
    """``feat_dist``/``feat_cos_dist``: 0 for identical images, growing with the noise added to
    the FP twins; equal to torch's pairwise L2 / cosine on the classifier's features."""
    import torch.nn.functional as F

    _, _, labels = samples
    digits = DigitsMetrics()
    fp = to_uint8(DigitsDataset().images("heldout")[:200])
    assert digits.feature_distance(fp, fp.clone()) == {"feat_dist": 0.0, "feat_cos_dist": 0.0}
    g = torch.Generator().manual_seed(0)
    x = DigitsDataset().images("heldout")[:200]
    dists = []
    for sigma in (0.05, 0.2, 0.6):
        noisy = to_uint8(x + sigma * torch.randn(x.shape, generator=g))
        dists.append(digits.feature_distance(noisy, fp))
    assert dists[0]["feat_dist"] < dists[1]["feat_dist"] < dists[2]["feat_dist"]
    assert dists[0]["feat_cos_dist"] < dists[1]["feat_cos_dist"] < dists[2]["feat_cos_dist"] < 2
    with torch.no_grad():
        a = digits.extractor(noisy).double()
        b = digits.extractor(fp).double()
    # float64 on the same features: only the summation order differs (1e-9 is far above it)
    assert dists[2]["feat_dist"] == pytest.approx(
        float(F.pairwise_distance(a, b, eps=0).mean()), rel=1e-9)
    assert dists[2]["feat_cos_dist"] == pytest.approx(
        float((1 - F.cosine_similarity(a, b, dim=1)).mean()), rel=1e-9)
    with pytest.raises(ValueError, match="same seeds"):
        digits.feature_distance(fp, fp[:3])


def test_digits_metrics_check_fails_early(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n")
    with pytest.raises(ConfigError, match="metrics"):
        DigitsMetrics().check(PromptsDataset(path=str(f)), "metrics.items.digits")
    m = DigitsMetrics()
    m.classifier_checkpoint = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="metrics.items.digits.classifier_checkpoint"):
        MetricSuite({"digits": m}).check(DigitsDataset())


# -- paired fidelity --------------------------------------------------------------------------------

def _fid_ctx(images, fp_images):
    return MetricInputs(sample_dir=None, images=images, fp_images=fp_images)


def test_fidelity_identical_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8)
    m = PairedFidelity()(_fid_ctx(x, x.clone()))
    assert m == {"mse": 0.0, "psnr": PSNR_IDENTICAL} and float(m["psnr"]) == math.inf
    assert psnr_from_mse(0.0) == math.inf  # the number; "inf" is how results.json holds it


def test_fidelity_degrades_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(30, 226, (16, 1, 16, 16), generator=g, dtype=torch.uint8)
    one_level = (x.int() + 1).to(torch.uint8)
    m = PairedFidelity()(_fid_ctx(one_level, x))
    assert m["mse"] == pytest.approx((1 / 255) ** 2)
    assert m["psnr"] == pytest.approx(20 * math.log10(255))  # 48.13 dB
    psnrs = []
    for sigma in (2.0, 8.0, 25.0):
        noisy = (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255)
        psnrs.append(PairedFidelity(prefix="fp_")(_fid_ctx(noisy.to(torch.uint8), x))["fp_psnr"])
    assert psnrs[0] > psnrs[1] > psnrs[2] > 10


def test_fidelity_rejects_unpaired_inputs():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="same seeds"):
        PairedFidelity()(_fid_ctx(x, x[:3]))
    with pytest.raises(ValueError, match="fp_images"):
        PairedFidelity()(_fid_ctx(x, None))


def test_suite_rejects_two_items_reporting_one_name():
    suite = MetricSuite({"a": PairedFidelity(), "b": PairedFidelity()})
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="metrics.items.b"):
        suite(_fid_ctx(x, x))
    with pytest.raises(TypeError, match="not a Metric"):
        MetricSuite({"a": object()})


def test_a_new_metric_slots_in_by_config(make_cfg):
    cfg = make_cfg("metrics=fidelity",
                   f"+metrics.items.mean={{_target_: {__name__}.MeanBrightness}}")
    suite = build_metrics(cfg.metrics)
    x = torch.full((2, 1, 4, 4), 51, dtype=torch.uint8)
    assert suite(_fid_ctx(x, x)) == {"mse": 0.0, "psnr": "inf", "brightness": 0.2}


class MeanBrightness(Metric):
    def __call__(self, ctx: MetricInputs) -> dict[str, float]:
        return {"brightness": float(ctx.images.double().mean()) / 255}
