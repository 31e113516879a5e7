"""Training data, one batch per optimisation step, each a pure function of the step.

A resumed fit therefore sees exactly the batches an uninterrupted fit would have seen. Batches
are dicts with ``x``, ``t``, ``cond`` (as the network sees them: with guidance the conditional and
unconditional halves stacked, see :meth:`~lowbit.models.adapter.Denoiser.guidance_batch`), the
``step`` they belong to, and optionally ``target`` (the teacher's ε on that input) or ``noise``
and ``x0`` (real images + noise).

- :class:`CachedTrajectoryData` — cached FP trajectories (QuEST);
- :class:`FPTrajectoryData` over an :class:`FPTrajectoryStream` — FP trajectories from pure noise,
  advanced with the FP prediction, one optimiser step per denoising step (EfficientDM);
- :class:`RealImageData` — real images + noise at a random timestep, label dropout for
  classifier-free guidance (QAT on real data: BinaryDM, BiDM, binary baselines).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from diffusers import DDPMScheduler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lowbit.data.trajectories import TrajectorySet
from lowbit.models.adapter import Denoiser
from lowbit.sampling import SamplerConfig, build_scheduler, step_kwargs
from lowbit.train.seeds import generator


def rank_slice(batch: dict[str, Any], rank: int, world: int, halves: int = 1) -> dict[str, Any]:
    """Rank ``rank``'s part of a step's batch when ``world`` processes share it (DDP): every
    tensor split along its first axis into ``world`` equal parts. A batch of ``halves`` stacked
    groups (2 with guidance: [conditional | unconditional]) is split group by group, so each rank
    keeps matching pairs. With losses that are means over samples, the mean of the ranks'
    gradients (what DDP applies) is the gradient of the whole batch."""
    if world == 1:
        return batch
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if not isinstance(v, Tensor) or v.dim() == 0:
            out[k] = v
            continue
        per = v.shape[0] // halves
        if per * halves != v.shape[0]:
            per = -1  # not whole groups: refused below
        m = part_size(per, world, f"{k}: {v.shape[0]} rows in {halves} group(s)")
        parts = [v[h * per + rank * m : h * per + (rank + 1) * m] for h in range(halves)]
        out[k] = parts[0] if halves == 1 else torch.cat(parts)
    return out


def part_size(rows: int, world: int, what: str) -> int:
    """Rows of each of ``world`` equal parts of ``rows``; refused, naming the fix, when they are
    not equal (``what`` says which batch)."""
    if rows < 0 or rows % world:
        raise ValueError(
            f"the step's batch ({what}) cannot be split evenly into {world} parts (processes x "
            f"micro-batches); make the method's batch size a multiple of trainer.devices x "
            f"trainer.num_nodes x trainer.accumulate_grad_batches = {world}")
    return rows // world


def micro_batches(trainer: Any) -> int:
    """Forward/backward passes per optimisation step: the trainer's ``accumulate_grad_batches``
    (an int; Lightning's schedule of changing values is refused)."""
    k = getattr(trainer, "accumulate_grad_batches", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={k!r}: lowbit splits every step's "
                         f"batch into that many micro-batches; give a positive integer")
    return k


class _StepDataset(Dataset):
    """Item ``i`` is micro-batch ``i mod micro`` of step ``i // micro``: with ``micro`` passes
    per step (Lightning's ``accumulate_grad_batches``) rank r's micro-batch m is part
    ``r·micro + m`` of ``world·micro`` — the same rows whatever the mix of processes and
    passes."""

    def __init__(self, batch_fn: Callable[[int, int, int], dict[str, Any]], rank: int = 0,
                 world: int = 1, micro: int = 1) -> None:
        self.batch_fn = batch_fn
        self.rank, self.world, self.micro = rank, world, micro

    def __getitem__(self, index: int) -> dict[str, Any]:
        step, m = divmod(int(index), self.micro)
        batch = dict(self.batch_fn(step, self.rank * self.micro + m, self.world * self.micro))
        batch["step"] = torch.tensor(step)
        return batch

    def __len__(self) -> int:  # indices come from _StepSampler
        return 2**62


class _StepSampler(Sampler[int]):
    """Yields the next ``epoch_steps`` step indices starting at the trainer's global step (read
    when an epoch's iterator is created — after a checkpoint has been restored), each as its
    ``micro`` micro-batch indices (``step·micro + m``)."""

    def __init__(self, start: Callable[[], int], epoch_steps: int, max_steps: int,
                 micro: int = 1) -> None:
        self.start, self.epoch_steps, self.max_steps = start, epoch_steps, max_steps
        self.micro = micro

    def __iter__(self) -> Iterator[int]:
        s = self.start()
        return iter(range(s * self.micro, min(s + self.epoch_steps, self.max_steps) * self.micro))

    def __len__(self) -> int:
        return self.epoch_steps * self.micro


class StepDataModule(L.LightningDataModule):
    """Base of the data modules: ``batch(step)`` defines the data; an epoch of the Trainer is
    ``epoch_steps`` steps (the checkpoint interval). Under DDP every rank builds the same
    ``batch(step)`` and trains on its slice (:func:`rank_slice`); ``halves`` says how many
    stacked groups a batch holds (2 with guidance). With ``trainer.accumulate_grad_batches=k``
    each step's (rank's) batch is cut the same way into k micro-batches, one forward/backward
    pass each, the optimiser stepping once: the step of the whole batch with 1/k of its
    activation memory."""

    epoch_steps: int = 25
    max_steps: int = 0
    halves: int = 1
    _last_batch: tuple[int, dict[str, Any]] | None = None  # (step, batch) its passes share

    def batch(self, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def local_batch(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        """Rank ``rank``'s part of step ``step``'s batch out of ``world``: by default the whole
        batch, sliced (:func:`rank_slice`). A data module whose batches cost compute (the
        teacher's trajectories) overrides it to compute only its rows."""
        if world == 1:
            return self.batch(step)
        last = self._last_batch
        if last is None or last[0] != step:
            last = (step, self.batch(step))
            self._last_batch = last
        return rank_slice(last[1], rank, world, self.halves)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        micro = micro_batches(trainer)
        sampler = _StepSampler(lambda: int(trainer.global_step), self.epoch_steps,
                               self.max_steps or trainer.max_steps, micro)
        return DataLoader(_StepDataset(self.local_batch, int(trainer.global_rank),
                                       int(trainer.world_size), micro),
                          sampler=sampler, batch_size=None, num_workers=0)


class CachedTrajectoryData(StepDataModule):
    """Batches from cached FP trajectories (QuEST): each data epoch visits every (kept step,
    sample) pair once, in ``batch_size`` chunks of one timestep each, in an order drawn from the
    seed stream ``(seed, stream, data epoch)`` — so step ``n``'s batch never depends on what ran
    before."""

    def __init__(self, traj: TrajectorySet, batch_size: int, seed: int = 0,
                 stream: str = "trajectory_order") -> None:
        super().__init__()
        self.traj, self.batch_size, self.seed, self.stream = traj, int(batch_size), int(seed), stream
        n = traj.xt.shape[1]
        self.chunks = math.ceil(n / self.batch_size)
        self.per_epoch = traj.xt.shape[0] * self.chunks
        self.halves = 2 if traj.denoiser.uses_guidance(traj.guidance_scale) else 1
        self._cache: tuple[int, list[tuple[int, Tensor]]] | None = None

    def _epoch_plan(self, epoch: int) -> list[tuple[int, Tensor]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = generator(self.seed, self.stream, epoch)
        n = self.traj.xt.shape[1]
        plan = []
        for s in range(self.traj.xt.shape[0]):
            perm = torch.randperm(n, generator=g)
            plan += [(s, perm[i : i + self.batch_size]) for i in range(0, n, self.batch_size)]
        order = torch.randperm(len(plan), generator=g).tolist()
        plan = [plan[i] for i in order]
        self._cache = (epoch, plan)
        return plan

    def batch(self, step: int) -> dict[str, Any]:
        s, idx = self._epoch_plan(step // self.per_epoch)[step % self.per_epoch]
        return self.traj.batch(s, idx)


class FPTrajectoryStream:
    """x_t along FP sampling trajectories from pure noise, for data-free distillation
    (EfficientDM): step ``n`` is denoising step ``n mod S`` of trajectory ``n // S`` (S = sampler
    steps). Trajectory ``j`` draws its conditions and its noise from the seed stream
    ``(seed, stream, j)``; it advances with the FP model's (guided) prediction, never the
    student's.

    ``__call__(n)`` returns ``x, t, cond`` (cond + uncond halves with guidance) and ``target``,
    the teacher's raw ε on them. Calls in step order cost one teacher forward each; a jump (a
    resumed run) replays the trajectory from its noise, so the result depends on ``n`` only.
    ``denoiser`` is the teacher's adapter; ``conditions`` what the dataset offers to condition
    on (prompts for text models; class models draw labels uniformly).

    ``__call__(n, rank, world)`` is rank ``rank``'s part of that batch when ``world`` processes
    share it (:func:`rank_slice`'s rows): the trajectories are drawn for the whole batch and each
    rank advances only its rows with the teacher, so the teacher's work is split too. A DDIM step
    with η > 0 draws its noise for the whole batch and keeps the rank's rows, so the rows are
    the same whatever the number of processes. Samplers that draw their step noise inside
    diffusers' step (``ddpm``, ``lcm``) advance the whole batch on every rank.
    """

    def __init__(self, denoiser: Denoiser, sampler: SamplerConfig, batch_size: int,
                 seed: int = 0, stream: str = "fp_trajectories",
                 conditions: Sequence[str] | Tensor | None = None) -> None:
        self.denoiser, self.sampler = denoiser, sampler
        self.batch_size, self.seed, self.stream = int(batch_size), int(seed), stream
        self.conditions = conditions
        self.steps = len(build_scheduler(denoiser.noise_schedule, sampler.kind, sampler.steps)
                         .timesteps)
        self.halves = 2 if denoiser.uses_guidance(sampler.guidance_scale) else 1
        # per (rank, world) rows: trajectory j at denoising step i
        self._states: dict[tuple[int, int], dict[str, Any]] = {}

    @property
    def row_local(self) -> bool:
        """Whether a rank can advance its rows alone (the sampler's step noise, if any, is
        drawn here for the whole batch)."""
        return self.sampler.kind not in ("ddpm", "lcm")

    def _rows(self, rank: int, world: int) -> slice:
        m = part_size(self.batch_size, world, f"{self.batch_size} FP trajectories")
        return slice(rank * m, (rank + 1) * m)

    def _draw_cond(self, g: torch.Generator) -> Tensor | None:
        d, n = self.denoiser, self.batch_size
        if d.conditioning == "class":
            return torch.randint(max(d.num_classes, 1), (n,), generator=g)
        if d.conditioning == "text":
            if self.conditions is None:
                raise ValueError(f"model {d.name!r} is text-conditioned: data-free distillation "
                                 f"needs prompts from the dataset")
            idx = torch.randint(len(self.conditions), (n,), generator=g).tolist()
            return d.make_cond([self.conditions[i] for i in idx], n)
        return None

    def _start(self, j: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        g = generator(self.seed, self.stream, j)
        cond = self._draw_cond(g)
        sched = build_scheduler(self.denoiser.noise_schedule, self.sampler.kind,
                                self.sampler.steps)
        x = torch.randn((self.batch_size, *self.denoiser.sample_shape), generator=g)
        rows = self._rows(rank, world)
        return {"j": j, "i": 0, "rows": (rank, world), "slice": rows,
                "x": (x * sched.init_noise_sigma)[rows],
                "cond": cond[rows] if cond is not None else None, "sched": sched, "gen": g}

    @torch.no_grad()
    def _inputs_and_target(self, st: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
        d = self.denoiser
        device = d.device
        t = st["sched"].timesteps[st["i"]]
        x_in = st["sched"].scale_model_input(st["x"], t)
        cond = st["cond"].to(device) if st["cond"] is not None else None
        x, tb, c = d.guidance_batch(x_in.to(device), t.to(device), cond,
                                    self.sampler.guidance_scale)
        return {"x": x, "t": tb, "cond": c}, d.call(d.net, x, tb, c)

    @torch.no_grad()
    def _advance(self, st: dict[str, Any], target: Tensor) -> None:
        """One sampler step with the FP (guided) ε — the trajectory never sees the student."""
        eps = self.denoiser.combine(target, self.sampler.guidance_scale).cpu()
        sched, t = st["sched"], st["sched"].timesteps[st["i"]]
        kw = step_kwargs(sched, self.sampler.eta, st["gen"])
        if st["rows"][1] > 1 and kw.get("eta", 0.0) > 0:
            # DDIM's noise for the whole batch (what diffusers would draw), the rank's rows kept
            full = (self.batch_size, *eps.shape[1:])
            kw["variance_noise"] = torch.randn(full, generator=kw.pop("generator"),
                                               dtype=eps.dtype)[st["slice"]]
        st["x"] = sched.step(eps, t, st["x"], **kw).prev_sample
        st["i"] += 1

    def __call__(self, n: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        if world > 1 and not self.row_local:
            return rank_slice(self(n), rank, world, self.halves)
        j, i = divmod(int(n), self.steps)
        st = self._states.get((rank, world))
        if st is None or st["j"] != j or st["i"] > i:
            st = self._start(j, rank, world)
        while True:
            inputs, target = self._inputs_and_target(st)
            if st["i"] == i:
                break
            self._advance(st, target)
        batch = {**inputs, "target": target}
        self._advance(st, target)  # ready for step n + 1
        self._states[(rank, world)] = st
        return batch


class FPTrajectoryData(StepDataModule):
    """On-the-fly FP trajectories (:class:`FPTrajectoryStream`) as a Lightning data module."""

    def __init__(self, stream: FPTrajectoryStream) -> None:
        super().__init__()
        self.stream = stream
        self.halves = stream.halves

    def batch(self, step: int) -> dict[str, Any]:
        return self.stream(step)

    def local_batch(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
        if not self.stream.row_local:  # the whole batch, built once for the step's passes
            return super().local_batch(step, rank, world)
        return self.stream(step, rank, world)  # the teacher runs on this rank's rows only


class NoiseSchedule:
    """The forward process q(x_t | x_0) of a model's noise schedule (DDPM ᾱ_t)."""

    def __init__(self, noise_schedule: dict) -> None:
        # the pipeline's scheduler config (DDIM, PNDM …): from_config keeps the schedule's keys
        # and ignores the sampler's own (set_alpha_to_one, skip_prk_steps, …)
        sched = DDPMScheduler.from_config(noise_schedule)
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = sched.alphas_cumprod.clone().float()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """√ᾱ_t·x₀ + √(1−ᾱ_t)·ε."""
        a = self.alphas_cumprod.to(x0.device)[t.to(x0.device)].reshape(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _labels_for(denoiser: Denoiser, labels: Tensor | None) -> Tensor | None:
    if denoiser.conditioning == "class":
        if labels is None:
            raise ValueError(f"model {denoiser.name!r} is class-conditional but the dataset has "
                             f"no labels; choose a class dataset")
        return labels
    if denoiser.conditioning == "text":
        if labels is None or labels.dim() != 3:
            raise ValueError(f"model {denoiser.name!r} is text-conditioned: real images need "
                             f"their caption embeddings [N, L, D] (a captioned dataset: "
                             f"dataset=image_folder dataset.captions=<metadata file>)")
        return labels
    return None


class RealImageData(StepDataModule):
    """Real images + noise (QAT on real data). Data epoch ``e`` is a permutation of the images
    drawn from ``(seed, stream + "/order", e)``; step ``n`` takes the ``n mod per_epoch``-th
    chunk of ``batch_size`` (the remainder is dropped) and draws label dropout (to the null
    class, probability ``p_uncond``), noise and timesteps from ``(seed, stream + "/noise", n)``.
    Latent models train on the VAE latents of the images (``denoiser.encode``)."""

    def __init__(self, denoiser: Denoiser, images: Tensor, labels: Tensor | None,
                 batch_size: int, seed: int = 0, p_uncond: float = 0.1,
                 stream: str = "real_images") -> None:
        super().__init__()
        if len(images) < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(images)} images")
        self.denoiser = denoiser
        self.images, self.labels = images, _labels_for(denoiser, labels)
        self.batch_size, self.seed, self.stream = int(batch_size), int(seed), stream
        self.p_uncond = float(p_uncond)
        self.schedule = NoiseSchedule(denoiser.noise_schedule)
        self.per_epoch = len(images) // self.batch_size
        self._perm: tuple[int, Tensor] | None = None

    def _order(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = generator(self.seed, f"{self.stream}/order", epoch)
            self._perm = (epoch, torch.randperm(len(self.images), generator=g))
        return self._perm[1]

    def batch(self, step: int) -> dict[str, Any]:
        epoch, k = divmod(int(step), self.per_epoch)
        idx = self._order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        g = generator(self.seed, f"{self.stream}/noise", step)
        x0 = self.images[idx]
        if self.denoiser.latent:
            x0 = self.denoiser.encode(x0).cpu()
        y = self.labels[idx] if self.labels is not None else None
        null = (None if y is None or self.p_uncond <= 0 else
                self.denoiser.null_cond(len(idx), torch.device("cpu"))
                if self.denoiser.conditioning == "text" or self.denoiser.null_class is not None
                else None)
        if null is not None:  # label / caption dropout to the null condition of guidance
            drop = torch.rand(y.shape[:1], generator=g) < self.p_uncond
            y = torch.where(drop.reshape(-1, *[1] * (y.dim() - 1)), null.to(y.dtype), y)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(idx),), generator=g)
        return {"x": self.schedule.add_noise(x0, noise, t), "t": t, "cond": y, "x0": x0,
                "noise": noise}


def real_calibration_batches(denoiser: Denoiser, images: Tensor, labels: Tensor | None,
                             n: int, batch_size: int, seed: int,
                             stream: str = "calibration") -> Iterator[dict[str, Tensor]]:
    """Noised real images as network kwargs for activation-range calibration: ``ceil(n /
    batch_size)`` batches, one timestep each (spread over the schedule) so that timestep-aware
    quantizers calibrate too. Draws from the seed stream ``(seed, stream)``."""
    g = generator(seed, stream)
    schedule = NoiseSchedule(denoiser.noise_schedule)
    labels = _labels_for(denoiser, labels)
    n_batches = max(1, math.ceil(n / batch_size))
    ts = torch.linspace(0, schedule.num_train_timesteps - 1, n_batches).round().long()
    for t in ts:
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0 = images[idx]
        if denoiser.latent:
            x0 = denoiser.encode(x0).cpu()
        noise = torch.randn(x0.shape, generator=g)
        tb = t.expand(batch_size)
        y = labels[idx] if labels is not None else None
        yield denoiser.inputs(schedule.add_noise(x0, noise, tb), tb, y)
