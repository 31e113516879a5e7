"""The denoiser adapter: the one place that knows how each model family is called.

Every part of lowbit that runs a diffusion network — sampling, calibration trajectories,
distillation, QAT, OPs counting, caching — goes through a :class:`Denoiser`. It holds the network
(``net``: the module that gets quantized), the noise schedule, how the model is conditioned and,
for latent models, the VAE (and for text-to-image models the text encoder and tokenizer).

Conditioning (``cond``) is one tensor per batch, or ``None``:

============  =========================================  ==============================================
kind          ``cond``                                   null (unconditional) input for guidance
============  =========================================  ==============================================
``none``      ``None`` (DDPM, LSUN LDMs)                 —
``class``     int64 labels ``[B]`` (digits, DiT, LDM-cin) ``null_class`` (digits: 10; DiT: 1000)
``text``      prompt embeddings ``[B, L, D]`` (SD)       the embedding of the empty prompt
============  =========================================  ==============================================

A class-conditional U-Net with cross-attention (CompVis LDM cin256) takes its labels through
``class_embedder`` as a one-token context, ``encoder_hidden_states = class_embedder(labels)``.

Classifier-free guidance is here once: :meth:`Denoiser.guidance_batch` stacks the conditional and
the unconditional half into one batch (so a quantized network sees both in every forward, as
Q-Diffusion's calibration assumes) and :meth:`Denoiser.guided` combines them. Latent models work
in latent space throughout; :meth:`Denoiser.decode` gives images in ``[-1, 1]`` for metrics and
:meth:`Denoiser.encode` maps real images to latents for QAT on real data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

CONDITIONING = ("none", "class", "text")
FAMILIES = ("unet", "unet_text", "dit")


def _net_family(net: nn.Module) -> str:
    from diffusers import DiTTransformer2DModel, Transformer2DModel, UNet2DConditionModel

    if isinstance(net, (DiTTransformer2DModel, Transformer2DModel)):
        return "dit"
    if isinstance(net, UNet2DConditionModel):
        return "unet_text"
    return "unet"


@dataclass(eq=False)
class Denoiser:
    """ε(x_t, t, cond) for one model family (see the module doc). ``sample_shape`` is the shape
    the sampler works in (latent shape for latent models), per sample."""

    net: nn.Module
    noise_schedule: dict
    conditioning: str
    sample_shape: tuple[int, ...]
    name: str = ""
    num_classes: int = 0
    null_class: int | None = None
    vae: nn.Module | None = None
    vae_scale: float = 1.0
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    class_embedder: nn.Module | None = None
    family: str = ""
    _null_text: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"model.conditioning={self.conditioning!r}: choose one of "
                             f"{', '.join(CONDITIONING)}")
        if not self.family:
            self.family = _net_family(self.net)
        if self.conditioning == "text" and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(f"model {self.name!r} is text-conditioned but has no text encoder "
                             f"or tokenizer: load it from a pipeline folder that holds both")
        if self.family == "unet_text" and self.conditioning == "class" \
                and self.class_embedder is None:
            raise ValueError(f"model {self.name!r} takes class labels through cross-attention "
                             f"but has no class embedder: load it from a pipeline folder with one")
        if self.conditioning == "class" and self.num_classes < 1:
            raise ValueError(f"model {self.name!r} is class-conditional but num_classes="
                             f"{self.num_classes}; set model.num_classes")

    # -- identity ----------------------------------------------------------------------------------
    def with_net(self, net: nn.Module) -> Denoiser:
        """The same model family, schedule, VAE and text encoder around another network (the
        quantized student)."""
        return dataclasses.replace(self, net=net)

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> Denoiser:
        """Move every module (network, VAE, text encoder) to ``device``; returns self."""
        for m in (self.net, self.vae, self.text_encoder, self.class_embedder):
            if m is not None:
                m.to(device)
        if self._null_text is not None:
            self._null_text = self._null_text.to(device)
        return self

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one decoded image ``[C, H, W]``."""
        if not self.latent:
            return tuple(self.sample_shape)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        c = int(self.vae.config.out_channels)
        return (c, self.sample_shape[1] * factor, self.sample_shape[2] * factor)

    # -- calling the network -----------------------------------------------------------------------
    def inputs(self, x: Tensor, t: Tensor, cond: Tensor | None) -> dict[str, Tensor]:
        """The network's forward kwargs — the only code that knows their names. ``t`` has shape
        ``[]`` or ``[B]``."""
        t = t.reshape(()).expand(x.shape[0]) if t.numel() == 1 else t
        t = t.to(x.device)
        if self.family == "dit":
            kw: dict[str, Tensor] = {"hidden_states": x, "timestep": t}
            kw["class_labels"] = (cond if cond is not None else
                                  torch.full((x.shape[0],), int(self.null_class), device=x.device))
            return kw
        kw = {"sample": x, "timestep": t}
        if self.family == "unet_text" and self.class_embedder is not None:
            labels = cond if cond is not None else self.null_cond(x.shape[0], x.device)
            kw["encoder_hidden_states"] = self.class_embedder(labels.to(x.device))
        elif self.family == "unet_text":
            kw["encoder_hidden_states"] = cond if cond is not None else self.null_cond(x.shape[0])
        elif self.conditioning == "class" and cond is not None:
            kw["class_labels"] = cond
        return kw

    def output_eps(self, out: Any) -> Tensor:
        """ε from the network's output (DiT with learned σ: the first half of the channels)."""
        eps = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
        c = self.sample_shape[0]
        return eps[:, :c] if eps.shape[1] != c else eps

    def call(self, net: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """ε of ``net`` (this family's network, e.g. a student) — no guidance."""
        return self.output_eps(net(**self.inputs(x, t, cond)))

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.call(self.net, x, t, cond)

    # -- classifier-free guidance ------------------------------------------------------------------
    def uses_guidance(self, guidance_scale: float) -> bool:
        return self.conditioning != "none" and float(guidance_scale) != 1.0 and (
            self.conditioning == "text" or self.null_class is not None)

    def null_cond(self, n: int, device: torch.device | None = None) -> Tensor | None:
        """The unconditional input for ``n`` samples."""
        device = device or self.device
        if self.conditioning == "class":
            return torch.full((n,), int(self.null_class), dtype=torch.long, device=device)
        if self.conditioning == "text":
            if self._null_text is None:
                self._null_text = self.encode_text([""])
            return self._null_text.to(device).expand(n, -1, -1)
        return None

    def guidance_batch(self, x: Tensor, t: Tensor, cond: Tensor | None, guidance_scale: float
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x, t, cond)`` as the network sees them under guidance: [conditional | unconditional]
        stacked in one batch; unchanged without guidance."""
        if not self.uses_guidance(guidance_scale):
            return x, t, cond
        t = t.reshape(()).expand(x.shape[0]) if t.numel() == 1 else t
        null = self.null_cond(x.shape[0], x.device)
        return torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null.to(cond.dtype)])

    def combine(self, eps: Tensor, guidance_scale: float) -> Tensor:
        """ε_u + w·(ε_c − ε_u) on the output of a :meth:`guidance_batch` batch."""
        if not self.uses_guidance(guidance_scale):
            return eps
        eps_c, eps_u = eps.chunk(2)
        return eps_u + float(guidance_scale) * (eps_c - eps_u)

    def guided(self, x: Tensor, t: Tensor, cond: Tensor | None, guidance_scale: float = 1.0,
               net: nn.Module | None = None) -> Tensor:
        """Guided ε of ``net`` (default: this adapter's network) in one forward. A network that
        takes guidance as an input (a guidance-distilled LCM student, :mod:`lowbit.models.
        guidance`) is called once on the conditional batch with its w-embedding at
        ``guidance_scale`` — no unconditional half."""
        from lowbit.models.guidance import guidance_embedding

        net = net or self.net
        w_embedding = guidance_embedding(net)
        if w_embedding is not None:
            with w_embedding.at(guidance_scale):
                return self.call(net, x, t, cond)
        xb, tb, cb = self.guidance_batch(x, t, cond, guidance_scale)
        return self.combine(self.call(net, xb, tb, cb), guidance_scale)

    # -- conditioning ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Prompt embeddings ``[B, L, D]`` from the pipeline's own text encoder (last hidden state,
        as Stable Diffusion v1 conditions its U-Net)."""
        if self.text_encoder is None:
            raise ValueError(f"model {self.name!r} has no text encoder; prompts need model with "
                             f"conditioning=text")
        device = next(self.text_encoder.parameters()).device
        out = []
        for i in range(0, len(prompts), batch_size):
            tok = self.tokenizer(list(prompts[i : i + batch_size]), padding="max_length",
                                 max_length=self.tokenizer.model_max_length, truncation=True,
                                 return_tensors="pt")
            out.append(self.text_encoder(tok.input_ids.to(device))[0])
        return torch.cat(out)

    def make_cond(self, conditions: Tensor | Sequence[str] | None, n: int) -> Tensor | None:
        """``cond`` for ``n`` samples from what a dataset offers: class labels, prompts, or
        nothing. Labels repeat (0, 1, …, K−1, 0, …) when fewer are given."""
        if self.conditioning == "none":
            return None
        if self.conditioning == "class":
            if conditions is None:
                return torch.arange(n) % self.num_classes
            labels = torch.as_tensor(conditions, dtype=torch.long)
            return labels[torch.arange(n) % len(labels)]
        if conditions is None or isinstance(conditions, Tensor):
            raise ValueError(f"model {self.name!r} is text-conditioned: give prompts "
                             f"(dataset=prompts dataset.path=<captions file>)")
        prompts = [conditions[i % len(conditions)] for i in range(n)]
        return self.encode_text(prompts).cpu()

    # -- latent space ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` from samples (latents are decoded by the VAE)."""
        if not self.latent:
            return z
        dev = next(self.vae.parameters()).device
        out = self.vae.decode(z.to(dev) / self.vae_scale)
        img = out.sample if hasattr(out, "sample") else out[0]
        return img.clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Latents of images in ``[-1, 1]`` (identity for pixel models)."""
        if not self.latent:
            return images
        dev = next(self.vae.parameters()).device
        enc = self.vae.encode(images.to(dev))
        if hasattr(enc, "latent_dist"):
            z = enc.latent_dist.sample(generator) if generator is not None else enc.latent_dist.mode()
        else:  # VQ models return the pre-quantization latents
            z = enc.latents if hasattr(enc, "latents") else enc[0]
        return z * self.vae_scale
