"""Peak memory of calibration, AdaRound and fine-tuning on a Stable Diffusion v1.5-sized U-Net.

Random weights, the real SD v1.x U-Net config (``sd_v1_unet(width=320)``: block widths
(320, 640, 1280, 1280), cross-attention width 768, 64×64 latents, 860 M parameters); a random
``[B, 77, 768]`` tensor stands in for the CLIP text encoder's output. Each measurement runs in its
own process (one thread) so that peaks never mix:

- ``calibration``: ``quantize_`` + ``calibrate_`` on one batch of network inputs with the QuEST
  SD recipe's quantizer config (W4A4, timestep-aware MSE activation observers);
- ``adaround``: ``adaround_`` of one block (two iterations) with ``method=ptq``'s settings;
- ``quest`` / ``efficientdm``: two optimisation steps (forward + backward + Adam/AdamW step) of a
  :class:`~lowbit.train.StudentModule` built as the methods build it (QuEST's CMA stage: the
  critical layers' weights and all activation Δ, L_CMA + L_global; EfficientDM: QALoRA rank 32 on
  every quantized layer + TALSQ, guided-ε MSE), driven by a short loop that does what
  Lightning's automatic optimisation does (training_step, backward, optimizer step, zero_grad).

Per run: peak RSS (:class:`lowbit.memory.PeakMemory`), the bytes of parameters, gradients and
optimizer state, the saved activations (``torch.autograd.graph.saved_tensors_hooks``, one count per
storage, parameters excluded) and the peak of live tensor bytes (a dispatch mode that follows every
storage an op creates until it is freed: what ``torch.cuda.max_memory_allocated`` reports on a GPU).
Memory that grows with the batch is measured at two small batches and extrapolated linearly to the
recipes' batch sizes. At SD size the fine-tuning runs keep their saved activations as layouts only
(``--saved zeros``, see :class:`TensorMemory`): the same projection without the host memory::

    python experiments/memory_sd15/measure.py                 # -> results.json next to this file
    python experiments/memory_sd15/measure.py --summarize-only  # the projections and table again
    python experiments/memory_sd15/measure.py --arch tiny --out /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowbit.memory import PeakMemory, rss_mb

HERE = Path(__file__).resolve().parent
GIB = 2**30
GPU_BYTES = 24 * GIB  # a 24 GB card (RTX 3090/4090, A10, L4: 24 GiB)
# CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation: not tensor bytes
GPU_RESERVE = 1 * GIB
STEPS = ("calibration", "adaround", "quest", "efficientdm")
# the environment of every measurement process: one thread; glibc returns every allocation of
# 1 MiB or more to the system when it is freed, so RSS follows the live tensors
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}


# ------------------------------------------------------------------------------------------------
# architecture and inputs
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
    """A U-Net of the SD v1.x family: block widths (w, 2w, 4w, 4w), text width, latent size."""

    name: str
    width: int
    cross_attention_dim: int
    sample_size: int
    seq_len: int


ARCHS = {
    # the real SD v1.5 U-Net: block_out_channels (320, 640, 1280, 1280), CLIP ViT-L/14 width
    "sd15": Arch("sd15", 320, 768, 64, 77),
    "tiny": Arch("tiny", 32, 32, 16, 8),
}

# SD v1.x's scheduler (diffusers' scheduler_config.json of CompVis/stable-diffusion-v1-4)
SD_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "steps_offset": 1,
                     "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True}


def build_unet(arch: Arch, seed: int = 0) -> nn.Module:
    from lowbit.models.presets import build_preset

    return build_preset("sd_v1", seed, width=arch.width,
                        cross_attention_dim=arch.cross_attention_dim,
                        sample_size=arch.sample_size)


def network_inputs(arch: Arch, batch: int, timestep: int = 501, seed: int = 1
                   ) -> dict[str, Tensor]:
    """Forward kwargs of one calibration batch (one timestep), random text states."""
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, arch.sample_size, arch.sample_size, generator=g),
            "timestep": torch.full((batch,), timestep),
            "encoder_hidden_states": torch.randn(batch, arch.seq_len, arch.cross_attention_dim,
                                                 generator=g)}


def train_batch(arch: Arch, batch: int, timestep: int = 501, seed: int = 2) -> dict[str, Any]:
    """A training batch as lowbit's data modules give it: ``x, t, cond`` of ``batch`` network
    inputs — with guidance ``[conditional | unconditional]`` halves (random text states for both;
    an odd ``batch`` has no pairs) — and the ``step``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, arch.sample_size, arch.sample_size, generator=g)
    cond = torch.randn(batch, arch.seq_len, arch.cross_attention_dim, generator=g)
    if batch % 2 == 0:  # the sampler's x and t repeat in the unconditional half
        x = torch.cat([x[: batch // 2]] * 2)
    return {"x": x, "t": torch.full((batch,), timestep), "cond": cond, "step": torch.tensor(0)}


def sd_denoiser(net: nn.Module, arch: Arch):
    """lowbit's adapter around the U-Net; the text encoder is never called (the batches carry
    their text states), so placeholders stand in for it and the tokenizer."""
    from lowbit.models.adapter import Denoiser

    return Denoiser(net=net, noise_schedule=dict(SD_NOISE_SCHEDULE), conditioning="text",
                    sample_shape=(4, arch.sample_size, arch.sample_size), name=arch.name,
                    text_encoder=nn.Identity(), tokenizer=object())


# ------------------------------------------------------------------------------------------------
# the recipes
# ------------------------------------------------------------------------------------------------
RECIPE_OVERRIDES = {
    # QuEST on SD v1.4 (the same U-Net as v1.5): calibration and fine-tuning
    "calibration": ["experiment=quest/sd14_coco"],
    "quest": ["experiment=quest/sd14_coco"],
    # no SD recipe uses AdaRound or EfficientDM: the methods' defaults with SD v1.5's recipe
    # sampler (PLMS 50 steps, guidance 7.5)
    "adaround": ["experiment=deepcache/sd15", "cache=none", "metrics=fidelity", "method=ptq",
                 "method.recon=adaround", "bits=w4a4"],
    "efficientdm": ["experiment=deepcache/sd15", "cache=none", "metrics=fidelity",
                    "method=efficientdm", "bits=w4a4"],
}


def compose(step: str):
    from lowbit.cli import compose_config

    return compose_config(RECIPE_OVERRIDES[step],
                          output_dir=Path(tempfile.gettempdir()) / "lowbit-memory-sd15")


def recipe_sizes(step: str) -> dict[str, Any]:
    """The batch sizes the recipe states, in samples and as the network sees them (guidance
    stacks a conditional and an unconditional half)."""
    from lowbit.methods.ptq import sampler_config

    cfg = compose(step)
    m = cfg.method
    guided = float(sampler_config(cfg).guidance_scale) != 1.0
    halves = 2 if guided else 1
    samples = int(m.batch_size) if step in ("quest", "efficientdm") else int(m.calib_batch_size)
    return {"recipe": " ".join(RECIPE_OVERRIDES[step]), "samples": samples,
            "network_batch": halves * samples, "halves": halves,
            "calib_n": int(m.calib_n), "calib_steps": int(m.calib_steps),
            "calib_inputs": halves * int(m.calib_n) * int(m.calib_steps),
            "max_samples": int(m.max_samples), "sampler_steps": int(cfg.sampler.steps),
            "guidance_scale": float(cfg.sampler.guidance_scale)}


def recipe_quant_config(cfg, timestep_aware: bool, interp: str):
    """The run's quantizer config as the method builds it. Weights use min–max ranges instead of
    the recipes' MSE search (80 candidate grids per channel, minutes on one CPU thread at this
    size): the weight quantizers hold the same tensors either way."""
    from lowbit.methods.ptq import quant_config

    over: dict[str, Any] = {"weight": {"init": "minmax"}}
    if timestep_aware:
        over["act"] = {"timestep_aware": True, "interp": interp}
    return quant_config(cfg).with_overrides(over)


# ------------------------------------------------------------------------------------------------
# accounting
# ------------------------------------------------------------------------------------------------
def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def module_tensors(*modules: nn.Module) -> list[Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def param_bytes(*modules: nn.Module) -> int:
    return storage_bytes(p for m in modules for p in m.parameters())


def param_counts(student: nn.Module, teacher: nn.Module) -> dict[str, int]:
    """Parameter bytes and counts of the student (with its quantizers and adapters) and the
    teacher."""
    return {"param_bytes": param_bytes(student), "teacher_param_bytes": param_bytes(teacher),
            "params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters())}


def grad_bytes(params: Iterable[Tensor]) -> int:
    return storage_bytes(p.grad for p in params if p.grad is not None)


def optimizer_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Optimizer state: the moment tensors (Adam's m and v, shaped like their parameters) and the
    rest (step counters)."""
    moments = other = 0
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, Tensor):
                if k == "step":
                    other += v.numel() * v.element_size()
                else:
                    moments += v.numel() * v.element_size()
    return {"moments": moments, "other": other}


def tensor_tree_bytes(obj: Any) -> int:
    return storage_bytes(t for t in tree_leaves(obj) if isinstance(t, Tensor))


def observer_bytes(model: nn.Module) -> dict[str, int]:
    """What the calibration observers attached to ``model`` keep: exact min/max per scale entry
    and the bounded sample of values per timestep bucket (``lowbit.quant.calibrate``)."""
    from lowbit.quant import act_quantizers

    out = {"observers": 0, "buckets": 0, "minmax": 0, "samples": 0}
    for q in act_quantizers(model):
        obs = q.observer
        if obs is None:
            continue
        out["observers"] += 1
        for st in obs.buckets.values():
            out["buckets"] += 1
            for name in ("xmin", "xmax"):
                out["minmax"] += tensor_tree_bytes(getattr(st, name))
            for name in ("samples", "keys"):
                out["samples"] += tensor_tree_bytes(getattr(st, name))
    out["bytes"] = out["minmax"] + out["samples"]
    return out


def observer_bound_per_bucket(model: nn.Module, max_samples: int) -> int:
    """The most one timestep bucket of all observers can keep, from ``calibrate_``'s rule: G scale
    entries × (min, max) plus G × max_cols samples and max_cols reservoir keys (float32)."""
    from lowbit.quant import act_quantizers

    total = 0
    for q in act_quantizers(model):
        if q.passthrough or q.dynamic:
            continue
        g = max(1, q.num_scales // max(1, getattr(q, "num_buckets", 1)))
        total += 2 * g * 4
        if q.spec.init != "minmax":
            cols = max(16, max_samples // g)
            total += (g * cols + cols) * 4
    return total


def weight_cache_bytes(model: nn.Module) -> int:
    """The quantized weights kept by the eval-mode weight cache (``lowbit.quant.modules``)."""
    from lowbit.quant import QuantModuleMixin

    vals = [m.__dict__["_weight_cache"].value for m in model.modules()
            if isinstance(m, QuantModuleMixin) and m.__dict__.get("_weight_cache") is not None]
    return storage_bytes(v for v in vals if v is not None)


SAVED_MODES = ("memory", "disk", "zeros")


class _Held:
    """A tensor saved for backward but kept out of memory: written to disk (``path``), or only
    its layout (``zeros``: read back as zeros). It lives as long as autograd holds it."""

    __slots__ = ("path", "layout", "__weakref__")

    def __init__(self, path: str | None, layout: tuple) -> None:
        self.path, self.layout = path, layout


@dataclasses.dataclass
class _Saved:
    """One storage saved for backward: its bytes, whether it is still allocated, how many copies
    autograd holds instead of it (``_Held``, the last one for reuse) and whether its bytes count
    as live in their stead."""

    nbytes: int
    allocated: bool = True
    helds: int = 0
    last: weakref.ref | None = None
    virtual: bool = False


class TensorMemory(TorchDispatchMode):
    """Tensor bytes while active, as a GPU would hold them.

    - Live tensors: every storage an op returns counts from then until it is freed (weak
      references), ``peak`` their most at once — the CPU analogue of
      ``torch.cuda.max_memory_allocated`` less the ``known`` tensors that existed before.
      Buffers that kernels allocate internally and never return are not seen (cuDNN/cuBLAS
      workspaces on a GPU are not tensors either).
    - Saved activations (``saved_tensors_hooks``): each storage autograd saves for backward,
      once, from its first save until it is freed; ``saved_peak`` their most at once, ``largest``
      the biggest (bytes, shape, dtype), ``by_module`` the bytes saved inside each kind of module
      (the innermost one running: ``UniformQuantizer[act]`` are the fake-quantization's own
      tensors, ``QuantConv2d`` the quantized input and weight a convolution keeps, ``Attention``
      the attention probabilities …). ``known`` storages (parameters, inputs) are not counted.
    - ``saved``: where saved storages of at least ``min_held_bytes`` stay — ``memory`` (as
      autograd keeps them), ``disk`` (written out, read back for backward: the same gradients)
      or ``zeros`` (only their layout is kept; backward reads zeros of the same layout: the same
      memory, not the same gradients). Either way a batch whose activations do not fit in host
      memory can be measured: while autograd holds a storage kept out of memory its bytes count
      as live (where a GPU keeps it), and the copy read back for backward does not.
    """

    def __init__(self, known: Iterable[Tensor] = (), saved: str = "memory",
                 held_dir: str | Path | None = None, min_held_bytes: int = 2**20,
                 top: int = 5) -> None:
        super().__init__()
        if saved not in SAVED_MODES:
            raise ValueError(f"saved={saved!r}; choose one of {', '.join(SAVED_MODES)}")
        if saved == "disk" and held_dir is None:
            raise ValueError("saved='disk' needs held_dir")
        self._known = {id(st): st for st in (t.untyped_storage() for t in known)}
        self._ignored: dict[int, weakref.ref] = {}  # storages read back for backward
        self._live: dict[int, list] = {}  # id(storage) -> [weakref, bytes]
        self._saved: dict[int, tuple[weakref.ref, _Saved]] = {}
        self.bytes = self.peak = 0
        self.saved_bytes = self.saved_peak = 0
        self.held_bytes = 0
        self.largest: list[tuple[int, list[int], str]] = []
        self.by_module: dict[str, int] = {}
        self._modules: list[nn.Module] = []  # the modules running now, innermost last
        self.top = top
        self.saved_mode = saved
        self.held_dir = None if held_dir is None else Path(held_dir)
        self.min_held_bytes = min_held_bytes
        self._files = 0
        self._quiet = False
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    # -- live tensors ------------------------------------------------------------------------------
    def _add(self, n: int) -> None:
        self.bytes += n
        self.peak = max(self.peak, self.bytes)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]

    def _see(self, t: Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._known or key in self._ignored:
            return
        n = st.nbytes()
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [weakref.ref(st, lambda _r, k=key: self._free(k)), n]
            self._add(n)
        elif entry[1] != n:  # resized in place
            self._add(n - entry[1])
            entry[1] = n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._quiet:
            for t in tree_leaves(out):
                if isinstance(t, Tensor) and t.device.type != "meta":
                    self._see(t)
        return out

    # -- saved for backward ------------------------------------------------------------------------
    def _module_enter(self, module: nn.Module, _args: Any) -> None:
        self._modules.append(module)

    def _module_leave(self, module: nn.Module, _args: Any, _out: Any) -> None:
        while self._modules and self._modules.pop() is not module:
            pass  # a module left by an exception (AdaRound's capture stops the forward pass)

    def _owner(self) -> str:
        if not self._modules:
            return "(no module)"
        m = self._modules[-1]
        role = getattr(m, "is_weight", None)
        return type(m).__name__ + ("" if role is None else "[weight]" if role else "[act]")

    def _storage_freed(self, key: int) -> None:
        _ref, rec = self._saved.pop(key)
        rec.allocated = False
        if rec.helds:  # autograd still holds it
            rec.virtual = True
            self._add(rec.nbytes)
        else:
            self.saved_bytes -= rec.nbytes

    def _held_freed(self, rec: _Saved, path: str | None) -> None:
        if path is not None:
            with contextlib.suppress(OSError):
                os.remove(path)
        rec.helds -= 1
        if rec.helds == 0 and not rec.allocated:
            self.saved_bytes -= rec.nbytes
            if rec.virtual:
                self.bytes -= rec.nbytes

    def _pack(self, t: Tensor) -> Any:
        if t.device.type == "meta":
            return t
        st = t.untyped_storage()
        key = id(st)
        if key in self._known:
            return t
        if key not in self._saved:
            rec = _Saved(st.nbytes())
            self._saved[key] = (weakref.ref(st, lambda _r, k=key: self._storage_freed(k)), rec)
            self.saved_bytes += rec.nbytes
            self.saved_peak = max(self.saved_peak, self.saved_bytes)
            owner = self._owner()
            self.by_module[owner] = self.by_module.get(owner, 0) + rec.nbytes
            if len(self.largest) < self.top or rec.nbytes > self.largest[-1][0]:
                self.largest = sorted([*self.largest, (rec.nbytes, list(t.shape), str(t.dtype))],
                                      key=lambda e: -e[0])[: self.top]
        rec = self._saved[key][1]
        if self.saved_mode == "memory" or rec.nbytes < self.min_held_bytes:
            return t
        layout = (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype,
                  rec.nbytes // t.element_size())
        held = rec.last() if rec.last is not None else None
        if held is not None and held.layout == layout:  # saved again: one copy
            return held
        path = None
        if self.saved_mode == "disk":
            self._files += 1
            path = str(self.held_dir / f"{self._files}.pt")
            self._quiet = True
            try:
                torch.save(t.detach(), path)
            finally:
                self._quiet = False
        held = _Held(path, layout)
        if rec.helds == 0:
            self.held_bytes += rec.nbytes
        rec.helds += 1
        rec.last = weakref.ref(held)
        weakref.finalize(held, self._held_freed, rec, path)
        return held

    def _unpack(self, packed: Any) -> Tensor:
        if not isinstance(packed, _Held):
            return packed
        self._quiet = True
        try:
            if packed.path is not None:
                t = torch.load(packed.path, weights_only=True)
            else:
                shape, stride, offset, dtype, numel = packed.layout
                t = torch.zeros(numel, dtype=dtype).as_strided(shape, stride, offset)
        finally:
            self._quiet = False
        st = t.untyped_storage()
        key = id(st)
        self._ignored[key] = weakref.ref(st, lambda _r, k=key: self._ignored.pop(k, None))
        return t

    def __enter__(self) -> TensorMemory:
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )

        super().__enter__()
        self._hooks.__enter__()
        self._module_hooks = [register_module_forward_pre_hook(self._module_enter),
                              register_module_forward_hook(self._module_leave, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._module_hooks:
            h.remove()
        self._hooks.__exit__(*exc)
        super().__exit__(*exc)


@contextlib.contextmanager
def probed(known: Iterable[Tensor], saved: str = "memory") -> Iterator[dict[str, Any]]:
    """Peak RSS, peak live tensor bytes and saved-activation bytes of the block; ``known``: the
    tensors that already exist (their bytes are the resident part); ``saved``: where saved
    activations stay (:class:`TensorMemory`)."""
    known = list(known)
    out: dict[str, Any] = {"resident_bytes": storage_bytes(known), "rss_before_mib": rss_mb(),
                           "saved_mode": saved}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lowbit-saved-")) \
            if saved == "disk" else None
        pm = stack.enter_context(PeakMemory(torch.device("cpu"), interval_s=0.01))
        mem = stack.enter_context(TensorMemory(known, saved, tmp))
        out["_mem"] = mem
        yield out
    out.pop("_mem")
    out.update(peak_rss_mib=pm.peak_mb, live_peak_bytes=mem.peak, live_end_bytes=mem.bytes,
               saved_bytes=mem.saved_peak, saved_largest=mem.largest,
               saved_by_module=dict(sorted(mem.by_module.items(), key=lambda e: -e[1])),
               held_bytes=mem.held_bytes, seconds=time.perf_counter() - t0)
    out["projected_bytes"] = out["resident_bytes"] + mem.peak


# ------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------
def measure_calibration(arch: Arch, batch: int, max_samples: int | None = None,
                        act_init: str | None = None) -> dict[str, Any]:
    """``quantize_`` + ``calibrate_`` of a copy of the teacher on one batch (QuEST's SD config;
    ``max_samples``: the observers' bound, ``act_init``: the activation range init, default the
    recipe's)."""
    from lowbit.methods.quest import QuESTParams
    from lowbit.quant import calibrate_, quantize_

    cfg = compose("calibration")
    p = QuESTParams.from_cfg(cfg.method)
    max_samples = max_samples or p.max_samples
    qcfg = recipe_quant_config(cfg, True, p.interp)
    if act_init is not None:
        qcfg = qcfg.with_overrides({"act": {"init": act_init}})
    teacher = build_unet(arch)
    student = copy.deepcopy(teacher)  # build_student's copy
    inputs = network_inputs(arch, batch)
    seen: dict[str, Any] = {}

    def read_observers(model: nn.Module, _args: tuple, _kwargs: dict, _out: Any) -> None:
        seen.update(observer_bytes(model))

    with probed(module_tensors(teacher, student) + list(inputs.values())) as res:
        quantize_(student, qcfg)
        hook = student.register_forward_hook(read_observers, with_kwargs=True)
        cal = calibrate_(student, [inputs], max_samples=max_samples)
        hook.remove()
    res.update(batch=batch, **param_counts(student, teacher),
               weight_cache_bytes=weight_cache_bytes(student), observer=seen,
               observer_bound_per_bucket=observer_bound_per_bucket(student, max_samples),
               calibrated=cal.calibrated, quant=qcfg.label() if hasattr(qcfg, "label") else "")
    return res


def adaround_units(model: nn.Module) -> dict[str, str]:
    """The reconstruction units measured: the one with the most weights, and the transformer
    block at the highest resolution (the largest activations: 8 heads × (HW)² scores)."""
    from lowbit.quant.adaround import AdaRoundConfig, reconstruction_units

    units = reconstruction_units(model, AdaRoundConfig())
    # ties (the up path's 2560 → 1280 ResNets) go to the last: the highest resolution
    by_params = max(reversed(units), key=lambda u: sum(p.numel() for p in u[1].parameters()))[0]
    return {"params": by_params, "activations": "down_blocks.0.attentions.0.transformer_blocks.0"}


def measure_adaround(arch: Arch, batch: int, unit: str) -> dict[str, Any]:
    """``adaround_`` of one unit on one captured batch, two iterations (the second with the
    rounding regulariser), ``method=ptq``'s quantizer config."""
    from lowbit.methods.ptq import PTQParams
    from lowbit.quant import quant_disabled, quantize_
    from lowbit.quant.adaround import AdaRoundConfig, _run_unit, adaround_, capture_inputs

    cfg = compose("adaround")
    p = PTQParams.from_cfg(cfg.method)
    qcfg = recipe_quant_config(cfg, False, "nearest")
    teacher = build_unet(arch)
    student = copy.deepcopy(teacher)
    quantize_(student, qcfg)
    name = adaround_units(student)[unit]
    block = student.get_submodule(name)
    inputs = network_inputs(arch, batch)
    ar = AdaRoundConfig.from_dict({**dict(p.adaround), "iters": 2, "warmup": 0.25,
                                   "include": [name]})
    known = module_tensors(teacher, student) + list(inputs.values())
    with probed(known) as res:
        result = adaround_(student, [inputs], ar, progress=False)
    # what adaround_ keeps per captured batch: the unit's FP inputs, its inputs from the
    # partly quantized model (input_from=quant) and the FP outputs (targets)
    with torch.no_grad(), quant_disabled(student, weight=False):
        cap = capture_inputs(student, block, [inputs])
        in_bytes = tensor_tree_bytes((cap[0].args, cap[0].kwargs))
        out_bytes = tensor_tree_bytes(_run_unit(block, cap[0], torch.device("cpu")))
    copies = 2 if ar.input_from == "quant" else 1
    res.update(batch=batch, unit=name, unit_kind=unit, unit_params=sum(
        q.numel() for q in block.parameters()), **param_counts(student, teacher),
        captured_bytes=copies * in_bytes + out_bytes,
        unit_input_bytes=in_bytes, unit_output_bytes=out_bytes,
        loss_nearest=result.units[0].loss_nearest, loss_final=result.units[0].loss_final)
    # V (one per weight), its gradient and Adam's two moments
    res["rounding_bytes"] = 4 * sum(
        q.numel() for n, q in block.named_parameters() if n.endswith("weight") and q.dim() > 1)
    return res


def _quest_module(cfg, student: nn.Module, teacher: nn.Module, denoiser):
    """QuEST's CMA stage as :meth:`QuEST.prepare` builds it."""
    from lowbit.methods.quest import QuEST
    from lowbit.train import StudentModule, TeacherMSE
    from lowbit.train.hparams import instantiate_partial

    method = QuEST(cfg.method)
    p, sc = method.params, method.params.cma
    groups, local = method.stage_groups(student, "cma", str(cfg.model.name), denoiser.family,
                                        cfg.model.get("quest_critical_layers"))
    terms = [TeacherMSE(sc.global_weight), local.resolve(student, teacher)]
    return StudentModule(student, teacher, denoiser, groups, terms, max_steps=sc.steps,
                         optimizer=instantiate_partial(p.optimizer, "method.optimizer"),
                         scheduler=instantiate_partial(p.scheduler, "method.scheduler"),
                         grad_clip=p.grad_clip)


def _efficientdm_module(cfg, student: nn.Module, teacher: nn.Module, denoiser):
    """EfficientDM's TALSQ buckets, QALoRA and parameter groups as
    :meth:`EfficientDM.prepare` builds them."""
    from lowbit.methods.efficientdm import EfficientDM, talsq_buckets_
    from lowbit.sampling import build_scheduler
    from lowbit.train import StudentModule, TeacherMSE

    method = EfficientDM(cfg.method)
    p = method.params
    sampler = method.train_sampler(type("Ctx", (), {"cfg": cfg})())
    if p.talsq:
        talsq_buckets_(student, build_scheduler(denoiser.noise_schedule, sampler.kind,
                                                sampler.steps).timesteps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapted = method.adapt_(student)
    groups = method.param_groups(student, adapted)
    return StudentModule(student, teacher, denoiser, groups,
                         [TeacherMSE(guidance_scale=sampler.guidance_scale)], max_steps=p.steps,
                         optimizer=p.build_optimizer(), scheduler=p.build_scheduler(),
                         grad_clip=p.grad_clip)


def group_sizes(groups) -> dict[str, dict[str, int]]:
    """Parameter groups by kind (the name before ``/``): how many groups, how many values."""
    out: dict[str, dict[str, int]] = {}
    for g in groups:
        e = out.setdefault(g.name.split("/")[0], {"groups": 0, "numel": 0})
        e["groups"] += 1
        e["numel"] += g.numel
    return out


def measure_finetune(arch: Arch, batch: int, method: str, steps: int = 2,
                     saved: str = "memory", act_init: str | None = None,
                     checkpointing: bool = False) -> dict[str, Any]:
    """``steps`` optimisation steps of QuEST's or EfficientDM's StudentModule on network batches
    of ``batch``: what Lightning's automatic optimisation runs per step (zero_grad,
    training_step, backward, optimizer step, scheduler step). EfficientDM's batches carry the
    teacher's ε as ``target`` (computed by its FP trajectory stream, a no-grad teacher forward,
    done here inside the step). ``act_init``: replaces the recipe's activation range init of the
    PTQ student (``minmax`` is quicker than ``mse`` and holds the same tensors)."""
    from lowbit.methods.quest import QuESTParams
    from lowbit.quant import calibrate_, quantize_

    cfg = compose(method)
    interp = QuESTParams.from_cfg(cfg.method).interp if method == "quest" else \
        str(cfg.method.interp)
    qcfg = recipe_quant_config(cfg, True, interp)
    if act_init is not None:
        qcfg = qcfg.with_overrides({"act": {"init": act_init}})
    teacher = build_unet(arch)
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    quantize_(student, qcfg)
    data = train_batch(arch, batch)
    denoiser = sd_denoiser(teacher, arch)
    with torch.no_grad():  # the PTQ student the methods start from
        calibrate_(student, [denoiser.inputs(data["x"], data["t"], data["cond"])],
                   max_samples=int(cfg.method.max_samples))
    build = _quest_module if method == "quest" else _efficientdm_module
    module = build(cfg, student, teacher, denoiser)
    if checkpointing:  # what fit() does with trainer.gradient_checkpointing=true
        from lowbit.train.fit import set_gradient_checkpointing_

        set_gradient_checkpointing_(module.student, True)
    module.setup("fit")
    module.on_fit_start()
    conf = module.configure_optimizers()
    opt = conf["optimizer"] if isinstance(conf, dict) else conf
    sched = conf["lr_scheduler"]["scheduler"] if isinstance(conf, dict) else None
    trainable = [q for g in module.groups for _, q in g.params]
    known = module_tensors(teacher, module) + [v for v in data.values() if isinstance(v, Tensor)]
    per_step: list[dict[str, Any]] = []
    with probed(known, saved) as res:
        mem = res["_mem"]
        for _ in range(steps):
            mem.by_module = {}  # the last step's breakdown
            opt.zero_grad(set_to_none=True)
            batch_data = dict(data)
            if method == "efficientdm":  # the FP trajectory stream's target
                with torch.no_grad():
                    batch_data["target"] = denoiser.call(teacher, data["x"], data["t"],
                                                         data["cond"])
            loss = module.training_step(batch_data, 0)
            saved_now = mem.saved_bytes  # this step's graph: the previous one is freed
            loss.backward()
            grads = grad_bytes(trainable)
            opt.step()
            if sched is not None:
                sched.step()
            per_step.append({"loss": float(loss.detach()), "saved_bytes": saved_now,
                             "grad_bytes": grads})
            del loss
    ob = optimizer_bytes(opt)
    res.update(batch=batch, samples=batch // 2 if batch % 2 == 0 else batch,
               **param_counts(module.student, teacher),
               trainable_params=sum(q.numel() for q in trainable),
               trainable_param_bytes=storage_bytes(trainable), grad_bytes=per_step[-1]["grad_bytes"],
               optimizer_moment_bytes=ob["moments"], optimizer_other_bytes=ob["other"],
               steps=per_step, groups=group_sizes(module.groups))
    if checkpointing:
        res["unit_kind"] = "checkpointing"
    return res


def measure(step: str, arch: Arch, batch: int, unit: str = "params", saved: str = "memory"
            ) -> dict[str, Any]:
    """One measurement in this process (``saved``: where fine-tuning's saved activations stay,
    see :class:`TensorMemory`)."""
    torch.manual_seed(0)
    if step == "calibration":
        return measure_calibration(arch, batch)
    if step == "adaround":
        return measure_adaround(arch, batch, unit)
    if step in ("quest", "efficientdm"):
        return measure_finetune(arch, batch, step, saved=saved,
                                checkpointing=unit == "checkpointing")
    raise ValueError(f"unknown step {step!r}; choose one of {', '.join(STEPS)}")


# ------------------------------------------------------------------------------------------------
# isolation, extrapolation, table
# ------------------------------------------------------------------------------------------------
def run_isolated(step: str, arch: str, batch: int, unit: str = "params", saved: str = "memory",
                 timeout: float = 3600) -> dict[str, Any]:
    """:func:`measure` in a fresh process (one thread), so that its peak is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", step, "--arch", arch,
               "--batch", str(batch), "--unit", unit, "--saved", saved, "--out", str(out)]
        env = {**os.environ, **CHILD_ENV}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{step} (batch {batch}) failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def linear(b1: int, v1: float, b2: int, v2: float) -> tuple[float, float]:
    """Intercept and slope of the line through (b1, v1), (b2, v2)."""
    slope = (v2 - v1) / (b2 - b1)
    return v1 - slope * b1, slope


def fit(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """``key`` of two runs as intercept + slope × network batch."""
    return linear(runs[0]["batch"], runs[0][key], runs[1]["batch"], runs[1][key])


def project(runs: list[dict[str, Any]], key: str, batch: int) -> float:
    a, s = fit(runs, key)
    return a + s * batch


def max_batch(runs: list[dict[str, Any]], key: str, budget: float, extra: float = 0.0,
              step: int = 1) -> int:
    """The largest network batch (a multiple of ``step``) whose projected ``key`` + ``extra``
    stays within ``budget`` (0: none; -1: ``key`` does not grow with the batch)."""
    a, s = fit(runs, key)
    if s <= 0:
        return -1
    return max(0, int(math.floor((budget - a - extra) / s)) // step * step)


def verdict(nbytes: float) -> str:
    return "fits" if nbytes + GPU_RESERVE <= GPU_BYTES else "exceeds"


BUDGET = GPU_BYTES - GPU_RESERVE


def summarize(step: str, runs: list[dict[str, Any]], rec: dict[str, Any]) -> dict[str, Any]:
    """One step at the recipe's batch: every batch-dependent quantity projected linearly in the
    network batch from the two measured runs, plus what grows with the calibration set instead
    (observer buckets, AdaRound's captured inputs)."""
    b, halves = rec["network_batch"], rec["halves"]
    last = runs[-1]
    out: dict[str, Any] = {"step": step, "recipe": rec, "measured_batches": [r["batch"] for r in runs],
                           "recipe_network_batch": b,
                           "peak_rss_mib": [r["peak_rss_mib"] for r in runs],
                           "saved_mode": last.get("saved_mode", "memory")}
    for k in ("params", "teacher_params", "param_bytes", "teacher_param_bytes",
              "trainable_params", "trainable_param_bytes", "grad_bytes", "optimizer_moment_bytes",
              "optimizer_other_bytes", "weight_cache_bytes", "unit", "unit_params",
              "rounding_bytes", "saved_largest", "saved_by_module", "groups", "unit_kind"):
        if k in last:
            out[k] = last[k]
    out["saved_bytes_fixed"], out["saved_bytes_per_network_sample"] = fit(runs, "saved_bytes")
    out["saved_bytes"] = project(runs, "saved_bytes", b)
    out["live_bytes_fixed"], out["live_bytes_per_network_sample"] = fit(runs, "projected_bytes")
    extra = 0.0
    if step == "calibration":
        per_bucket = last["observer_bound_per_bucket"]
        out["observer_bytes_measured"] = last["observer"]["bytes"]
        out["observer_bound_per_bucket"] = per_bucket
        # one bucket per kept step, each bounded by max_samples per quantizer
        out["observer_bytes_full_calibration"] = per_bucket * rec["calib_steps"]
        extra = out["observer_bytes_full_calibration"] - last["observer"]["bytes"]
    if step == "adaround":
        for r in runs:
            r["without_captured_bytes"] = r["projected_bytes"] - r["captured_bytes"]
            r["moved_bytes"] = r["unit_input_bytes"] + r["unit_output_bytes"]
        a, s = fit(runs, "captured_bytes")
        out["captured_bytes_per_network_sample"] = s
        # adaround_ keeps every calibration input's unit inputs (FP and partly quantized) and
        # FP outputs, on the model's device unless adaround.store_device says otherwise
        out["captured_bytes_full_calibration"] = a + s * rec["calib_inputs"]
        base = project(runs, "without_captured_bytes", b)
        out["projected_gpu_bytes"] = base + out["captured_bytes_full_calibration"]
        out["max_network_batch"] = max_batch(runs, "without_captured_bytes", BUDGET,
                                             out["captured_bytes_full_calibration"], halves)
        # adaround.store_device=cpu: the captured set in host memory, one batch on the device
        for r in runs:
            r["store_cpu_bytes"] = r["without_captured_bytes"] + r["moved_bytes"]
        out["store_cpu"] = {"projected_gpu_bytes": project(runs, "store_cpu_bytes", b),
                            "host_bytes": out["captured_bytes_full_calibration"],
                            "max_network_batch": max_batch(runs, "store_cpu_bytes", BUDGET,
                                                           0.0, halves)}
        out["store_cpu"]["verdict"] = verdict(out["store_cpu"]["projected_gpu_bytes"])
        out["store_cpu"]["max_samples_per_batch"] = out["store_cpu"]["max_network_batch"] // halves
    else:
        out["projected_gpu_bytes"] = project(runs, "projected_bytes", b) + extra
        out["max_network_batch"] = max_batch(runs, "projected_bytes", BUDGET, extra, halves)
    out["max_samples_per_batch"] = out["max_network_batch"] // halves
    out["verdict"] = verdict(out["projected_gpu_bytes"])
    out["runs"] = runs
    return out


def gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GIB:.2f}"


def table(summaries: list[dict[str, Any]]) -> str:
    """The README's table (GiB)."""
    cols = ["step", "recipe batch (samples → network)", "measured at (network batch)",
            "peak RSS at those batches", "params student + teacher", "grads + optimizer state",
            "saved activations: fixed + per network sample → at recipe batch",
            "other held on the GPU", "projected GPU at recipe batch", "verdict (24 GB)",
            "largest batch that fits (samples)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(name: str, s: dict[str, Any], other: list[str], proj: float, verdict_: str,
            max_samples: int) -> str:
        rec = s["recipe"]
        opt = s.get("optimizer_moment_bytes", 0) + s.get("optimizer_other_bytes", 0)
        cells = [
            name, f"{rec['samples']} → {s['recipe_network_batch']}",
            ", ".join(str(x) for x in s["measured_batches"]),
            " / ".join(f"{m / 1024:.1f}" for m in s["peak_rss_mib"]),
            f"{gib(s['param_bytes'])} + {gib(s['teacher_param_bytes'])}",
            f"{gib(s.get('grad_bytes', 0))} + {gib(opt)}",
            f"{gib(s['saved_bytes_fixed'])} + {gib(s['saved_bytes_per_network_sample'])} → "
            f"{gib(s['saved_bytes'])}",
            ", ".join(other) or "–", gib(proj), verdict_,
            str(max_samples) if max_samples > 0 else "none"]
        return "| " + " | ".join(cells) + " |"

    for s in summaries:
        other = []
        if "weight_cache_bytes" in s:
            other.append(f"weight cache {gib(s['weight_cache_bytes'])}")
        if "observer_bytes_full_calibration" in s:
            other.append(f"observers {gib(s['observer_bytes_full_calibration'])} "
                         f"({s['recipe']['calib_steps']} buckets)")
        name = s["step"]
        if s["step"] == "adaround":
            name = f"adaround `{s['unit']}`"
            other.append(f"V {gib(s['rounding_bytes'])}")
            lines.append(row(name, s, [*other, f"captured inputs "
                                       f"{gib(s['captured_bytes_full_calibration'])}"],
                             s["projected_gpu_bytes"], s["verdict"], s["max_samples_per_batch"]))
            c = s["store_cpu"]
            lines.append(row(name + " with `adaround.store_device=cpu`", s,
                             [*other, f"captured inputs in host memory {gib(c['host_bytes'])}"],
                             c["projected_gpu_bytes"], c["verdict"], c["max_samples_per_batch"]))
            continue
        if s.get("unit_kind") == "checkpointing":
            name += " with `trainer.gradient_checkpointing=true`"
        lines.append(row(name, s, other, s["projected_gpu_bytes"], s["verdict"],
                         s["max_samples_per_batch"]))
    return "\n".join(lines)


def plan() -> list[tuple[str, str | None]]:
    """(step, variant) in table order: AdaRound's two units; the fine-tuning steps as the
    recipes run them and with ``trainer.gradient_checkpointing=true``."""
    variants = {"adaround": ("params", "activations"), "quest": (None, "checkpointing"),
                "efficientdm": (None, "checkpointing")}
    return [(step, unit) for step in STEPS for unit in variants.get(step, (None,))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sd15", choices=sorted(ARCHS))
    ap.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS,
                    help="the steps to measure; the others are taken from --out if it holds them")
    ap.add_argument("--summarize-only", action="store_true",
                    help="measure nothing: project and tabulate the runs that --out holds")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--one", choices=STEPS, help="(internal) one measurement in this process")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--unit", default="params", choices=("params", "activations", "checkpointing"))
    ap.add_argument("--saved", choices=SAVED_MODES, default=None,
                    help="where fine-tuning's saved activations stay (default: zeros at SD size, "
                         "where they do not fit in this machine's memory; memory otherwise)")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="only these variants of the --steps (plain, checkpointing, params, "
                         "activations); the others are taken from --out")
    args = ap.parse_args(argv)
    if args.one:
        torch.set_num_threads(1)
        res = measure(args.one, ARCHS[args.arch], args.batch, args.unit, args.saved or "memory")
        args.out.write_text(json.dumps(res, indent=1))
        return 0
    arch = ARCHS[args.arch]
    old: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    if args.out.is_file():
        prev = json.loads(args.out.read_text())
        if prev.get("arch", {}).get("name") == arch.name:
            old = {(s["step"], s["runs"][0].get("unit_kind")): s["runs"] for s in prev["steps"]}
    summaries: list[dict[str, Any]] = []
    for step, unit in plan():
        if args.summarize_only or step not in args.steps:
            if (step, unit) not in old:
                continue
            runs = old[(step, unit)]
        else:
            # EfficientDM's loss guides ε from [cond | uncond] pairs: even network batches
            runs = []
            if args.variants and (unit or "plain") not in args.variants:
                if (step, unit) not in old:
                    continue
                summaries.append(summarize(step, old[(step, unit)], recipe_sizes(step)))
                continue
            try:
                for b in ([2, 4] if step == "efficientdm" else [1, 2]):
                    print(f"{step}{f' ({unit})' if unit else ''}: network batch {b} …",
                          flush=True)
                    # checkpointing keeps its saved tensors itself: held, not laid out
                    saved = args.saved or ("zeros" if arch.name == "sd15"
                                           and unit != "checkpointing" else "memory")
                    runs.append(run_isolated(step, arch.name, b, unit or "params", saved))
            except RuntimeError as e:  # e.g. killed for this machine's memory: kept as is
                print(f"  {step} ({unit}): not measured: {str(e)[:300]}", flush=True)
                if (step, unit) in old:
                    summaries.append(summarize(step, old[(step, unit)], recipe_sizes(step)))
                continue
        s = summarize(step, runs, recipe_sizes(step))
        summaries.append(s)
        print(f"  {step}: {gib(s['projected_gpu_bytes'])} GiB at network batch "
              f"{s['recipe_network_batch']}: {s['verdict']}", flush=True)
        # each finished step is kept at once, with the earlier results of the steps to come
        later = [summarize(st, old[(st, u)], recipe_sizes(st)) for st, u in
                 plan()[plan().index((step, unit)) + 1 :] if (st, u) in old]
        _write(args.out, arch, summaries + later)
    _write(args.out, arch, summaries)
    print(table(summaries))
    return 0


def _write(out: Path, arch: Arch, summaries: list[dict[str, Any]]) -> None:
    result = {"arch": dataclasses.asdict(arch), "torch": torch.__version__,
              "gpu_bytes": GPU_BYTES, "gpu_reserve_bytes": GPU_RESERVE,
              "child_env": CHILD_ENV, "steps": summaries}
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
