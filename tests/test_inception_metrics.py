"""The Inception metrics (``metrics=inception``): FID, sFID, IS, precision/recall and KID from
one pass of torch-fidelity's InceptionV3, checked against their definitions and against the
implementations of torch-fidelity and clean-fid; both resize modes; the reference layouts (image
folder with its feature cache, clean-fid statistics, ADM reference batches); errors that name
their key; and one run end to end.

The network carries random weights in torch-fidelity's format (the real file is a download, and
tests never download): a few small images at 299×299 keep the module within seconds."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from lowbit.config import ConfigError
from lowbit.data.datasets import DigitsDataset, ImageFolderDataset, PromptsDataset, save_png
from lowbit.metrics import InceptionMetrics, MetricInputs, MetricSuite, build_metrics
from lowbit.metrics import inception as inc

pytestmark = pytest.mark.usefixtures("omp_threads")

N = 6  # images per set: more than pr_k = 3 neighbours, few enough for the CPU
KEY = "metrics.items.inception"


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """Random weights as torch-fidelity's state dict, named as its file in torch hub's
    checkpoints folder. Each convolution keeps only its centre tap (He-scaled): the network's
    receptive field then comes from its pooling and strides alone, as local as a random network
    gets — with full random kernels every deep unit reacts to every edge in its large receptive
    field, so pool3 would not be the nearly arrangement-blind average it is with trained weights.
    BN running statistics and affine parameters are randomised a little."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict"):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                kh, kw = m.weight.shape[-2:]
                m.weight.zero_()
                m.weight[:, :, kh // 2, kw // 2] = (torch.randn(m.weight.shape[:2], generator=g)
                                                    * math.sqrt(2 / m.in_channels))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        net.fc.weight.normal_(0, 2048 ** -0.5, generator=g)
        net.fc.bias.normal_(0, 0.1, generator=g)
    path = tmp_path_factory.mktemp("hub") / "checkpoints" / inc.WEIGHTS_FILE
    path.parent.mkdir()
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def make_metric(weights_file):
    """InceptionMetrics on the random weights (CPU, small batches); the 95 MB file is loaded once
    per module and shared by every metric built here."""
    network = inc.load_inception(weights_file)

    def make(**options) -> InceptionMetrics:
        m = InceptionMetrics(**{"weights": str(weights_file), "device": "cpu", "batch_size": 8,
                                "is_splits": 3, **options})
        m._network = network
        return m

    return make


def colour_tiles(n: int, seed: int, grid: int = 4, size: int = 64) -> torch.Tensor:
    """uint8 images of grid×grid flat tiles of random colours."""
    colours = torch.randint(28, 228, (n, 3, grid, grid),
                            generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    b = size // grid
    return colours.repeat_interleave(b, 2).repeat_interleave(b, 3)


def shuffle_blocks(x: torch.Tensor, grid: int = 4, seed: int = 1) -> torch.Tensor:
    """The images with their grid×grid blocks permuted (one permutation for all)."""
    n, c, h, _ = x.shape
    b = h // grid
    blocks = x.unfold(2, b, b).unfold(3, b, b).reshape(n, c, grid * grid, b, b)
    perm = torch.randperm(grid * grid, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(perm, torch.arange(grid * grid))
    blocks = blocks[:, :, perm].reshape(n, c, grid, grid, b, b)
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, grid * b, grid * b)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    x = colour_tiles(N, seed=0)
    return {"x": x, "y": colour_tiles(N, seed=1), "shuffled": shuffle_blocks(x)}


@pytest.fixture(scope="module")
def feats(make_metric, images) -> dict[str, dict[str, np.ndarray]]:
    m = make_metric()
    return {name: m.image_features(x) for name, x in images.items()}


def _as_reference(f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"pool3": f["pool3"], "spatial": f["spatial"]}


def _fd_error_bound(d: int, norm1: float, norm2: float) -> float:
    """How far clean-fid's Fréchet distance of d-dimensional statistics with covariance norms
    ‖Σ₁‖, ‖Σ₂‖ may be off: each of the d computed eigenvalues of Σ₁Σ₂ is off by at most
    ~ε‖Σ₁‖‖Σ₂‖ (float64 ε), so each of their square roots by ≤ √(ε‖Σ₁‖‖Σ₂‖) (the zero ones of
    few-image covariances are the worst), and tr (Σ₁Σ₂)^½ enters twice; when the square root
    fails clean-fid adds 1e-6 to the diagonals, which moves the result by up to 2·d·1e-6."""
    return 2 * d * (math.sqrt(np.finfo(np.float64).eps * norm1 * norm2) + 1e-6)


def _cov_norm(features: np.ndarray) -> float:
    """‖Σ‖₂ of the features' covariance, from the n×n Gram matrix (same nonzero eigenvalues)."""
    x = features.astype(np.float64) - features.mean(0, dtype=np.float64)
    return float(np.linalg.eigvalsh(x @ x.T / (len(x) - 1)).max())


def _self_fid_bound(features: np.ndarray) -> float:
    """The bound for FID(x, x) as computed: in the span of both sets, 2n dimensions."""
    norm = _cov_norm(features)
    return _fd_error_bound(2 * len(features), norm, norm)


# -- the network -----------------------------------------------------------------------------------

def test_one_pass_gives_the_papers_feature_sizes(feats):
    f = feats["x"]
    assert f["pool3"].shape == (N, 2048) and f["spatial"].shape == (N, 17 * 17 * 7)
    assert f["logits"].shape == (N, 1008)
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in f.values())
    assert f["pool3"].std(0).mean() > 0 and f["spatial"].std(0).mean() > 0  # images differ


def test_spatial_features_are_mixed_6d_branch1x1_channels_last(make_metric, images):
    """sFID's features: ADM's mixed_6/conv (NHWC), first 7 channels, flattened as (h, w, c)."""
    m = make_metric()
    x = inc.resize_for_inception(images["x"][:1], "clean")
    seen = []
    handle = m.network().net.Mixed_6d.branch1x1.register_forward_hook(
        lambda mod, args, out: seen.append(out.clone()))
    try:
        _, spatial, _ = m.network()(x)
    finally:
        handle.remove()
    (out,) = seen
    assert out.shape == (1, 192, 17, 17)
    assert torch.equal(spatial[0].reshape(17, 17, 7), out[0, :7].permute(1, 2, 0))


def test_legacy_mode_is_torch_fidelitys_forward_and_clean_mode_differs(make_metric, images,
                                                                         feats, weights_file):
    """legacy_tensorflow: the features torch-fidelity's own forward (TF 1.x resize inside)
    gives on uint8 images; clean: another resize, other features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    x = images["x"][:2]
    legacy = make_metric(mode="legacy_tensorflow").image_features(x)
    # the test's own file, so its torch.load of any kind is fine here
    oracle = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights_file))
    with torch.no_grad():
        pool3, logits = oracle(x)
    # the same float32 operations; only the order of a reduction may differ
    np.testing.assert_allclose(legacy["pool3"], pool3.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(legacy["logits"], logits.numpy(), rtol=1e-5, atol=1e-5)
    clean = feats["x"]["pool3"][:2]
    assert np.abs(clean - legacy["pool3"]).max() > 100 * 1e-5 * np.abs(clean).max()


def test_clean_resize_is_clean_fids(tmp_path, images):
    """clean: the float 299×299 image clean-fid's folder reader makes of the same PNG."""
    from cleanfid.utils import ResizeDataset

    img = images["x"][0]
    save_png(img, tmp_path / "a.png")
    grey = img[:1]
    save_png(grey, tmp_path / "b.png")
    ours = inc.resize_for_inception([img, grey], "clean")
    theirs = ResizeDataset([str(tmp_path / "a.png"), str(tmp_path / "b.png")], mode="clean")
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


# -- the numbers -----------------------------------------------------------------------------------

def test_fid_and_sfid_of_a_set_with_itself_are_zero(make_metric, feats):
    f = feats["x"]
    m = make_metric(kid=False)
    s = m.scores(f, _as_reference(f))
    assert abs(s["fid"]) <= _self_fid_bound(f["pool3"])
    assert abs(s["sfid"]) <= _self_fid_bound(f["spatial"])
    assert s["precision"] == 1.0 and s["recall"] == 1.0  # each point lies in its own ball
    other = m.scores(feats["y"], _as_reference(f))
    assert other["fid"] > 1e4 * _self_fid_bound(f["pool3"])


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    """Diagonal covariances commute: FD = ‖μ₁ − μ₂‖² + Σᵢ (σ₁ᵢ + σ₂ᵢ − 2√(σ₁ᵢσ₂ᵢ))."""
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = inc.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_of_few_features_in_their_span_is_clean_fids_in_full():
    """Fewer images than dimensions: the distance computed in the features' span equals
    clean-fid's on the full d×d statistics (within the latter's error bound)."""
    from cleanfid import fid

    rng = np.random.default_rng(0)
    d = 300
    a = rng.normal(size=(20, d)) * rng.uniform(0.5, 2, size=d)
    b = 0.7 * rng.normal(size=(25, d)) + 0.2
    full = fid.fid_from_feats(a, b)
    bound = _fd_error_bound(d, _cov_norm(a), _cov_norm(b))
    assert inc.fid_from_features(a, b) == pytest.approx(full, abs=bound)
    assert bound < 1e-3 * full  # a bound that says something


def test_sfid_sees_the_arrangement_that_fid_hardly_sees(feats):
    """Shuffling 4×4 blocks keeps every tile (what pool3, a global average, mostly sees) and
    moves each to another place (what the 17×17 map sees). Measured against an unrelated set of
    the same kind: the shuffled set is nearly as far in sFID (ratio → 1) but much closer in FID
    (ratio → 0 for a fully local network; block borders and the pools' reach keep it above)."""
    def ratio(kind: str) -> float:
        x = feats["x"][kind]
        return (inc.fid_from_features(x, feats["shuffled"][kind])
                / inc.fid_from_features(x, feats["y"][kind]))

    fid_ratio, sfid_ratio = ratio("pool3"), ratio("spatial")
    assert sfid_ratio > 0.5, "a rearranged image is about as far in sFID as another image"
    assert fid_ratio < 0.5 * sfid_ratio, (fid_ratio, sfid_ratio)


def test_precision_recall_on_hand_built_points():
    """k = 3. Real: the corners of the square [-1, 1]² (3rd-nearest other point: an adjacent
    corner, radius 2) and its centre (radius √2). Fake points inside a real ball: (0.1, 0),
    (2.5, 1) (1.5 from a corner), (-2, -2) (√2 from a corner); outside: (10, 10), (0, 3.5)
    (√7.25 > 2 from the nearest corner). Precision 3/5. Every real point lies within the fake
    balls (radius ≥ 7.6 for the far points): recall 1."""
    real = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1], [0, 0]], dtype=np.float64)
    fake = np.array([[0.1, 0], [2.5, 1], [10, 10], [0, 3.5], [-2, -2]], dtype=np.float64)
    assert inc.precision_recall(real, fake, k=3) == (0.6, 1.0)
    # roles swapped: precision ↔ recall of the swapped sets
    p, r = inc.precision_recall(fake, real, k=3)
    assert (p, r) == (1.0, 0.6)
    with pytest.raises(ValueError, match="pr_k"):
        inc.precision_recall(real[:3], fake, k=3)


def test_precision_recall_in_blocks_equals_torch_fidelity(monkeypatch):
    """Blocks of a few rows (the 50k × 50k layout) give torch-fidelity's full-matrix numbers."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(90, 16, generator=g, dtype=torch.float64) + 0.3
    expected = calculate_precision_recall_full(fake, real, neighborhood=3)  # (generated, real)
    monkeypatch.setattr(inc, "_DISTANCE_BLOCK", 7 * 120)  # 7 rows per block, a partial last one
    got = inc.precision_recall(real.numpy(), fake.numpy(), k=3)
    # torch-fidelity averages in float32; 1e-6 still tells every count of 90 or 120 apart
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_inception_score_definition():
    uniform = np.zeros((20, 1008))
    assert inc.inception_score(uniform, splits=10) == (1.0, 0.0)
    # 10 classes predicted with certainty, evenly: IS = exp(log 10) = 10 in each part
    confident = np.full((100, 1008), -1e4)
    confident[np.arange(100), np.arange(100) % 10] = 0
    mean, std = inc.inception_score(confident, splits=1)
    assert mean == pytest.approx(10, rel=1e-12) and std == 0
    with pytest.raises(ValueError, match="is_splits"):
        inc.inception_score(uniform[:5], splits=10)


def test_inception_score_equals_torch_fidelitys():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = 3 * torch.randn(50, 1008, generator=torch.Generator().manual_seed(0))
    expected = isc_features_to_metric(logits, splits=10, shuffle=False)
    mean, std = inc.inception_score(logits.numpy(), splits=10)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-6, abs=1e-12)


def test_kid_is_seeded_and_restores_numpy_state(feats):
    np.random.seed(5)
    state = np.random.get_state()[1].copy()
    a = inc.kernel_distance(feats["y"]["pool3"], feats["x"]["pool3"], 10, 4, seed=0)
    assert np.array_equal(np.random.get_state()[1], state)
    assert a == inc.kernel_distance(feats["y"]["pool3"], feats["x"]["pool3"], 10, 4, seed=0)


# -- references ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, make_metric, images):
    """One metric call with an image-folder dataset: the samples ``y``, the reference ``x``."""
    src = tmp_path_factory.mktemp("src")
    for i, img in enumerate(images["x"]):
        save_png(img, src / f"{i:02d}.png")
    dataset = ImageFolderDataset(path=str(src), resolution=64, name="tiles")
    cache = tmp_path_factory.mktemp("cache")
    metric = make_metric(kid=True, kid_subsets=5)
    metric.check(dataset)
    ctx = MetricInputs(sample_dir=src, images=images["y"], dataset=dataset, cache_dir=cache)
    return dataset, cache, metric(ctx)


def test_folder_reference_results(folder_run, make_metric, feats):
    _, _, res = folder_run
    assert set(res) == {"fid", "sfid", "is", "is_std", "precision", "recall", "kid", "fid_ref",
                        "fid_ref_n", "fid_n", "inception_mode", "inception_weights"}
    assert (res["fid_ref"], res["fid_ref_n"], res["fid_n"]) == ("tiles/all", N, N)
    assert (res["inception_mode"], res["inception_weights"]) == ("clean", inc.WEIGHTS_FILE)
    assert all(isinstance(res[k], float) and math.isfinite(res[k])
               for k in ("fid", "sfid", "is", "is_std", "precision", "recall", "kid"))
    # the PNG round trip keeps every pixel: the numbers of the features computed directly
    direct = make_metric(kid=True, kid_subsets=5).scores(feats["y"], _as_reference(feats["x"]))
    assert {k: res[k] for k in direct} == pytest.approx(direct, rel=1e-6, abs=1e-9)


def test_folder_features_are_cached_by_folder_mode_and_weights(folder_run, make_metric,
                                                               feats, monkeypatch):
    dataset, cache, _ = folder_run
    reference = dataset.reference(cache)
    files = list((cache / "inception").glob(f"{reference.name}-clean-*.npz"))
    assert len(files) == 1
    calls = []

    def counted(self, folder, device=None):
        calls.append(self.mode)
        return {"pool3": feats["x"]["pool3"], "spatial": feats["x"]["spatial"]}

    monkeypatch.setattr(InceptionMetrics, "folder_features", counted)
    again = make_metric().reference_features(reference, cache)  # a fresh metric, same cache
    assert calls == []
    np.testing.assert_array_equal(again["pool3"], feats["x"]["pool3"])
    make_metric(mode="legacy_tensorflow").reference_features(reference, cache)
    assert calls == ["legacy_tensorflow"]  # another resize: other features, another file
    make_metric(mode="legacy_tensorflow").reference_features(reference, cache)
    assert calls == ["legacy_tensorflow"]


@pytest.fixture
def recorded_frechet(monkeypatch):
    """clean-fid's Fréchet distance replaced by a recorder of the reference statistics it is
    given (a d = 2048 square root costs seconds; the value is tested above, here the choice)."""
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def record(mu1, sigma1, mu2, sigma2):
        calls.append((mu2, sigma2))
        return 1.0

    monkeypatch.setattr(inc, "frechet_distance", record)
    return calls


def test_cleanfid_statistics_as_reference(tmp_path, make_metric, feats, recorded_frechet):
    mu, sigma = inc.feature_statistics(feats["x"]["pool3"])
    path = tmp_path / "cifar_clean.npz"
    np.savez(path, mu=mu, sigma=sigma)
    dataset = DigitsDataset(reference_stats=str(path))
    m = make_metric(sfid=False, precision_recall=False)
    m.check(dataset, KEY)
    ref = m.reference_features(path, tmp_path)
    assert set(ref) == {"mu", "sigma"}
    assert m.scores(feats["y"], ref)["fid"] == 1.0
    ((ref_mu, ref_sigma),) = recorded_frechet
    assert np.array_equal(ref_mu, mu) and np.array_equal(ref_sigma, sigma)
    for option in ("sfid", "precision_recall", "kid"):
        with pytest.raises(ConfigError, match=rf"{KEY}\.{option}=True: .*cifar_clean\.npz.*Fix"):
            make_metric(**{"sfid": False, "precision_recall": False, option: True}).check(
                dataset, KEY)


def test_adm_reference_batch(tmp_path, make_metric, images, feats, monkeypatch,
                             recorded_frechet):
    """An ADM reference batch: its statistics give FID and sFID (as in ADM's evaluator), its
    images (arr_0, uint8 NHWC) what statistics cannot — precision/recall — computed once and
    cached."""
    mu, sigma = inc.feature_statistics(feats["y"]["pool3"])  # another set's, to tell them apart
    mu_s, sigma_s = inc.feature_statistics(feats["y"]["spatial"])
    path = tmp_path / "VIRTUAL_tiles.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
             arr_0=images["x"].permute(0, 2, 3, 1).numpy())
    m = make_metric()
    m.check(DigitsDataset(reference_stats=str(path)), KEY)
    ref = m.reference_features(path, tmp_path / "cache")
    # the images' features are those of the same images in memory
    np.testing.assert_allclose(ref["pool3"], feats["x"]["pool3"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref["spatial"], feats["x"]["spatial"], rtol=1e-6, atol=1e-6)
    s = m.scores(feats["y"], ref)
    (fid_mu, fid_sigma), (sfid_mu, sfid_sigma) = recorded_frechet
    assert np.array_equal(fid_mu, mu) and np.array_equal(fid_sigma, sigma)
    assert np.array_equal(sfid_mu, mu_s) and np.array_equal(sfid_sigma, sigma_s)
    expected = inc.precision_recall(feats["x"]["pool3"], feats["y"]["pool3"])
    assert (s["precision"], s["recall"]) == pytest.approx(expected, abs=1e-12)

    monkeypatch.setattr(InceptionMetrics, "image_features",
                        lambda *a, **k: pytest.fail("recomputed a cached reference batch"))
    again = make_metric().reference_features(path, tmp_path / "cache")
    np.testing.assert_array_equal(again["pool3"], ref["pool3"])
    # statistics alone serve FID and sFID without reading or computing anything else
    stats_only = tmp_path / "VIRTUAL_stats.npz"
    np.savez(stats_only, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ref = make_metric(precision_recall=False).reference_features(stats_only)
    assert set(ref) == {"mu", "sigma", "mu_s", "sigma_s"}
    with pytest.raises(ConfigError, match=rf"{KEY}\.precision_recall=True"):
        make_metric().check(DigitsDataset(reference_stats=str(stats_only)), KEY)


def test_reference_files_that_cannot_serve_fail_in_check(tmp_path, make_metric, folder_run):
    m = make_metric()
    digits_feats = tmp_path / "digits.npz"
    np.savez(digits_feats, feats=np.zeros((4, 64), np.float32))
    with pytest.raises(ConfigError, match=r"dataset\.reference_stats=.*digit classifier"):
        m.check(DigitsDataset(reference_stats=str(digits_feats)), KEY)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ConfigError, match=r"dataset\.reference_stats=.*'mu' has shape \(64,\)"):
        m.check(DigitsDataset(reference_stats=str(wrong)), KEY)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"dataset\.reference_stats=.*not a readable \.npz"):
        m.check(DigitsDataset(reference_stats=str(tmp_path / "junk.npz")), KEY)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(ConfigError, match=r"dataset\.reference_stats=None"):
        m.check(PromptsDataset(path=str(prompts)), KEY)
    # lowbit's own cache file records its mode: another mode is refused
    _, cache, _ = folder_run
    (cached,) = (cache / "inception").glob("tiles-all-*-clean-*.npz")
    with pytest.raises(ConfigError, match=rf"{KEY}\.mode='legacy_tensorflow'.*mode clean"):
        make_metric(mode="legacy_tensorflow").check(DigitsDataset(reference_stats=str(cached)),
                                                    KEY)


# -- weights ---------------------------------------------------------------------------------------

def test_missing_weights_name_the_key_the_path_and_the_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / inc.WEIGHTS_FILE
    with pytest.raises(ConfigError) as e:
        MetricSuite({"inception": InceptionMetrics()}).check(None)
    assert e.value.key == f"{KEY}.weights"
    msg = str(e.value)
    assert str(expected) in msg and inc.weights_url() in msg and "load_state_dict_from_url" in msg
    with pytest.raises(ConfigError, match=rf"{KEY}\.weights='/nowhere/w\.pth'"):
        InceptionMetrics(weights="/nowhere/w.pth").check(None, KEY)


def test_default_weights_location_is_torch_hubs(weights_file, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(weights_file.parent.parent))
    m = InceptionMetrics()
    assert m.weights_path == weights_file
    m.check(None, KEY)  # found and loaded


def test_weights_of_another_format_are_refused_by_name(tmp_path, weights_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation note
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "inception-2015-12-05.pt"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other_keys.pth")
    state = torch.load(weights_file, weights_only=True)
    state["fc.weight"] = state["fc.weight"][:10]
    torch.save(state, tmp_path / "other_shapes.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    cases = {"inception-2015-12-05.pt": "TorchScript archive", "module.pth": "weights_only=True",
             "other_keys.pth": "keys or shapes", "other_shapes.pth": "keys or shapes",
             "junk.pth": "weights_only=True"}
    for name, problem in cases.items():
        with pytest.raises(ConfigError, match=rf"^{KEY}\.weights=.*{name}.*{problem}.*Fix: "
                                              rf".*{inc.WEIGHTS_FILE}") as e:
            InceptionMetrics(weights=str(tmp_path / name)).check(None, KEY)
        assert e.value.key == f"{KEY}.weights"


def test_options_are_checked_by_key(make_metric):
    with pytest.raises(ConfigError, match=rf"{KEY}\.mode='legacy_pytorch'"):
        make_metric(mode="legacy_pytorch").check(None, KEY)
    with pytest.raises(ConfigError, match=rf"{KEY}\.pr_k=0"):
        make_metric(pr_k=0).check(None, KEY)


# -- the config group and a run --------------------------------------------------------------------

def test_metrics_inception_composes(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("metrics=inception")
    assert cfg.metrics.num_samples == 50000 and cfg.metrics.grid_size == 64
    suite = build_metrics(cfg.metrics)
    assert suite.name == "inception" and list(suite.items) == ["inception", "fidelity"]
    m = suite.items["inception"]
    assert isinstance(m, InceptionMetrics)
    assert (m.weights, m.mode, m.device, m.sfid, m.inception_score, m.is_splits,
            m.precision_recall, m.pr_k, m.kid) == (None, "clean", None, True, True, 10, True, 3,
                                                   False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    with pytest.raises(ConfigError, match=rf"^{KEY}\.weights=None: no Inception weights"):
        suite.check(None)


@pytest.mark.slow
def test_run_experiment_with_metrics_inception(make_cfg, weights_file, folder_run):
    """The digits model's FP run measured by metrics=inception against a cached feature file
    (the 1,797-image digits folder at 299×299 would take minutes here)."""
    from lowbit.pipeline import run_experiment

    _, cache, _ = folder_run
    (reference,) = (cache / "inception").glob("tiles-all-*-clean-*.npz")
    cfg = make_cfg("metrics=inception", f"metrics.items.inception.weights={weights_file}",
                   "metrics.items.inception.device=cpu", "metrics.items.inception.batch_size=8",
                   "metrics.items.inception.is_splits=2", "metrics.num_samples=8",
                   "metrics.grid_size=8", f"dataset.reference_stats={reference}",
                   "sampler=ddim20", "sampler.steps=3", "logger=none")
    m = run_experiment(cfg)["metrics"]
    assert m["fid_ref"] == f"digits/stats:{reference.name}"
    assert (m["fid_n"], m["fid_ref_n"]) == (8, N)
    assert (m["inception_mode"], m["inception_weights"]) == ("clean", inc.WEIGHTS_FILE)
    for k in ("fid", "sfid", "is", "is_std", "precision", "recall"):
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    assert m["fid"] > 0 and m["is"] >= 1 and "kid" not in m
    assert m["mse"] == 0.0  # the FP run is its own FP reference
