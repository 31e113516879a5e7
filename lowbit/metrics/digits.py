"""Digits metrics: FID and KID in the digit classifier's feature space, conditional accuracy, an
IS analogue, and (with the FP model's samples) how often a sample's class agrees with the FP one's
and how far each sample's features lie from its FP twin's.

FID goes through clean-fid (``custom_feat_extractor``) on PNG folders, so generated and reference
images are read the same way; the classifier's penultimate layer (64-d) is the feature space.
KID is clean-fid's ``kernel_distance`` on the same features (its random subsets drawn from a
seeded state, so a run's KID is reproducible). Both are recorded with what they were measured
against: ``fid_ref`` (the reference set: ``<dataset>/<split>``, or the statistics file's name),
``fid_ref_n`` (reference images) and ``fid_n`` (generated samples) — FID and KID depend on both
sizes, so numbers of different N are not comparable.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ConfigError
from lowbit.metrics.base import Metric, MetricInputs
from lowbit.models.digits import NUM_CLASSES, RESOLUTION, DigitClassifier, load_digit_classifier

if TYPE_CHECKING:
    from lowbit.data.datasets import Dataset


class DigitsFeatureExtractor(nn.Module):
    """clean-fid feature extractor: [B, 3, H, W] float images in [0, 255] → classifier features."""

    def __init__(self, classifier: DigitClassifier, resolution: int = RESOLUTION) -> None:
        super().__init__()
        self.classifier = classifier
        self.resolution = resolution

    @staticmethod
    def _to_model_space(x: torch.Tensor, resolution: int) -> torch.Tensor:
        x = x.float()
        x = x.mean(1, keepdim=True) if x.shape[1] == 3 else x  # PNGs come back as RGB
        if x.shape[-1] != resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return x / 127.5 - 1

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self._to_model_space(x, self.resolution))


class _Logits(nn.Module):
    """torchmetrics' InceptionScore wants a module returning logits for uint8 images."""

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(DigitsFeatureExtractor._to_model_space(x, RESOLUTION))


def _keep_size(img: np.ndarray) -> np.ndarray:
    # clean-fid resizes to 299×299 for Inception; the digits feature space works at native size
    return img.astype(np.float32)


class DigitsMetrics(Metric):
    """``fid``, ``kid``, ``cond_acc`` and ``is`` of generated digits, with what FID/KID were
    measured against (``fid_ref``, ``fid_ref_n``, ``fid_n``), plus ``cond_agreement``,
    ``feat_dist`` and ``feat_cos_dist`` when the FP model's samples on the same seeds are given
    (``metrics.items.digits``).

    classifier_checkpoint: the digit classifier (null = the one shipped in lowbit/assets);
    batch_size: images per feature batch; kid: report KID (``kid_subsets`` random subsets of at
    most ``kid_subset_size`` images, drawn with ``kid_seed``); device: where the classifier runs
    (``cpu`` keeps the recorded numbers bit-comparable; null = the run's device).
    """

    def __init__(self, classifier_checkpoint: str | None = None, batch_size: int = 256,
                 kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 kid_seed: int = 0, device: str | None = "cpu") -> None:
        self.classifier_checkpoint = classifier_checkpoint
        self._classifier: DigitClassifier | None = None  # loaded by check() or first use
        self.batch_size = batch_size
        self.kid = kid
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.kid_seed = kid_seed
        self.device = torch.device(device) if device else None
        self._reference_cache: dict[tuple, dict] = {}

    @property
    def classifier(self) -> DigitClassifier:
        if self._classifier is None:
            self._classifier = load_digit_classifier(self.classifier_checkpoint)
        return self._classifier

    @property
    def extractor(self) -> DigitsFeatureExtractor:
        return DigitsFeatureExtractor(self.classifier).eval()

    def check(self, dataset: Dataset | None = None, key: str = "metrics") -> None:
        fix = "give an existing classifier checkpoint, or null for the shipped one"
        if self.classifier_checkpoint and not Path(str(self.classifier_checkpoint)).is_file():
            raise ConfigError(f"{key}.classifier_checkpoint", self.classifier_checkpoint,
                              "no such file", fix)
        try:
            _ = self.classifier  # a corrupt or mismatched file fails here, before any compute
        except Exception as e:  # noqa: BLE001 - name the key whatever the loader raised
            raise ConfigError(f"{key}.classifier_checkpoint", self.classifier_checkpoint,
                              f"cannot load the digit classifier ({type(e).__name__}: "
                              f"{str(e)[:300]})", fix) from e
        if dataset is not None and (dataset.conditioning != "class"
                                    or dataset.num_classes != NUM_CLASSES):
            raise ConfigError("metrics", key.split(".")[-1], f"the digit classifier measures "
                              f"class-conditional digits, not dataset={dataset.name}",
                              "use dataset=digits, or metrics without the digit classifier "
                              "(e.g. metrics=fidelity)")

    # -- features --
    def _device(self, ctx_device: torch.device | None = None) -> torch.device:
        return self.device or ctx_device or torch.device("cpu")

    def folder_features(self, folder: Path, device: torch.device | None = None) -> np.ndarray:
        from cleanfid import fid

        dev = self._device(device)
        extractor = self.extractor.to(dev)
        return fid.get_folder_features(
            str(folder), model=extractor, num_workers=0, batch_size=self.batch_size,
            device=dev, mode="clean", custom_fn_resize=_keep_size, verbose=False,
        )

    def reference_features(self, reference: Path, device: torch.device | None = None) -> dict:
        """``{"feats": …}`` of a reference folder, or what a ``.npz`` statistics file holds
        (``mu`` and ``sigma``, and ``feats`` for KID) — in this classifier's feature space."""
        reference = Path(reference)
        content = _content_key(reference)
        if content is None:  # a folder without a manifest may change under us: never cached
            return self._reference_features(reference, device)
        key = (content, str(self._device(device)))
        if key not in self._reference_cache:
            self._reference_cache = {key: self._reference_features(reference, device)}
        return self._reference_cache[key]

    def _reference_features(self, reference: Path, device: torch.device | None) -> dict:
        if reference.is_file():
            with np.load(reference) as z:
                stats = {k: z[k] for k in z.files}
            if "feats" not in stats and not {"mu", "sigma"} <= set(stats):
                raise ValueError(f"{reference}: reference statistics need 'feats' or 'mu' and "
                                 f"'sigma' arrays (found {sorted(stats)})")
            return stats
        return {"feats": self.folder_features(reference, device)}

    # -- the numbers --
    def fid(self, sample_dir: Path, reference_dir: Path) -> float:
        return self._fid(self.folder_features(sample_dir), self.reference_features(reference_dir))

    @staticmethod
    def _fid(feats: np.ndarray, ref: dict) -> float:
        from cleanfid import fid

        if "feats" in ref:
            return float(fid.fid_from_feats(feats, ref["feats"]))
        mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
        return float(fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))

    def kernel_distance(self, feats: np.ndarray, ref_feats: np.ndarray) -> float:
        from cleanfid import fid

        state = np.random.get_state()  # clean-fid draws its subsets from the global state
        try:
            np.random.seed(self.kid_seed)
            return float(fid.kernel_distance(feats, ref_feats, num_subsets=self.kid_subsets,
                                             max_subset_size=self.kid_subset_size))
        finally:
            np.random.set_state(state)

    @torch.no_grad()
    def predict(self, images_u8: torch.Tensor) -> torch.Tensor:
        """The classifier's class for each uint8 image."""
        x = DigitsFeatureExtractor._to_model_space(images_u8.cpu(), RESOLUTION)
        return self.classifier.to("cpu")(x).argmax(1)

    def cond_accuracy(self, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images_u8) == labels.cpu()).float().mean())

    def cond_agreement(self, images_u8: torch.Tensor, fp_images_u8: torch.Tensor) -> float:
        """Fraction of samples classified as the FP model's sample on the same seed is."""
        _check_paired(images_u8, fp_images_u8)
        return float((self.predict(images_u8) == self.predict(fp_images_u8)).float().mean())

    def inception_score(self, images_u8: torch.Tensor, splits: int = 1) -> float:
        from torchmetrics.image.inception import InceptionScore

        with warnings.catch_warnings():
            # its memory note and the std of a single split are noise here
            warnings.simplefilter("ignore", UserWarning)
            # measured by one process (rank 0 of a multi-process run): never synced
            metric = InceptionScore(feature=_Logits(self.classifier.to("cpu")), splits=splits,
                                    sync_on_compute=False)
            images_u8 = images_u8.cpu()
            rgb = images_u8.expand(-1, 3, -1, -1) if images_u8.shape[1] == 1 else images_u8
            metric.update(rgb)
            return float(metric.compute()[0])

    @torch.no_grad()
    def features(self, images_u8: torch.Tensor) -> torch.Tensor:
        """The classifier's 64-d features of uint8 images (on the CPU, in batches)."""
        extractor = self.extractor.to("cpu")
        images_u8 = images_u8.cpu()
        return torch.cat([extractor(images_u8[i : i + self.batch_size])
                          for i in range(0, len(images_u8), self.batch_size)])

    def feature_distance(self, images_u8: torch.Tensor, fp_images_u8: torch.Tensor
                         ) -> dict[str, float]:
        """How far each sample lies from its FP twin (same seed and condition) in the
        classifier's feature space — the digits analogue of LPIPS: ``feat_dist``, the mean over
        pairs of the L2 distance of the 64-d features, and ``feat_cos_dist``, the mean of
        1 − cosine similarity (scale-free, in [0, 2]). Both are 0 for identical images."""
        _check_paired(images_u8, fp_images_u8)
        a, b = self.features(images_u8).double(), self.features(fp_images_u8).double()
        # 1 − cos(a, b) = ½‖a/‖a‖ − b/‖b‖‖²: exactly 0 for identical features, never negative
        cos_dist = 0.5 * torch.linalg.vector_norm(F.normalize(a, dim=1) - F.normalize(b, dim=1),
                                                  dim=1) ** 2
        return {"feat_dist": float(torch.linalg.vector_norm(a - b, dim=1).mean()),
                "feat_cos_dist": float(cos_dist.mean())}

    @staticmethod
    def reference_label(ctx: MetricInputs) -> str:
        """What FID/KID were measured against: ``<dataset>/<reference split>``, or the file name
        of the dataset's reference statistics."""
        ds = ctx.dataset
        if ds is None:
            return ctx.reference().name
        if getattr(ds, "reference_stats", None):
            return f"{ds.name}/stats:{Path(ds.reference_stats).name}"
        return f"{ds.name}/{ds.reference_split}"

    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        labels = ctx.labels
        if labels is None:
            raise ValueError("the digits metrics need the class labels the samples were drawn "
                             "with (MetricInputs.conditions)")
        feats = self.folder_features(ctx.sample_dir, ctx.device)
        ref = self.reference_features(ctx.reference(), ctx.device)
        out: dict[str, float | str] = {"fid": self._fid(feats, ref)}
        if self.kid:
            if "feats" not in ref:
                raise ValueError(f"KID needs reference features: {ctx.reference()} holds only "
                                 f"mu/sigma; add 'feats' or set kid=false")
            out["kid"] = self.kernel_distance(feats, ref["feats"])
        out["fid_ref"] = self.reference_label(ctx)
        if "feats" in ref:  # a mu/sigma file does not say how many images made it
            out["fid_ref_n"] = len(ref["feats"])
        out["fid_n"] = len(feats)
        out["cond_acc"] = self.cond_accuracy(ctx.images, labels)
        out["is"] = self.inception_score(ctx.images)
        if ctx.fp_images is not None:
            out["cond_agreement"] = self.cond_agreement(ctx.images, ctx.fp_images)
            out.update(self.feature_distance(ctx.images, ctx.fp_images))
        return out


def _content_key(path: Path) -> tuple | None:
    """Identifies what ``path`` holds: a reference folder by its checksum manifest, a file by its
    size and modification time."""
    from lowbit.data.datasets import MANIFEST

    manifest = path / MANIFEST
    if manifest.is_file():
        import hashlib

        return str(path.resolve()), hashlib.sha256(manifest.read_bytes()).hexdigest()
    if path.is_file():
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns
    return None


def _check_paired(images: torch.Tensor, fp_images: torch.Tensor) -> None:
    if images.shape != fp_images.shape:
        raise ValueError(f"paired metrics need the FP samples of the same seeds: shapes "
                         f"{tuple(images.shape)} and {tuple(fp_images.shape)} differ")
