"""The built-in digits model: a small class-conditional U-Net and a digit classifier.

Both are trained by lowbit itself on scikit-learn's bundled handwritten digits (see
``lowbit.models.train_digits``) and ship in ``lowbit/assets`` as safetensors files.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.models.adapter import Denoiser

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # class index used for the unconditional branch of classifier-free guidance
RESOLUTION = 16

# The U-Net: two resolutions with attention (8×8 and 4×4), a time embedding and a class embedding
# with one extra "null" class — every part the quantization methods act on.
DIGITS_UNET_CONFIG: dict = dict(
    sample_size=RESOLUTION,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    num_class_embeds=NUM_CLASSES + 1,
    norm_num_groups=16,
    attention_head_dim=32,
)

# The noise schedule the U-Net was trained with; samplers are built from it.
DIGITS_NOISE_SCHEDULE: dict = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)

UNET_FILE = "digits_unet.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
# the reward of reward-guided distillation: never the classifier that measures the samples
REWARD_CLASSIFIER_FILE = "digits_reward_classifier.safetensors"
REFERENCE_FILE = "digits_reference.json"


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``lowbit/assets``."""
    return Path(str(resources.files("lowbit") / "assets" / name))


def build_digits_unet() -> UNet2DModel:
    """The digits U-Net architecture with freshly initialised weights."""
    return UNet2DModel(**DIGITS_UNET_CONFIG)


class DigitClassifier(nn.Module):
    """Small CNN on 16×16 digits in [-1, 1]. ``features`` is the FID feature space (64-d)."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitRewardClassifier(nn.Module):
    """The digits *reward* model (RG-LCD on digits): another architecture than
    :class:`DigitClassifier` (5×5 then 3×3 convolutions with average pooling, no normalisation,
    a 128-d hidden layer) trained from another seed, so optimising its log-probabilities is not
    optimising the evaluation classifier's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 24, 5, padding=2), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(24, 48, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(48 * 4 * 4, 128), nn.SiLU(),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict with an error that names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} checkpoint not found: {path}. Train it with `lowbit-train-digits` "
            f"or point the config at an existing file."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{what} checkpoint {path} is not a valid safetensors file ({e}). "
            f"Re-create it with `lowbit-train-digits` or restore the shipped file."
        ) from e


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{what} checkpoint {path} does not match the architecture: {e}. "
            f"Re-create it with `lowbit-train-digits`."
        ) from e


def load_digits_unet(checkpoint: str | Path | None = None) -> UNet2DModel:
    path = Path(checkpoint) if checkpoint else asset_path(UNET_FILE)
    unet = build_digits_unet()
    _load_into(unet, load_state(path, "digits U-Net"), path, "digits U-Net")
    return unet.eval()


def load_digit_classifier(checkpoint: str | Path | None = None) -> DigitClassifier:
    path = Path(checkpoint) if checkpoint else asset_path(CLASSIFIER_FILE)
    clf = DigitClassifier()
    _load_into(clf, load_state(path, "digit classifier"), path, "digit classifier")
    return clf.eval()


def load_reward_classifier(checkpoint: str | Path | None = None) -> DigitRewardClassifier:
    path = Path(checkpoint) if checkpoint else asset_path(REWARD_CLASSIFIER_FILE)
    clf = DigitRewardClassifier()
    _load_into(clf, load_state(path, "digit reward classifier"), path, "digit reward classifier")
    return clf.eval()


def load_reference() -> dict:
    """The FP reference numbers measured when the shipped checkpoints were made."""
    path = asset_path(REFERENCE_FILE)
    return json.loads(path.read_text()) if path.is_file() else {}


def load_digits_model(checkpoint: str | Path | None = None) -> Denoiser:
    """Model loader of ``model=digits`` (Hydra ``_target_``)."""
    return Denoiser(
        net=load_digits_unet(checkpoint),
        noise_schedule=dict(DIGITS_NOISE_SCHEDULE),
        conditioning="class",
        num_classes=NUM_CLASSES,
        null_class=NULL_CLASS,
        sample_shape=(1, RESOLUTION, RESOLUTION),
        name="digits",
    )
