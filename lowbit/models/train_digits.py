"""Train the built-in digits U-Net and digit classifier (Lightning), and record their reference.

    lowbit-train-digits classifier            # ~1 min on 2 CPU cores
    lowbit-train-digits reward_classifier     # RG-LCD's digits reward (seed 1), ~1 min
    lowbit-train-digits unet --steps 3000     # ~10 min on 2 CPU cores
    lowbit-train-digits reference             # FP metrics of the default run → digits_reference.json

Checkpoints are written as safetensors into ``lowbit/assets`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader, TensorDataset

from lowbit.data.digits import load_digits_tensors, split_indices
from lowbit.models.digits import (
    CLASSIFIER_FILE,
    DIGITS_NOISE_SCHEDULE,
    NULL_CLASS,
    REFERENCE_FILE,
    REWARD_CLASSIFIER_FILE,
    UNET_FILE,
    DigitClassifier,
    DigitRewardClassifier,
    asset_path,
    build_digits_unet,
)


def random_shift(x: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero = background = -1 padding)."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    n, _, h, w = x.shape
    dx = torch.randint(0, 2 * max_shift + 1, (n,))
    dy = torch.randint(0, 2 * max_shift + 1, (n,))
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


class ClassifierModule(L.LightningModule):
    def __init__(self, lr: float = 2e-3, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model = model if model is not None else DigitClassifier()
        self.lr = lr

    def training_step(self, batch, _):
        x, y = batch
        x = random_shift(x) + 0.05 * torch.randn_like(x)
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        acc = (self.model(x).argmax(1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=1e-4)


class DiffusionModule(L.LightningModule):
    """ε-prediction DDPM training with label dropout (classifier-free guidance) and an EMA copy."""

    def __init__(self, lr: float = 1e-3, p_uncond: float = 0.1, ema_decay: float = 0.999,
                 max_steps: int = 3000) -> None:
        super().__init__()
        self.unet = build_digits_unet()
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.scheduler = DDPMScheduler(**DIGITS_NOISE_SCHEDULE)
        self.lr, self.p_uncond, self.ema_decay, self.max_steps = lr, p_uncond, ema_decay, max_steps

    def training_step(self, batch, _):
        x0, y = batch
        y = torch.where(torch.rand(y.shape) < self.p_uncond, torch.full_like(y, NULL_CLASS), y)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],))
        xt = self.scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self.unet(xt, t, class_labels=y).sample, noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, *_):
        # warm-up of the EMA decay so early weights do not dominate
        decay = min(self.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.unet.parameters()):
                pe.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.max_steps,
                                                    pct_start=0.05)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def _save(module: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out))


def _trainer(max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_model_summary=False, **kw)


def train_classifier(out_dir: Path, steps: int, seed: int, reward: bool = False) -> dict:
    """The evaluation classifier, or with ``reward`` the reward classifier of RG-LCD (its own
    architecture, :class:`DigitRewardClassifier`; the CLI trains it from seed 1)."""
    L.seed_everything(seed, verbose=False)
    x, y = load_digits_tensors()
    tr, va = split_indices(len(x))
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=128, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(x[va], y[va]), batch_size=512)
    module = ClassifierModule(model=DigitRewardClassifier() if reward else None)
    t0 = time.time()
    trainer = _trainer(steps, check_val_every_n_epoch=10)
    trainer.fit(module, train, val)
    module.eval()
    with torch.no_grad():
        acc = (module.model(x[va]).argmax(1) == y[va]).float().mean().item()
    if reward:
        _save(module.model, out_dir / REWARD_CLASSIFIER_FILE)
        return {"reward_classifier_val_acc": acc, "reward_classifier_steps": steps,
                "reward_classifier_seed": seed, "reward_classifier_train_s": time.time() - t0}
    _save(module.model, out_dir / CLASSIFIER_FILE)
    return {"classifier_val_acc": acc, "classifier_steps": steps, "classifier_train_s": time.time() - t0}


def train_unet(out_dir: Path, steps: int, batch_size: int, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    x, y = load_digits_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True)
    module = DiffusionModule(max_steps=steps)
    t0 = time.time()
    _trainer(steps).fit(module, loader)
    _save(module.ema, out_dir / UNET_FILE)
    return {"unet_steps": steps, "unet_batch_size": batch_size, "unet_train_s": time.time() - t0,
            "unet_params": sum(p.numel() for p in module.unet.parameters())}


def _update_reference(out_dir: Path, entries: dict) -> None:
    path = out_dir / REFERENCE_FILE
    ref = json.loads(path.read_text()) if path.is_file() else {}
    ref.update(entries)
    path.write_text(json.dumps(ref, indent=2, sort_keys=True) + "\n")


def measure_reference(overrides: list[str]) -> dict:
    """Run the FP pipeline at the given overrides and return its metrics."""
    from lowbit.cli import compose_config
    from lowbit.pipeline import run_experiment

    cfg = compose_config(["logger=none", *overrides])
    return run_experiment(cfg)["metrics"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lowbit-train-digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["classifier", "reward_classifier", "unet", "reference"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=None,
                   help="default 0; 1 for reward_classifier (independent of the evaluator)")
    p.add_argument("--out", type=Path, default=asset_path("").parent / "assets")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seed = args.seed if args.seed is not None else int(args.what == "reward_classifier")
    if args.what == "classifier":
        info = train_classifier(args.out, args.steps or 600, seed)
    elif args.what == "reward_classifier":
        info = train_classifier(args.out, args.steps or 600, seed, reward=True)
    elif args.what == "unet":
        info = train_unet(args.out, args.steps or 3000, args.batch_size, seed)
    else:
        # FP numbers of the default run and of the small test setting, recorded beside the weights
        info = {"fp_default": measure_reference([]),
                "fp_test": measure_reference(["metrics.num_samples=200", "sampler=ddim20"])}
    _update_reference(args.out, info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
