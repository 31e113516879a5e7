"""Digits metrics: FID in the digit classifier's feature space, conditional accuracy, IS analogue.

FID goes through clean-fid (``custom_feat_extractor``) on PNG folders, so generated and reference
images are read the same way; the classifier's penultimate layer (64-d) is the feature space.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models.digits import RESOLUTION, DigitClassifier, load_digit_classifier


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


class DigitsMetrics:
    """Computes ``fid``, ``cond_acc`` and ``is`` for generated digits."""

    def __init__(self, classifier_checkpoint: str | None = None, batch_size: int = 256) -> None:
        self.classifier = load_digit_classifier(classifier_checkpoint)
        self.extractor = DigitsFeatureExtractor(self.classifier).eval()
        self.batch_size = batch_size

    def folder_features(self, folder: Path) -> np.ndarray:
        from cleanfid import fid

        return fid.get_folder_features(
            str(folder), model=self.extractor, num_workers=0, batch_size=self.batch_size,
            device=torch.device("cpu"), mode="clean", custom_fn_resize=_keep_size, verbose=False,
        )

    def fid(self, sample_dir: Path, reference_dir: Path) -> float:
        from cleanfid import fid

        return float(fid.fid_from_feats(self.folder_features(sample_dir),
                                        self.folder_features(reference_dir)))

    @torch.no_grad()
    def cond_accuracy(self, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
        pred = self.classifier(DigitsFeatureExtractor._to_model_space(images_u8, RESOLUTION))
        return float((pred.argmax(1) == labels).float().mean())

    def inception_score(self, images_u8: torch.Tensor, splits: int = 1) -> float:
        from torchmetrics.image.inception import InceptionScore

        with warnings.catch_warnings():
            # its memory note and the std of a single split are noise here
            warnings.simplefilter("ignore", UserWarning)
            metric = InceptionScore(feature=_Logits(self.classifier), splits=splits)
            rgb = images_u8.expand(-1, 3, -1, -1) if images_u8.shape[1] == 1 else images_u8
            metric.update(rgb)
            return float(metric.compute()[0])

    def __call__(self, sample_dir: Path, reference_dir: Path, images_u8: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, float]:
        return {
            "fid": self.fid(sample_dir, reference_dir),
            "cond_acc": self.cond_accuracy(images_u8, labels),
            "is": self.inception_score(images_u8),
        }
