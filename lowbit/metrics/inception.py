"""The Inception metrics of the diffusion papers — FID, sFID, Inception Score, precision/recall
(and KID) — from one pass of the Inception network over the images.

The network is the TF graph ``inception-2015-12-05`` that TF FID, clean-fid and ADM's evaluator
(guided-diffusion) run, in torch-fidelity's pure-PyTorch port
(``torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3``, the one
torchmetrics' FID runs). Its submodules are run here in order on float input, not through its
``forward`` (uint8 only, resizing inside), so that either resize feeds it:

- ``mode: clean`` (clean-fid's default): each image resized to 299×299 by clean-fid's own resizer
  (PIL bicubic on float values, no rounding after the resize);
- ``mode: legacy_tensorflow``: TF 1.x bilinear resize (torch-fidelity's bit-exact copy), what TF
  FID and ADM's evaluator feed the graph.

Then (x − 128)/128, as in the graph; grey images are repeated to 3 channels. From the one pass:

- pool3 (2,048-d) → FID (Heusel et al. 2017, clean-fid's ``frechet_distance``), KID (Bińkowski
  et al. 2018, clean-fid's ``kernel_distance``) and precision/recall (Kynkäänniemi et al. 2019,
  k = 3, as ADM's evaluator computes it);
- ``mixed_6/conv`` (torch-fidelity's ``Mixed_6d.branch1x1``), its first 7 channels on the 17×17
  grid, 2,023-d → sFID (Nash et al. 2021, ADM's definition);
- the 1,008 logits without the bias (pool3 @ fc.weightᵀ, as ADM and torch-fidelity) → Inception
  Score (Salimans et al. 2016), mean and std over ``is_splits`` parts.

Weights: torch-fidelity's converted state dict (:data:`WEIGHTS_FILE`) from torch hub's checkpoint
folder, or a given file; never downloaded, loaded with ``torch.load(weights_only=True)``.

References (``MetricInputs.reference()``): an image folder — its features computed once and
cached under ``<cache_dir>/inception`` — or a ``.npz``: lowbit's feature cache (``pool3``,
``spatial``, with the ``mode`` and ``weights`` they were computed with), clean-fid statistics
(``mu``, ``sigma``), or an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and/or
``arr_0``, uint8 NHWC images). Statistics in a file win over features computed from its images
(as in ADM's evaluator); the images give what statistics cannot (KID, precision/recall) and are
read only then. Statistics from other tools do not record their resize: ADM's reference batches
were made like ``legacy_tensorflow``, clean-fid's name their mode in the file name.

Results: ``fid``, ``sfid``, ``is``, ``is_std``, ``precision``, ``recall``, ``kid`` (when enabled),
with what they were measured against as the digits metrics record it (``fid_ref``, ``fid_ref_n``
— only when the reference's images are counted — and ``fid_n``), and ``inception_mode`` and
``inception_weights``: numbers of another resize or another weights file are not comparable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.config import ConfigError
from lowbit.metrics.base import Metric, MetricInputs

if TYPE_CHECKING:
    from lowbit.data.datasets import Dataset

log = logging.getLogger(__name__)

#: torch-fidelity's conversion of the TF graph's weights (torchmetrics' FID caches the same file)
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: how images reach 299×299: clean-fid's PIL bicubic, or TF 1.x bilinear (TF FID, ADM)
MODES = ("clean", "legacy_tensorflow")
INPUT_SIZE = 299
POOL3_DIM = 2048
#: sFID (ADM): the first 7 of the 192 channels of mixed_6/conv, on its 17×17 grid
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008
#: where a run's config names the metric (errors name its sub-keys)
DEFAULT_KEY = "metrics.items.inception"
#: the submodules of FeatureExtractorInceptionV3 from the input to pool3, in forward order
_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
          "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
          "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")
#: elements of one block of pairwise distances (float64: 256 MiB)
_DISTANCE_BLOCK = 1 << 25
#: the cache format of reference features (part of their cache key)
_CACHE_VERSION = 1


def weights_url() -> str:
    """torch-fidelity's download address of :data:`WEIGHTS_FILE` (for the instructions of the
    missing-file error; lowbit never downloads it)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def default_weights_path() -> Path:
    """Where torch-fidelity and torchmetrics cache the weights: torch hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


# -- the network -----------------------------------------------------------------------------------

class InceptionV3Features(nn.Module):
    """pool3 features, sFID's spatial features and the unbiased logits from one pass of
    torch-fidelity's ``FeatureExtractorInceptionV3`` over images already resized to 299×299."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x``: float ``[B, 3, 299, 299]`` in [0, 255] → pool3 ``[B, 2048]``, spatial
        ``[B, 2023]`` and logits ``[B, 1008]`` (float32)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"the Inception network reads [B, 3, {INPUT_SIZE}, {INPUT_SIZE}] "
                             f"images, not {tuple(x.shape)}")
        captured: list[Tensor] = []
        hook = self.net.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, args, out: captured.append(out))
        try:
            h = (x.to(self.net.fc.weight.dtype) - 128) / 128  # the graph's Sub and Mul
            for name in _TRUNK:
                h = getattr(self.net, name)(h)
        finally:
            hook.remove()
        pool3 = torch.flatten(h, 1)
        # ADM reads mixed_6/conv:0 in TF's NHWC layout: channels last, then flattened
        spatial = captured[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        logits = pool3 @ self.net.fc.weight.T  # no bias: torch-fidelity's logits_unbiased, ADM
        return pool3.float(), spatial.float(), logits.float()


def _is_torchscript(data: bytes) -> bool:
    """A TorchScript archive (clean-fid's ``inception-2015-12-05.pt``): a zip with constants.pkl."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def _one_line(e: Exception, limit: int) -> str:
    return " ".join(str(e).split())[:limit]


def load_inception(path: str | Path, key: str = DEFAULT_KEY) -> InceptionV3Features:
    """The network with the state dict in ``path`` (torch-fidelity's format, read with
    ``torch.load(weights_only=True)``). Raises :class:`ConfigError` naming ``<key>.weights`` for
    a missing file, a TorchScript archive, anything else that is not a state dict of tensors, or
    one whose keys or shapes are not the network's."""
    path = Path(path).expanduser()
    k = f"{key}.weights"
    fix = (f"give {k} torch-fidelity's state dict {WEIGHTS_FILE} (on a machine with network: "
           f"python -c \"import torch; torch.hub.load_state_dict_from_url('{weights_url()}')\" "
           f"saves it into torch hub's checkpoints folder)")
    if not path.is_file():
        raise ConfigError(k, str(path), "no such file", fix)
    data = path.read_bytes()
    if _is_torchscript(data):
        raise ConfigError(k, str(path), "is a TorchScript archive (like clean-fid's "
                          "inception-2015-12-05.pt), not a state dict", fix)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler says, the format is wrong
        raise ConfigError(k, str(path), f"does not load as a state dict with torch.load("
                          f"weights_only=True) ({type(e).__name__}: {_one_line(e, 200)})",
                          fix) from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(k, str(path), f"holds a {type(state).__name__}, not a state dict of "
                          f"tensors", fix)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        # the constructor torch.loads its path itself; given the bytes just read with
        # weights_only=True it unpickles nothing that was not checked, and downloads nothing
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=io.BytesIO(data))
    except RuntimeError as e:  # load_state_dict: missing or unexpected keys, other shapes
        raise ConfigError(k, str(path), f"its keys or shapes are not those of torch-fidelity's "
                          f"InceptionV3 ({_one_line(e, 300)})", fix) from e
    return InceptionV3Features(net)


# -- images → features ---------------------------------------------------------------------------

def _rgb(image: Tensor) -> Tensor:
    """A uint8 ``[C, H, W]`` image with 3 channels (grey repeated)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"the Inception metrics read uint8 [C, H, W] images with 1 or 3 "
                         f"channels, not {image.dtype} {tuple(image.shape)}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def resize_for_inception(images: Sequence[Tensor], mode: str,
                         pool: ThreadPoolExecutor | None = None) -> Tensor:
    """uint8 ``[C, H, W]`` images (sizes may differ) → float ``[N, 3, 299, 299]`` in [0, 255],
    resized the way ``mode`` says (on the CPU: the TF resize is bit-exact there)."""
    if mode == "clean":
        from cleanfid.resize import make_resizer

        resize = make_resizer("PIL", False, "bicubic", (INPUT_SIZE, INPUT_SIZE))

        def one(img: Tensor) -> Tensor:
            hwc = _rgb(img).permute(1, 2, 0).cpu().numpy()
            return torch.from_numpy(resize(hwc)).permute(2, 0, 1)
    elif mode == "legacy_tensorflow":
        from torch_fidelity.interpolate_compat_tensorflow import (
            interpolate_bilinear_2d_like_tensorflow1x,
        )

        def one(img: Tensor) -> Tensor:
            x = _rgb(img).cpu().float()[None]
            return interpolate_bilinear_2d_like_tensorflow1x(
                x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)[0]
    else:
        raise ValueError(f"unknown Inception resize mode {mode!r}; use one of {', '.join(MODES)}")
    resized = list(pool.map(one, images)) if pool is not None else [one(i) for i in images]
    return torch.stack(resized)


@contextmanager
def _no_tf32() -> Iterator[None]:
    """TF32 off during the pass (cuDNN allows it for convolutions by default): a GPU run's
    features then stay within float32 rounding of a CPU run's and of a cached reference's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _read_image(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:  # as clean-fid reads a folder: every image as RGB
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


# -- the numbers -----------------------------------------------------------------------------------

def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features ``[N, D]``, as clean-fid and ADM compute them."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) — clean-fid's computation (FID, sFID)."""
    from cleanfid import fid

    return float(fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """The Fréchet distance of two feature sets (clean-fid's computation on their statistics).
    With fewer images than dimensions (a quick look, a test) it is computed in the span of the
    features: both means and both covariances lie in it, so an orthonormal basis of it leaves the
    means' distance, the traces and tr (Σ₁Σ₂)^½ unchanged — the same number, while scipy's square
    root of the d×d product (seconds at d = 2048) shrinks to one of the span's size, and the
    singular covariances of few images no longer meet that square root."""
    a, b = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if len(a) + len(b) < a.shape[1]:
        basis, _ = np.linalg.qr(np.concatenate([a, b]).T)  # d × (n₁ + n₂), orthonormal columns
        a, b = a @ basis, b @ basis
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def inception_score(logits: np.ndarray | Tensor, splits: int = 10) -> tuple[float, float]:
    """exp E_x KL(p(y|x) ‖ p(y)) over each of ``splits`` consecutive parts of the samples, p(y)
    the part's mean prediction; the mean and the (population) std over the parts. This is
    torch-fidelity's computation without its shuffle, and ADM's for 50,000 samples (its parts
    hold 5,000 each)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = len(logits)
    if splits < 1 or n < splits:
        raise ValueError(f"the Inception Score of {n} samples in {splits} splits: give at least "
                         f"as many samples as splits (metrics.num_samples, or a smaller is_splits)")
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits: (i + 1) * n // splits]
        log_mean_p = torch.logsumexp(part, dim=0) - math.log(len(part))  # log p(y) of the part
        kl = (part.exp() * (part - log_mean_p)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_distance(x: Tensor, k: int) -> Tensor:
    """Each point's distance to its k-th nearest other point of ``x``: the (k+1)-th smallest of
    its distances, the first being its own 0 (ADM's manifold radii, torch-fidelity's)."""
    rows = max(1, _DISTANCE_BLOCK // len(x))
    return torch.cat([torch.cdist(x[i: i + rows], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), rows)])


def _inside_some_ball(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """Whether each of ``points`` lies in some ball (closed, as in ADM) around ``centres``."""
    rows = max(1, _DISTANCE_BLOCK // len(centres))
    return torch.cat([(torch.cdist(points[i: i + rows], centres) <= radii).any(dim=1)
                      for i in range(0, len(points), rows)])


def precision_recall(real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 3,
                     device: torch.device | str | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator computes them:
    each real point's ball reaches its k-th nearest other real point; precision is the fraction
    of fake points inside some real ball, recall the fraction of real points inside some fake
    ball. Distances in float64, in row blocks, so no N×N matrix is ever held."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    if min(len(real_t), len(fake_t)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} reference and "
                         f"generated images (got {len(real_t)} and {len(fake_t)}); raise "
                         f"metrics.num_samples or lower pr_k")
    precision = _inside_some_ball(fake_t, real_t, _kth_neighbour_distance(real_t, k))
    recall = _inside_some_ball(real_t, fake_t, _kth_neighbour_distance(fake_t, k))
    return float(precision.double().mean()), float(recall.double().mean())


def kernel_distance(feats: np.ndarray, ref_feats: np.ndarray, subsets: int, subset_size: int,
                    seed: int) -> float:
    """clean-fid's KID, its random subsets drawn from ``seed`` (the global numpy state, which
    clean-fid draws from, is restored)."""
    from cleanfid import fid

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(fid.kernel_distance(np.asarray(feats, np.float64),
                                          np.asarray(ref_feats, np.float64),
                                          num_subsets=subsets, max_subset_size=subset_size))
    finally:
        np.random.set_state(state)


# -- reference files -------------------------------------------------------------------------------

#: the arrays a reference ``.npz`` may hold and the trailing shape each must have
_NPZ_SHAPES = {"mu": (POOL3_DIM,), "sigma": (POOL3_DIM, POOL3_DIM), "mu_s": (SPATIAL_DIM,),
               "sigma_s": (SPATIAL_DIM, SPATIAL_DIM), "pool3": (POOL3_DIM,),
               "spatial": (SPATIAL_DIM,)}


def npz_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of the arrays of a ``.npz``, from their headers only (an ADM
    reference batch's images are not read)."""
    fmt = np.lib.format
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                major, _ = fmt.read_magic(f)
                read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
                shape, _, dtype = read(f)
            out[info.filename[: -len(".npy")]] = (tuple(shape), dtype)
    return out


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _save_features(path: Path, feats: dict[str, np.ndarray], key: dict) -> None:
    """Reference features as lowbit's cache layout, written atomically (jobs share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, pool3=feats["pool3"].astype(np.float32),
                     spatial=feats["spatial"].astype(np.float32), mode=np.array(key["mode"]),
                     weights=np.array(key["weights"][0]),
                     key=np.array(json.dumps(key, sort_keys=True)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cached(path: Path, key: dict) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["key"]) != json.dumps(key, sort_keys=True):
                return None
            return {"pool3": z["pool3"], "spatial": z["spatial"]}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log.warning("Inception feature cache %s unreadable (%s); recomputing", path, e)
        return None


# -- the metric ------------------------------------------------------------------------------------

class InceptionMetrics(Metric):
    """``fid``, ``sfid``, ``is``/``is_std``, ``precision``/``recall`` and ``kid`` on the
    Inception network, with what they were measured against (``fid_ref``, ``fid_ref_n``,
    ``fid_n``) and how (``inception_mode``, ``inception_weights``) (``metrics.items.inception``).

    weights: torch-fidelity's state dict (null = :data:`WEIGHTS_FILE` in torch hub's checkpoint
    folder); mode: ``clean`` or ``legacy_tensorflow`` (see the module's docstring); batch_size:
    images per pass; device: where the network runs (null = the run's device); sfid,
    inception_score (in ``is_splits`` parts), precision_recall (``pr_k`` neighbours), kid (in
    ``kid_subsets`` random subsets of at most ``kid_subset_size`` images, drawn with
    ``kid_seed``): which numbers to report besides FID.
    """

    def __init__(self, weights: str | None = None, mode: str = "clean", batch_size: int = 64,
                 device: str | None = None, sfid: bool = True, inception_score: bool = True,
                 is_splits: int = 10, precision_recall: bool = True, pr_k: int = 3,
                 kid: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 kid_seed: int = 0) -> None:
        self.weights = weights
        self.mode = mode
        self.batch_size = batch_size
        self.device = device
        self.sfid = sfid
        self.inception_score = inception_score
        self.is_splits = is_splits
        self.precision_recall = precision_recall
        self.pr_k = pr_k
        self.kid = kid
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.kid_seed = kid_seed
        self._network: InceptionV3Features | None = None  # loaded by check() or first use

    @property
    def weights_path(self) -> Path:
        return Path(str(self.weights)).expanduser() if self.weights else default_weights_path()

    def network(self, key: str = DEFAULT_KEY) -> InceptionV3Features:
        if self._network is None:
            path = self.weights_path
            if not path.is_file():  # name the setting as given (null = the default location)
                raise ConfigError(
                    f"{key}.weights", self.weights, f"no Inception weights at {path}",
                    f"on a machine with network run python -c \"import torch; "
                    f"torch.hub.load_state_dict_from_url('{weights_url()}')\" (it saves "
                    f"{WEIGHTS_FILE} into torch hub's checkpoints folder), then copy the file "
                    f"to {path} or pass {key}.weights=<its path>; lowbit never downloads it")
            self._network = load_inception(path, key)
        return self._network

    # -- checks before any compute --
    def check(self, dataset: Dataset | None = None, key: str = DEFAULT_KEY) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"{key}.mode", self.mode, "unknown resize mode",
                              f"pass {key}.mode=clean (clean-fid) or legacy_tensorflow (TF FID, "
                              f"ADM's evaluator)")
        for name, example in (("batch_size", 64), ("is_splits", 10), ("pr_k", 3),
                              ("kid_subsets", 100), ("kid_subset_size", 1000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}.{name}", v, "must be a positive integer",
                                  f"pass {key}.{name}={example}")
        if self.device is not None:
            try:
                torch.device(str(self.device))
            except RuntimeError as e:
                raise ConfigError(f"{key}.device", self.device, f"not a device ({e})",
                                  f"pass {key}.device=cpu, cuda, or null for the run's "
                                  f"device") from e
        self.network(key)  # a missing or wrong weights file fails here
        if dataset is not None:
            self._check_reference(dataset, key)

    def _check_reference(self, dataset: Dataset, key: str) -> None:
        stats = getattr(dataset, "reference_stats", None)
        fix_file = ("give dataset.reference_stats a .npz of Inception statistics (clean-fid's mu/"
                    "sigma, an ADM reference batch, or a lowbit feature cache from "
                    "<paths.cache_dir>/inception), or null for the dataset's reference images")
        if not stats:
            from lowbit.data.datasets import PromptsDataset

            if isinstance(dataset, PromptsDataset):
                raise ConfigError("dataset.reference_stats", None, "a prompt list has no "
                                  "reference images for the Inception metrics", fix_file)
            return  # a reference folder gives every metric
        path = Path(str(stats)).expanduser()
        if not path.is_file():
            raise ConfigError("dataset.reference_stats", str(stats), "no such file", fix_file)
        try:
            arrays = npz_arrays(path)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ConfigError("dataset.reference_stats", str(stats), f"not a readable .npz "
                              f"({type(e).__name__}: {e})", fix_file) from e
        for name, want in _NPZ_SHAPES.items():
            if name in arrays and arrays[name][0][-len(want):] != want:
                raise ConfigError("dataset.reference_stats", str(stats),
                                  f"its {name!r} has shape {arrays[name][0]}, not Inception's "
                                  f"(…, {', '.join(map(str, want))})", fix_file)
        if "arr_0" in arrays:
            shape, dtype = arrays["arr_0"]
            if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4
                                                                 and shape[-1] not in (1, 3)):
                raise ConfigError("dataset.reference_stats", str(stats), f"its images 'arr_0' "
                                  f"are {dtype} {shape}, not uint8 NHWC with 1 or 3 channels "
                                  f"(ADM's reference batches)", fix_file)
        self._check_recorded(path, arrays, key)
        names = set(arrays)
        images, pool3 = "arr_0" in names, "pool3" in names
        if not (images or pool3 or {"mu", "sigma"} <= names):
            hint = (" (its 'feats' are another network's features, e.g. the digit classifier's)"
                    if "feats" in names else "")
            raise ConfigError("dataset.reference_stats", str(stats),
                              f"holds no Inception statistics, features or images (arrays: "
                              f"{', '.join(sorted(names)) or 'none'}){hint}", fix_file)
        needs = []
        if self.sfid and not (images or "spatial" in names or {"mu_s", "sigma_s"} <= names):
            needs.append(("sfid", "sFID needs spatial statistics (mu_s, sigma_s) or features"))
        if self.precision_recall and not (images or pool3):
            needs.append(("precision_recall", "precision/recall need the reference's features"))
        if self.kid and not (images or pool3):
            needs.append(("kid", "KID needs the reference's features"))
        for option, problem in needs:
            raise ConfigError(f"{key}.{option}", True, f"{problem}, and {path.name} holds only "
                              f"{', '.join(sorted(names))}",
                              f"set {key}.{option}=false, or give dataset.reference_stats a .npz "
                              f"with the reference images (ADM's arr_0) or lowbit's cached "
                              f"features, or null for the dataset's reference images")

    def _check_recorded(self, path: Path, arrays: dict, key: str) -> None:
        """A lowbit feature cache records the resize and weights its features were made with."""
        if "mode" not in arrays and "weights" not in arrays:
            return
        with np.load(path) as z:
            mode = str(z["mode"]) if "mode" in arrays else None
            weights = str(z["weights"]) if "weights" in arrays else None
        if mode is not None and mode != self.mode:
            raise ConfigError(f"{key}.mode", self.mode, f"the reference features in {path.name} "
                              f"were computed with mode {mode}", f"pass {key}.mode={mode}, or a "
                              f"reference computed with mode {self.mode}")
        if weights is not None and weights != self.weights_path.name:
            raise ConfigError(f"{key}.weights", self.weights, f"the reference features in "
                              f"{path.name} were computed with the weights file {weights}, not "
                              f"{self.weights_path.name}", f"pass {key}.weights=<that file>, or "
                              f"a reference computed with these weights")

    # -- features --
    def _device(self, ctx_device: torch.device | None = None) -> torch.device:
        if self.device:
            return torch.device(str(self.device))
        return ctx_device or torch.device("cpu")

    def _extract(self, batches: Iterable[Sequence[Tensor]], device: torch.device
                 ) -> dict[str, np.ndarray]:
        net = self.network().to(device)
        out: dict[str, list[np.ndarray]] = {"pool3": [], "spatial": [], "logits": []}
        workers = max(1, torch.get_num_threads())  # clean-fid's PIL resize is per image
        with _no_tf32(), ThreadPoolExecutor(workers) as pool:
            for batch in batches:
                x = resize_for_inception(batch, self.mode, pool if workers > 1 else None)
                for name, t in zip(out, net(x.to(device)), strict=True):
                    out[name].append(t.cpu().numpy())
        if not out["pool3"]:
            raise ValueError("no images to compute Inception features of")
        return {name: np.concatenate(v) for name, v in out.items()}

    def image_features(self, images: Tensor | Sequence[Tensor], device: torch.device | None = None
                       ) -> dict[str, np.ndarray]:
        """``pool3`` ``[N, 2048]``, ``spatial`` ``[N, 2023]`` and ``logits`` ``[N, 1008]``
        (float32) of uint8 images ``[N, C, H, W]`` (or a sequence of ``[C, H, W]``)."""
        bs = int(self.batch_size)
        return self._extract((images[i: i + bs] for i in range(0, len(images), bs)),
                             self._device(device))

    def folder_features(self, folder: Path, device: torch.device | None = None
                        ) -> dict[str, np.ndarray]:
        """The features of every image under ``folder`` (sorted by path, read as RGB)."""
        from lowbit.data.datasets import image_files

        files = image_files(Path(folder))
        if not files:
            raise ValueError(f"{folder}: no images in the reference folder")
        bs = int(self.batch_size)
        batches = ([_read_image(f) for f in files[i: i + bs]] for i in range(0, len(files), bs))
        return self._extract(batches, self._device(device))

    def _weights_id(self) -> list:
        path = self.weights_path
        return [path.name, path.stat().st_size]

    def _cached(self, name: str, key: dict, cache_dir: Path | None, compute
                ) -> dict[str, np.ndarray]:
        key = {"version": _CACHE_VERSION, **key, "mode": self.mode, "weights": self._weights_id()}
        path = (Path(cache_dir) / "inception" / f"{name}-{self.mode}-{_key_hash(key)}.npz"
                if cache_dir is not None else None)
        if path is not None:
            found = _load_cached(path, key)
            if found is not None:
                return found
        feats = compute()
        if path is not None:
            _save_features(path, feats, key)
            log.info("Inception features of %s cached in %s", name, path)
        return feats

    def reference_features(self, reference: Path, cache_dir: Path | None = None,
                           device: torch.device | None = None) -> dict[str, np.ndarray]:
        """What the reference gives: ``pool3``/``spatial`` features and/or the statistics
        ``mu``/``sigma`` (pool3) and ``mu_s``/``sigma_s`` (spatial). A folder's features and
        an ADM batch's (when its statistics do not suffice) are cached under
        ``<cache_dir>/inception``, keyed by the source (a folder's name, number of files and their
        total size, and its manifest; a file's name, size and modification time), the mode and the
        weights file."""
        reference = Path(reference)
        if reference.is_dir():
            from lowbit.data.datasets import MANIFEST, image_files

            files = image_files(reference)
            manifest = reference / MANIFEST
            key = {"folder": reference.name, "count": len(files),
                   "bytes": sum(f.stat().st_size for f in files),
                   "manifest": (hashlib.sha256(manifest.read_bytes()).hexdigest()
                                if manifest.is_file() else None)}
            return self._cached(reference.name, key, cache_dir,
                                lambda: self.folder_features(reference, device))
        return self._npz_reference(reference, cache_dir, device)

    def _npz_reference(self, path: Path, cache_dir: Path | None, device: torch.device | None
                       ) -> dict[str, np.ndarray]:
        with np.load(path) as z:
            names = set(z.files)
            ref = {n: z[n] for n in ("mu", "sigma", "mu_s", "sigma_s", "pool3", "spatial")
                   if n in names}
            if "mode" in names and str(z["mode"]) != self.mode:
                raise ValueError(f"{path}: its features were computed with mode {z['mode']}, "
                                 f"not {self.mode}")
            need_pool3 = "pool3" not in ref and (
                "mu" not in ref or self.precision_recall or self.kid)
            need_spatial = self.sfid and "spatial" not in ref and "mu_s" not in ref
            if (need_pool3 or need_spatial) and "arr_0" in names:
                st = path.stat()
                key = {"file": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

                def compute() -> dict[str, np.ndarray]:
                    arr = z["arr_0"]
                    arr = arr[..., None] if arr.ndim == 3 else arr  # grey NHW
                    return self.image_features(torch.from_numpy(arr).permute(0, 3, 1, 2), device)

                feats = self._cached(f"{path.stem}-arr_0", key, cache_dir, compute)
                ref.setdefault("pool3", feats["pool3"])
                ref.setdefault("spatial", feats["spatial"])
        if "pool3" not in ref and "mu" not in ref:
            raise ValueError(f"{path}: no Inception statistics (mu, sigma), features (pool3) or "
                             f"images (arr_0) (arrays: {', '.join(sorted(names))})")
        return ref

    # -- the numbers --
    def scores(self, feats: dict[str, np.ndarray], ref: dict[str, np.ndarray],
               device: torch.device | None = None) -> dict[str, float]:
        """The enabled metrics of sample features (:meth:`image_features`) against a reference
        (:meth:`reference_features`)."""
        if len(feats["pool3"]) < 2:
            raise ValueError("FID needs a covariance: give at least 2 samples "
                             "(metrics.num_samples; the papers use 50,000)")

        def distance(feat: str, mu: str, sigma: str, what: str) -> float:
            if mu in ref and sigma in ref:  # a file's statistics win, as in ADM's evaluator
                return frechet_distance(*feature_statistics(feats[feat]), ref[mu], ref[sigma])
            if feat in ref:
                return fid_from_features(feats[feat], ref[feat])
            raise ValueError(f"{what} needs the reference's {mu}/{sigma} or features; set "
                             f"the option false or give a reference with them")

        out: dict[str, float] = {"fid": distance("pool3", "mu", "sigma", "FID")}
        if self.sfid:
            out["sfid"] = distance("spatial", "mu_s", "sigma_s", "sFID")
        if self.inception_score:
            out["is"], out["is_std"] = inception_score(feats["logits"], int(self.is_splits))
        if (self.precision_recall or self.kid) and "pool3" not in ref:
            raise ValueError("precision/recall and KID need the reference's pool3 features; set "
                             "precision_recall=false and kid=false or give a reference with them")
        if self.precision_recall:
            out["precision"], out["recall"] = precision_recall(
                ref["pool3"], feats["pool3"], int(self.pr_k), self._device(device))
        if self.kid:
            out["kid"] = kernel_distance(feats["pool3"], ref["pool3"], int(self.kid_subsets),
                                         int(self.kid_subset_size), int(self.kid_seed))
        return out

    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        from lowbit.metrics.digits import DigitsMetrics

        device = self._device(ctx.device)
        feats = self.image_features(ctx.images, device)
        ref = self.reference_features(ctx.reference(), ctx.cache_dir, device)
        out: dict[str, float | str] = dict(self.scores(feats, ref, device))
        out["fid_ref"] = DigitsMetrics.reference_label(ctx)  # one naming for every FID
        if "pool3" in ref:  # statistics alone do not say how many images made them
            out["fid_ref_n"] = len(ref["pool3"])
        out["fid_n"] = len(feats["pool3"])
        out["inception_mode"] = self.mode
        out["inception_weights"] = self.weights_path.name
        return out

    def __repr__(self) -> str:
        return f"InceptionMetrics(mode={self.mode!r}, weights={str(self.weights_path)!r})"
