"""Paired SSIM and LPIPS of a run's samples against the FP model's samples on the same seeds.

With :class:`~lowbit.metrics.fidelity.PairedFidelity`'s PSNR these are the paired numbers
SVDQuant reports for a quantized model beside FID and CLIP score: each sample is compared with
the FP model's sample drawn from the same noise and condition, so they measure how far
quantization moved the images, not how good the images are.

- SSIM: torchmetrics' ``structural_similarity_index_measure`` (Gaussian window 11, σ = 1.5,
  data range 1) on the uint8 images scaled to [0, 1], per image, averaged over the samples.
- LPIPS: torchmetrics' LPIPS network (Zhang et al., 2018) with its shipped linear layers; its
  AlexNet/VGG16 backbone holds torchvision's ImageNet weights, which torchvision would download.
  Here they are read from a local file only: ``backbone_weights`` or, when null, the file
  torchvision itself would have cached under ``torch.hub.get_dir()/checkpoints``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowbit.config import ConfigError
from lowbit.metrics.base import Metric, MetricInputs

if TYPE_CHECKING:
    from lowbit.data.datasets import Dataset

#: LPIPS backbone → the torchvision model whose ``features`` it slices
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16"}
#: the smallest image side each backbone's deepest LPIPS layer can read
LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16}


def _check_pair(images: Tensor, fp_images: Tensor | None, what: str) -> Tensor:
    if fp_images is None:
        raise ValueError(f"{what} needs the FP model's samples on the same seeds "
                         f"(MetricInputs.fp_images)")
    if images.shape != fp_images.shape:
        raise ValueError(f"paired metrics need the FP samples of the same seeds: shapes "
                         f"{tuple(images.shape)} and {tuple(fp_images.shape)} differ")
    for x in (images, fp_images):
        if x.dtype != torch.uint8:
            raise TypeError(f"paired metrics take uint8 images, got {x.dtype}")
    return fp_images


def _positive_int(value: object, key: str, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "must be a positive integer", f"pass {key}={example}")


def _unit(batch: Tensor, device: torch.device) -> Tensor:
    """uint8 [0, 255] → float32 [0, 1] on ``device``."""
    return batch.to(device).float() / 255.0


@torch.no_grad()
def paired_ssim(images: Tensor, fp_images: Tensor, batch_size: int = 64,
                device: torch.device | None = None) -> Tensor:
    """Per-image SSIM ``[N]`` (CPU, float32) of two uint8 ``[N, C, H, W]`` sets on the [0, 1]
    scale (torchmetrics' Gaussian SSIM, window 11, σ = 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(images, fp_images, "paired SSIM")
    dev = device or torch.device("cpu")
    out = []
    for i in range(0, len(images), batch_size):
        x = _unit(images[i : i + batch_size], dev)
        y = _unit(fp_images[i : i + batch_size], dev)
        out.append(structural_similarity_index_measure(x, y, data_range=1.0,
                                                       reduction="none").cpu())
    return torch.cat(out)


class PairedSSIM(Metric):
    """``ssim``: mean SSIM of each sample to the FP model's sample on the same seed
    (``metrics.items.ssim``); 1 for identical images. batch_size: image pairs per call;
    device: where it is computed (null = the run's device)."""

    needs_fp_images = True

    def __init__(self, batch_size: int = 64, device: str | None = None) -> None:
        self.batch_size = batch_size
        self.device = torch.device(device) if device else None

    def check(self, dataset: Dataset | None = None, key: str = "metrics.items.ssim") -> None:
        _positive_int(self.batch_size, f"{key}.batch_size", 64)

    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        fp = _check_pair(ctx.images, ctx.fp_images, "paired SSIM")
        s = paired_ssim(ctx.images, fp, self.batch_size, self.device or ctx.device)
        return {"ssim": float(s.double().mean())}


# -- LPIPS --------------------------------------------------------------------------------------

def torchvision_weights_file(net: str) -> Path:
    """Where torchvision caches the ImageNet weights of LPIPS backbone ``net`` (``alex`` or
    ``vgg``): ``torch.hub.get_dir()/checkpoints/<file name of the weights' URL>``."""
    import torchvision

    weights = torchvision.models.get_model_weights(LPIPS_BACKBONES[net]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _backbone_state(state: dict[str, Tensor], target: dict[str, Tensor], source: str,
                    key: str, net: str) -> dict[str, Tensor]:
    """``state`` (a torchvision model's ``state_dict``, or its ``features``') renamed to the
    LPIPS backbone's slices: ``features.<i>.<p>`` → ``slice<k>.<i>.<p>``."""
    fix = (f"give torchvision's {LPIPS_BACKBONES[net]} ImageNet state dict "
           f"(torchvision.models.{LPIPS_BACKBONES[net]}(weights='DEFAULT').state_dict())")
    out = {}
    for name, param in target.items():
        _, idx, p = name.split(".", 2)
        value = state.get(f"features.{idx}.{p}", state.get(f"{idx}.{p}"))
        if value is None:
            raise ConfigError(f"{key}.backbone_weights", source,
                              f"not a torchvision {LPIPS_BACKBONES[net]} state dict (no "
                              f"features.{idx}.{p})", fix)
        if value.shape != param.shape:
            raise ConfigError(f"{key}.backbone_weights", source,
                              f"features.{idx}.{p} has shape {tuple(value.shape)}, the "
                              f"{LPIPS_BACKBONES[net]} backbone needs {tuple(param.shape)}", fix)
        out[name] = value
    return out


def build_lpips(net: str = "alex", backbone_weights: str | Path | None = None,
                resize: int | None = None, key: str = "metrics.items.lpips") -> nn.Module:
    """torchmetrics' LPIPS network (eval mode, CPU) with the backbone weights read from
    ``backbone_weights`` (null = torchvision's cache file, :func:`torchvision_weights_file`) and
    the linear layers torchmetrics ships. Nothing is downloaded: the backbone is built without
    weights and the file is loaded into it. Raises :class:`ConfigError` naming
    ``<key>.backbone_weights`` when the file is missing or is not the backbone's."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    if net not in LPIPS_BACKBONES:
        raise ConfigError(f"{key}.net", net, "unknown LPIPS backbone",
                          f"pass {key}.net=alex or {key}.net=vgg")
    path = Path(os.path.expanduser(str(backbone_weights))) if backbone_weights else \
        torchvision_weights_file(net)
    if not path.is_file():
        import torchvision

        url = torchvision.models.get_model_weights(LPIPS_BACKBONES[net]).DEFAULT.url
        raise ConfigError(
            f"{key}.backbone_weights", str(backbone_weights) if backbone_weights else None,
            f"no LPIPS backbone weights at {path}",
            f"fetch torchvision's {LPIPS_BACKBONES[net]} ImageNet weights ({url}) beforehand "
            f"into {torchvision_weights_file(net).parent} (where torchvision caches them), or "
            f"pass {key}.backbone_weights=<that file>, or {key}=null to leave LPIPS out")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the key whatever torch.load raised
        raise ConfigError(f"{key}.backbone_weights", str(path),
                          f"cannot read it as a state dict ({type(e).__name__}: {str(e)[:200]})",
                          "give a file written by torch.save(model.state_dict())") from e
    if not isinstance(state, dict):
        raise ConfigError(f"{key}.backbone_weights", str(path), "is not a state dict",
                          "give a file written by torch.save(model.state_dict())")
    # pnet_rand: torchvision builds the backbone without weights (no download); loaded below
    lpips = _NoTrainLpips(net=net, pnet_rand=True, resize=resize)
    lpips.net.load_state_dict(_backbone_state(state, lpips.net.state_dict(), str(path), key, net))
    return lpips.eval()


@torch.no_grad()
def paired_lpips(lpips: nn.Module, images: Tensor, fp_images: Tensor, batch_size: int = 32,
                 device: torch.device | None = None) -> Tensor:
    """Per-image LPIPS ``[N]`` (CPU, float32) of two uint8 ``[N, C, H, W]`` sets (grey images
    are read as RGB) with the network of :func:`build_lpips`."""
    _check_pair(images, fp_images, "paired LPIPS")
    dev = device or torch.device("cpu")
    lpips.to(dev)
    out = []
    for i in range(0, len(images), batch_size):
        x = _unit(images[i : i + batch_size], dev)
        y = _unit(fp_images[i : i + batch_size], dev)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        out.append(lpips(x, y, normalize=True).reshape(-1).cpu())
    return torch.cat(out)


class PairedLPIPS(Metric):
    """``lpips``: mean LPIPS of each sample to the FP model's sample on the same seed
    (``metrics.items.lpips``; 0 for identical images, lower is closer), and ``lpips_net``, the
    backbone (``alex`` or ``vgg``; values of different backbones are not comparable).

    net: ``alex`` (LPIPS's default) or ``vgg``; backbone_weights: torchvision's ImageNet state
    dict of that backbone (``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), null = the
    file in ``torch.hub.get_dir()/checkpoints`` — never downloaded; resize: resize both images
    to this side first (null = as sampled; AlexNet needs at least 31 px, VGG16 16 px);
    batch_size: image pairs per forward; device: where it runs (null = the run's device).
    """

    needs_fp_images = True

    def __init__(self, net: str = "alex", backbone_weights: str | None = None,
                 resize: int | None = None, batch_size: int = 32,
                 device: str | None = None) -> None:
        self.net = net
        self.backbone_weights = backbone_weights
        self.resize = resize
        self.batch_size = batch_size
        self.device = torch.device(device) if device else None
        self._lpips: nn.Module | None = None

    def check(self, dataset: Dataset | None = None, key: str = "metrics.items.lpips") -> None:
        _positive_int(self.batch_size, f"{key}.batch_size", 32)
        if self.resize is not None:
            _positive_int(self.resize, f"{key}.resize", 64)
            if self.net in LPIPS_MIN_SIZE and self.resize < LPIPS_MIN_SIZE[self.net]:
                raise ConfigError(f"{key}.resize", self.resize, f"the {self.net} backbone needs "
                                  f"at least {LPIPS_MIN_SIZE[self.net]} px",
                                  f"pass {key}.resize=64")
        self.network(key)  # missing or wrong weights fail here, before any compute

    def network(self, key: str = "metrics.items.lpips") -> nn.Module:
        """The LPIPS network, built once."""
        if self._lpips is None:
            self._lpips = build_lpips(self.net, self.backbone_weights, self.resize, key)
        return self._lpips

    def __call__(self, ctx: MetricInputs) -> dict[str, float | str]:
        fp = _check_pair(ctx.images, ctx.fp_images, "paired LPIPS")
        side = self.resize or min(ctx.images.shape[-2:])
        if side < LPIPS_MIN_SIZE.get(self.net, 0):
            raise ValueError(f"LPIPS with the {self.net} backbone needs images of at least "
                             f"{LPIPS_MIN_SIZE[self.net]} px, these are {side} px: pass "
                             f"metrics.items.lpips.resize=64")
        d = paired_lpips(self.network(), ctx.images, fp, self.batch_size,
                         self.device or ctx.device)
        return {"lpips": float(d.double().mean()), "lpips_net": self.net}
