"""RG-LCD's latent proxy reward: a small network on the model's latents, trained to agree with an
expert reward's preferences, so reward guidance needs no VAE decode (and no expert model) in the
training step.

``lowbit-train-proxy-reward [overrides] --out <file>`` composes the run config (``model``,
``dataset``, ``reward`` = the expert), draws training examples as RG-LCD's reward sees them —
one-step x̂₀ predictions of the FP teacher from real latents noised at random timesteps, each
paired with a condition drawn independently of its image (so that matching and mismatching
pairs both occur) — scores their decoded images with the expert, and fits the proxy with the
Bradley–Terry preference loss ``−log σ(s_i − s_j)`` over pairs of examples the expert ranks
``i ≻ j``. Held-out agreement (the share of held-out pairs the proxy orders as the expert does)
is written beside the weights. ``reward=latent_proxy reward.checkpoint=<file>`` then guides
RG-LCD with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.config import ConfigError
from lowbit.rewards import Reward

log = logging.getLogger(__name__)

__all__ = ["LatentProxyReward", "LatentRewardNet", "ProxyConfig", "load_proxy",
           "preference_agreement", "train_proxy_reward"]


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy's architecture: latent channels, how it reads the condition (``num_classes``
    > 0: one score per class; ``text_dim`` > 0: the score is the dot product of the latent's
    features with the mean-pooled prompt embedding; neither: one score), and its width."""

    channels: int
    num_classes: int = 0
    text_dim: int = 0
    width: int = 64


class LatentRewardNet(nn.Module):
    """Three strided convolutions, global average pooling, and a condition-aware head."""

    def __init__(self, cfg: ProxyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = int(cfg.width)
        self.body = nn.Sequential(
            nn.Conv2d(cfg.channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if cfg.num_classes > 0:
            self.head = nn.Linear(2 * w, cfg.num_classes)
        else:
            self.head = nn.Linear(2 * w, 1)
        self.text = nn.Linear(cfg.text_dim, 2 * w) if cfg.text_dim > 0 else None

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        f = self.body(z.float())
        if self.cfg.num_classes > 0:
            if cond is None or cond.dim() != 1:
                raise ValueError("this latent proxy scores against class labels: pass them")
            scores = self.head(f)
            # the null class of guidance (= num_classes) scores as the mean over classes
            labels = cond.to(scores.device).long()
            real = labels < self.cfg.num_classes
            picked = scores.gather(1, labels.clamp(max=self.cfg.num_classes - 1).reshape(-1, 1))
            return torch.where(real, picked.squeeze(1), scores.mean(1))
        out = self.head(f).squeeze(1)
        if self.text is not None:
            if cond is None or cond.dim() != 3:
                raise ValueError("this latent proxy scores against prompt embeddings [B, L, D]")
            out = out + (f * self.text(cond.float().mean(1).to(f.device))).sum(1) / f.shape[1]
        return out


def _config_for(denoiser) -> ProxyConfig:
    shape = tuple(denoiser.sample_shape)
    if denoiser.conditioning == "class":
        return ProxyConfig(channels=shape[0], num_classes=int(denoiser.num_classes))
    if denoiser.conditioning == "text":
        return ProxyConfig(channels=shape[0], text_dim=int(denoiser.null_cond(
            1, torch.device("cpu")).shape[-1]))
    return ProxyConfig(channels=shape[0])


def _examples(denoiser, images: Tensor, conditions: Tensor | None, n: int,
              g: torch.Generator, batch_size: int = 64
              ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``n`` one-step x̂₀ predictions of the teacher (latents, clamped as the sampler clamps
    them), the conditions drawn for them independently of the images, and those conditions'
    indices (into ``conditions``: the prompts of a prompt expert)."""
    from lowbit.train.data import NoiseSchedule

    sched = NoiseSchedule(denoiser.noise_schedule)
    clip = bool(denoiser.noise_schedule.get("clip_sample"))
    rng = float(denoiser.noise_schedule.get("clip_sample_range", 1.0))
    zs, cs, ids = [], [], []
    for s in range(0, n, batch_size):
        m = min(batch_size, n - s)
        idx = torch.randint(len(images), (m,), generator=g)
        x0 = images[idx]
        if denoiser.latent:
            x0 = denoiser.encode(x0).cpu()
        cond = None
        if conditions is not None:
            ci = torch.randint(len(conditions), (m,), generator=g)
            cond = conditions[ci]
            ids.append(ci)
        t = torch.randint(0, sched.num_train_timesteps, (m,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)
        with torch.no_grad():
            dev = denoiser.device
            eps = denoiser.output_eps(denoiser.call(denoiser.net, xt.to(dev), t.to(dev),
                                                    None if cond is None else cond.to(dev)))
        a = sched.alphas_cumprod[t].reshape(-1, *[1] * (xt.dim() - 1))
        pred = (xt - (1 - a).sqrt() * eps.cpu().float()) / a.sqrt()
        zs.append(pred.clamp(-rng, rng) if clip else pred)
        if cond is not None:
            cs.append(cond)
    return torch.cat(zs), (torch.cat(cs) if cs else None), (torch.cat(ids) if ids else None)


@torch.no_grad()
def _expert_scores(denoiser, expert: Reward, z: Tensor, cond: Tensor | None,
                   idx: Tensor | None, batch_size: int = 64) -> Tensor:
    out = []
    for s in range(0, len(z), batch_size):
        zb = z[s : s + batch_size]
        images = denoiser.decode(zb.to(denoiser.device)) if denoiser.latent else zb
        batch = {} if cond is None else {"cond": cond[s : s + batch_size],
                                         "image_idx": idx[s : s + batch_size]}
        out.append(expert(images.float(), batch).float().cpu())
    return torch.cat(out)


def preference_agreement(scores: Tensor, expert: Tensor, g: torch.Generator,
                         pairs: int = 20000) -> float:
    """Share of random pairs (with distinct expert scores) that ``scores`` orders as ``expert``."""
    i = torch.randint(len(expert), (pairs,), generator=g)
    j = torch.randint(len(expert), (pairs,), generator=g)
    keep = expert[i] != expert[j]
    i, j = i[keep], j[keep]
    return float(((scores[i] > scores[j]) == (expert[i] > expert[j])).float().mean())


def train_proxy_reward(denoiser, expert: Reward, images: Tensor, conditions: Tensor | None, *,
                       n_train: int = 4096, n_val: int = 1024, steps: int = 1000,
                       batch_size: int = 256, lr: float = 1e-3, seed: int = 0
                       ) -> tuple[LatentRewardNet, dict[str, Any]]:
    """The proxy fitted to ``expert``'s preferences on teacher one-step predictions (see the
    module doc); returns it and its record (agreement on held-out pairs before and after)."""
    g = torch.Generator().manual_seed(seed)
    z, c, idx = _examples(denoiser, images, conditions, n_train + n_val, g)
    r = _expert_scores(denoiser, expert, z, c, idx)
    torch.manual_seed(seed)
    net = LatentRewardNet(_config_for(denoiser))
    val = slice(n_train, n_train + n_val)

    def scores(sl: slice) -> Tensor:
        with torch.no_grad():
            return net(z[sl], None if c is None else c[sl])

    before = preference_agreement(scores(val), r[val], torch.Generator().manual_seed(seed + 1))
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    for _ in range(steps):
        i = torch.randint(n_train, (batch_size,), generator=g)
        j = torch.randint(n_train, (batch_size,), generator=g)
        keep = r[i] != r[j]
        i, j = i[keep], j[keep]
        si = net(z[i], None if c is None else c[i])
        sj = net(z[j], None if c is None else c[j])
        sign = torch.where(r[i] > r[j], 1.0, -1.0)
        loss = F.softplus(-sign * (si - sj)).mean()  # −log σ(±(s_i − s_j))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = preference_agreement(scores(val), r[val], torch.Generator().manual_seed(seed + 1))
    record = {"expert": expert.name, "config": asdict(net.cfg), "n_train": n_train,
              "n_val": n_val, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "val_agreement_init": before, "val_agreement": after,
              "final_loss": float(loss.detach())}
    return net.eval(), record


def save_proxy(net: LatentRewardNet, record: dict[str, Any], out: Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return out


def load_proxy(path: str | Path) -> tuple[LatentRewardNet, dict[str, Any]]:
    """The proxy saved by :func:`save_proxy` (weights + the JSON record beside them)."""
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"{path} (and {meta.name} beside it) not found: train one with "
                                f"lowbit-train-proxy-reward --out {path}")
    record = json.loads(meta.read_text())
    net = LatentRewardNet(ProxyConfig(**record["config"]))
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False), record


class LatentProxyReward(Reward):
    """``reward=latent_proxy``: the proxy's score of the student's one-step prediction in latent
    space (``latent``: RG-LCD skips the decode). Frozen; the gradient flows to the latents."""

    name = "latent_proxy"
    latent = True

    def __init__(self, checkpoint: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.net: LatentRewardNet | None = None
        self.record: dict[str, Any] = {}

    def check(self) -> None:
        if self.net is None:
            if not self.checkpoint:
                raise ConfigError("reward.checkpoint", self.checkpoint, "the latent proxy needs "
                                  "its trained weights", "train one with lowbit-train-proxy-reward "
                                  "--out <file> and pass reward.checkpoint=<file>")
            try:
                self.net, self.record = load_proxy(self.checkpoint)
            except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
                raise ConfigError("reward.checkpoint", self.checkpoint, str(e),
                                  "train one with lowbit-train-proxy-reward --out <file>") from e

    def to(self, device: torch.device) -> LatentProxyReward:
        self.check()
        self.net.to(device)
        return self

    def __call__(self, latents: Tensor, batch: dict[str, Any]) -> Tensor:
        self.check()
        return self.net(latents, batch.get("cond"))


def main(argv: list[str] | None = None) -> int:
    """``lowbit-train-proxy-reward [hydra overrides] --out FILE``."""
    from hydra.utils import instantiate

    from lowbit.cli import compose_config
    from lowbit.methods.base import MethodContext
    from lowbit.methods.binary_qat import real_images
    from lowbit.pipeline import build_dataset
    from lowbit.rewards import build_reward

    ap = argparse.ArgumentParser(prog="lowbit-train-proxy-reward", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides (model=…, reward=<expert>)")
    ap.add_argument("--out", type=Path, required=True, help="weights file (.safetensors)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--n-val", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--split", default="train")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = compose_config(["method=rglcd", *args.overrides])
    expert = build_reward(cfg.get("reward"))
    if expert is None or getattr(expert, "latent", False):
        raise ConfigError("reward", cfg.reward.get("name"), "the expert must score images",
                          "pass reward=digits or reward=clip reward.model_path=<CLIP folder>")
    model = instantiate(cfg.model.loader)
    dataset = build_dataset(cfg)
    ctx = MethodContext(cfg=cfg, output_dir=args.out.parent, cache_dir=Path(cfg.paths.cache_dir),
                        model=model, dataset=dataset)
    images, conditions = real_images(ctx, args.split)
    if hasattr(expert, "captions") and model.conditioning == "text":
        expert.captions = list(dataset.captions(args.split))  # image_idx: the drawn prompts
    net, record = train_proxy_reward(model, expert.to(model.device), images, conditions,
                                     n_train=args.n_train, n_val=args.n_val, steps=args.steps,
                                     batch_size=args.batch_size, lr=args.lr, seed=int(cfg.seed))
    record["model"] = str(cfg.model.name)
    path = save_proxy(net, record, args.out)
    print(json.dumps({"out": str(path), "val_agreement_init": record["val_agreement_init"],
                      "val_agreement": record["val_agreement"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
