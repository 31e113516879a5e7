"""``method=bidm``: BiDM (Zheng et al., NeurIPS 2024) — fully binarized W1A1 diffusion models.

**TBS** (Timestep-friendly Binary Structure), ``method.tbs``:

- every 1-bit Conv/Linear becomes ``conv(sign(x + t_c), sign(W))·α ⊙ (k ∗ mean_c|x|) + s ⊙ P(x)``
  (:class:`~lowbit.quant.binary.BinaryConv2d`): learnable per-input-channel threshold t_c with the
  piecewise-quadratic STE, α = mean|W| per output channel (detached: weight binarizer kind
  ``bidm``), learnable k×k filter k (init 1/k²), and a real-valued shortcut ``|s| ⊙ P(x)``
  (:class:`BinaryShortcut`, shortcut kinds registered here) with learnable s (init 0.3;
  ``method.shortcut``: ``conv`` (default) a real learned 1×1 conv when the channel counts
  differ, ``identity`` the parameter-free channel/stride map);
- cross-timestep feature connection (:class:`CrossTimestepBlock`): the outputs of the last
  ``ctc_blocks`` up-path timestep blocks become ``(1−α)·current + α·previous``, α learnable per
  block and timestep bucket (init 0.3), ``previous`` the block's output at the previous denoising
  step (detached). The wrapper keeps it between denoiser calls — no sampler edits — and forgets it
  when a call's timestep is not below the previous call's (a new trajectory starts at the highest
  timestep) or the batch changes. Training produces it by a student pass at ``t + ctc_offset`` on
  the same clean image and noise first (about 2× compute per step).

**SPD** (Space Patched Distillation), ``method.spd``: FP and student timestep-block outputs are
cut into p×p patches; per patch the Gram map ``A = P·Pᵀ`` over the p² positions is L2-normalised
and the mean L2 distance between student and FP maps, over patches and blocks, weight λ = 1e-2,
is added to the diffusion loss.

``tbs=false`` leaves XNOR's binary layers (``sign(x)``, ``α·sign(W)``, no shortcut, no
cross-timestep connection): the paper's ablation baseline. Not copied: the reference
``BNNLinear`` that ignored its threshold in the forward pass.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.methods.base import MethodContext
from lowbit.methods.binary_qat import BinaryQAT, BinaryQATParams
from lowbit.quant.binary import (
    BinarySpec,
    SignWeightBinarizer,
    register_shortcut,
    register_weight_binarizer,
)
from lowbit.quant.channels import channel_map
from lowbit.quant.qmap import register_module_class
from lowbit.train import LossTerm, NoiseSchedule, StepOutputs, as_tensor, timestep_blocks
from lowbit.train.hparams import HParamError

CTC_HOOK_ATTR = "_lowbit_cross_timestep_hook"


# ------------------------------------------------------------------------------------------------
# the real-valued shortcut of TBS
# ------------------------------------------------------------------------------------------------
class BinaryShortcut(nn.Module):
    """BiDM's real-valued shortcut inside a binary layer: ``|s| ⊙ P(x)`` added to its output, s
    learnable per output channel (init ``shortcut_init``; the magnitude keeps the real-valued
    path additive, as BiDM's positive scale). P maps the input to the output's
    channels — the identity when they agree; otherwise a real 1×1 conv / linear (``proj=True``,
    initialised as the parameter-free map) or the parameter-free channel map
    (:func:`~lowbit.quant.channels.channel_map`) — and, after a strided conv, to its grid by
    average pooling over the stride window."""

    def __init__(self, layer: nn.Module, init: float, proj: bool) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        dev = layer.weight.device
        self.in_dim = layer.in_channels if self.is_conv else layer.in_features
        self.out_dim = layer.out_channels if self.is_conv else layer.out_features
        self.scale = nn.Parameter(torch.full((self.out_dim,), float(init), device=dev))
        self.proj = self._make_proj(dev) if proj and self.in_dim != self.out_dim else None

    def _make_proj(self, dev) -> nn.Module:
        eye = torch.eye(self.in_dim, device=dev)
        if self.is_conv:
            proj = nn.Conv2d(self.in_dim, self.out_dim, 1, bias=False, device=dev)
            init = channel_map(eye[:, :, None, None], self.out_dim, 1).transpose(0, 1)
        else:
            proj = nn.Linear(self.in_dim, self.out_dim, bias=False, device=dev)
            init = channel_map(eye, self.out_dim, -1).T
        with torch.no_grad():  # start as the parameter-free map
            proj.weight.copy_(init)
        return proj

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        axis = 1 if self.is_conv else -1
        p = self.proj(x) if self.proj is not None else channel_map(x, self.out_dim, axis)
        if self.is_conv:
            if p.shape[-2:] != y.shape[-2:]:  # strided conv: average over the stride window
                p = F.adaptive_avg_pool2d(p, y.shape[-2:])
            return self.scale.abs().reshape(1, -1, 1, 1) * p
        return self.scale.abs() * p

    def extra_macs(self, x: Tensor, y: Tensor) -> float:
        """The 1×1 projection's MACs per sample (the rest is elementwise)."""
        if self.proj is None:
            return 0.0
        positions = x.shape[-1] * x.shape[-2] if self.is_conv else x.numel() / x.shape[-1] / x.shape[0]
        return float(positions * self.in_dim * self.out_dim)


# BiDM's weight binarizer: α = mean|W| per output channel as a constant (detached), sign(W) STE
register_weight_binarizer("bidm", lambda w, name: SignWeightBinarizer(w, learnable=False, name=name,
                                                                     detach=True))
register_shortcut("identity", lambda layer, spec: BinaryShortcut(layer, spec.shortcut_init, False))
register_shortcut("conv", lambda layer, spec: BinaryShortcut(layer, spec.shortcut_init, True))
register_module_class(
    BinaryShortcut,
    describe=lambda m: {"proj": m.proj is not None},
    build=lambda _e, s, ctx: BinaryShortcut(ctx.parent, 0.0, bool(s["proj"])))


# ------------------------------------------------------------------------------------------------
# cross-timestep connection
# ------------------------------------------------------------------------------------------------
class CrossTimestepBlock(nn.Module):
    """Wraps one timestep block: ``(1−α_t)·out + α_t·previous`` with α learnable per timestep
    bucket (``alpha`` [buckets], clamped to [0, 1]); ``enable()``/``disable()`` switch it.

    It keeps two outputs per sample: ``_last`` (of the latest call) and ``_before`` (of the latest
    call at an earlier, higher timestep). The hook says per sample which one is "previous"
    (``SOURCE_LAST`` when the timestep advanced, ``SOURCE_BEFORE`` when a sampler evaluates the
    same timestep again, as PLMS does in its first steps, ``SOURCE_NONE`` at a trajectory start)."""

    def __init__(self, block: nn.Module, num_buckets: int = 10, alpha_init: float = 0.3,
                 num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.block = block
        self.alpha = nn.Parameter(torch.full((num_buckets,), float(alpha_init)))
        self.num_train_timesteps = num_train_timesteps
        self.enabled = True
        self._last: Tensor | None = None
        self._before: Tensor | None = None
        self._t: Tensor | None = None
        self._source: Tensor | None = None

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self._last = self._before = None

    def set_timestep(self, t: Tensor, source: Tensor | None) -> None:
        """This call's timesteps [B] and, per sample, where its previous-step features come from
        (``SOURCE_*``; None: nowhere)."""
        self._t, self._source = t, source

    def alpha_for(self, t: Tensor, like: Tensor) -> Tensor:
        """α of each sample's timestep bucket, shaped to broadcast against ``like``."""
        nb = self.alpha.numel()
        idx = (t.float() * nb / self.num_train_timesteps).long().clamp(0, nb - 1)
        a = self.alpha.clamp(0, 1)[idx.to(self.alpha.device)]
        return a.reshape(-1, *[1] * (like.dim() - 1))

    def forward(self, *args, **kwargs):
        raw = self.block(*args, **kwargs)
        if not self.enabled:
            return raw
        return _with_main_output(raw, self._connect(as_tensor(raw)))

    def _connect(self, out: Tensor) -> Tensor:
        src = self._source
        last = self._last if self._last is not None and self._last.shape == out.shape else None
        before = self._before if self._before is not None and self._before.shape == out.shape \
            else None
        if src is None or last is None:
            src = torch.full((out.shape[0],), SOURCE_NONE, device=out.device)
        src = src.to(out.device)
        if before is None:  # nothing older kept: a repeated timestep has no previous step
            src = torch.where(src == SOURCE_BEFORE, SOURCE_NONE, src)
        view = (-1, *[1] * (out.dim() - 1))
        if self._t is not None and bool((src != SOURCE_NONE).any()):
            from_before = src == SOURCE_BEFORE
            prev = last if before is None or not bool(from_before.any()) else torch.where(
                from_before.reshape(view), before, last)
            a = self.alpha_for(self._t, out) * (src != SOURCE_NONE).to(out.dtype).reshape(view)
            out = (1 - a) * out + a * prev
        new = out.detach()
        # the step before the next one: the old "last" where the timestep advanced, unchanged
        # where it repeated, nothing at a trajectory start (zeros, never read)
        if last is not None and bool((src == SOURCE_LAST).all()):
            self._before = last  # every sample advanced (plain sampling): no selection needed
        elif last is not None:
            keep = before if before is not None else torch.zeros_like(last)
            adv = (src == SOURCE_LAST).reshape(view)
            self._before = torch.where(adv, last, torch.where((src == SOURCE_BEFORE).reshape(view),
                                                              keep, torch.zeros_like(last)))
        else:
            self._before = None
        self._last = new  # what this block emitted: the next step's "previous"
        return out


def _with_main_output(raw: object, out: Tensor) -> object:
    """``raw`` (a block's output: a tensor, a tuple such as ``Transformer2DModel``'s with
    ``return_dict=False``, or a ``BaseOutput``) with its main tensor replaced by ``out``."""
    if isinstance(raw, Tensor):
        return out
    if isinstance(raw, tuple):
        return (out, *raw[1:])
    if hasattr(raw, "sample"):
        return dataclasses.replace(raw, sample=out)
    raise TypeError(f"cross-timestep connection: cannot carry a block output of type "
                    f"{type(raw).__name__}")


SOURCE_NONE, SOURCE_LAST, SOURCE_BEFORE = 0, 1, 2


class _CrossTimestepHook:
    """Forward pre-hook on the top-level denoiser: hands each call's timesteps to the wrappers and
    says, per sample, where the previous step's features are: the latest call's when the timestep
    went down; the call before that when the same timestep is evaluated again (PLMS's first
    steps); none when it went up — a new trajectory starts at the highest timestep — or when the
    batch size changed."""

    def __init__(self, blocks: list[CrossTimestepBlock]) -> None:
        self.blocks = blocks
        self.last_t: Tensor | None = None
        self.has_before: Tensor | None = None  # per sample: an earlier step is kept

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if t is None:
            raise ValueError("the cross-timestep connection needs the `timestep` argument")
        # the batch size: the first tensor argument with a batch axis (the network's input)
        x = args[0] if args else next(v for v in kwargs.values()
                                      if torch.is_tensor(v) and v.dim() > 1)
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        last = self.last_t
        if last is None or last.shape != t.shape:
            for b in self.blocks:
                b.reset()
            source = torch.full(t.shape, SOURCE_NONE, device=t.device)
            has_before = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        else:
            last = last.to(t.device)
            adv, same = t < last, t == last
            before_ok = self.has_before.to(t.device)
            source = torch.where(adv, SOURCE_LAST,
                                 torch.where(same & before_ok, SOURCE_BEFORE, SOURCE_NONE))
            has_before = adv | (same & before_ok)
            if not bool((t <= last).any()):  # every sample starts a new trajectory
                for b in self.blocks:
                    b.reset()
        for b in self.blocks:
            b.set_timestep(t, source)
        self.last_t = t.detach()
        self.has_before = has_before

    def reset(self) -> None:
        self.last_t = None
        self.has_before = None
        for b in self.blocks:
            b.reset()


def attach_cross_timestep(unet: nn.Module, n_blocks: int, num_buckets: int = 10,
                          alpha_init: float = 0.3, num_train_timesteps: int = 1000
                          ) -> list[CrossTimestepBlock]:
    """Wrap the last ``n_blocks`` up-path timestep blocks of ``unet`` in place and install the
    timestep pre-hook; returns the wrappers (in forward order)."""
    ups = [b for b in timestep_blocks(unet) if b.stage == "up"]
    chosen = ups[len(ups) - min(n_blocks, len(ups)):] if n_blocks > 0 else []
    wrappers = []
    for b in chosen:
        parent, _, child = b.output.rpartition(".")
        holder = unet.get_submodule(parent)
        w = CrossTimestepBlock(holder[int(child)], num_buckets, alpha_init, num_train_timesteps)
        holder[int(child)] = w  # resnets / attentions are ModuleLists
        wrappers.append(w)
    install_cross_timestep_hook(unet, wrappers)
    return wrappers


def install_cross_timestep_hook(unet: nn.Module, wrappers: list[CrossTimestepBlock]) -> None:
    """The timestep pre-hook on ``unet`` that feeds ``wrappers`` (forward order); replaces an
    earlier one."""
    old = getattr(unet, CTC_HOOK_ATTR, None)
    if old is not None:
        old[1].remove()
        object.__setattr__(unet, CTC_HOOK_ATTR, None)
    if wrappers:
        hook = _CrossTimestepHook(list(wrappers))
        handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
        object.__setattr__(unet, CTC_HOOK_ATTR, (hook, handle))


def _build_cross_timestep(existing: nn.Module | None, spec: dict, _ctx) -> CrossTimestepBlock:
    if existing is None:
        raise ValueError("no block to wrap at this path")
    w = CrossTimestepBlock(existing, int(spec["num_buckets"]), 0.3,
                           int(spec["num_train_timesteps"]))
    if not spec.get("enabled", True):
        w.disable()
    return w


# quantization map (lowbit.quant.qmap): a reloaded student carries the connection and its hook
register_module_class(
    CrossTimestepBlock,
    describe=lambda w: {"num_buckets": int(w.alpha.numel()),
                        "num_train_timesteps": int(w.num_train_timesteps), "enabled": w.enabled},
    build=_build_cross_timestep,
    finalize=lambda model, mods: install_cross_timestep_hook(model, [m for _, m in mods]))


def reset_cross_timestep(unet: nn.Module) -> None:
    """Forget the carried features (the next call starts a trajectory)."""
    entry = getattr(unet, CTC_HOOK_ATTR, None)
    if entry is not None:
        entry[0].reset()


def cross_timestep_blocks(unet: nn.Module) -> list[CrossTimestepBlock]:
    return [m for m in unet.modules() if isinstance(m, CrossTimestepBlock)]


class CrossTimestepTerm(LossTerm):
    """Training side of the connection (no loss of its own): a no-grad student pass at
    ``t + offset`` (same x₀ and noise) leaves each wrapper its "previous" features before the
    real pass at t (samples at t = T−1 have no earlier step and keep their own output)."""

    name = "ctc"

    def __init__(self, student: nn.Module, offset: int, schedule: NoiseSchedule) -> None:
        super().__init__(0.0)
        self._student = [student]  # not a submodule: the student is registered elsewhere
        self.offset, self.schedule = offset, schedule

    def before_student(self, module, batch: dict) -> None:
        student = self._student[0]
        reset_cross_timestep(student)
        t_prev = (batch["t"] + self.offset).clamp(max=self.schedule.num_train_timesteps - 1)
        with torch.no_grad():
            module.call_student(self.schedule.add_noise(batch["x0"], batch["noise"], t_prev),
                                t_prev, batch.get("cond"))

    def forward(self, out: StepOutputs) -> None:
        return None


# ------------------------------------------------------------------------------------------------
# SPD
# ------------------------------------------------------------------------------------------------
def patch_gram(f: Tensor, p: int) -> Tensor:
    """L2-normalised Gram maps of p×p patches: [B, C, H, W] → [B, n_patches, p²·p²]
    (maps smaller than p use the whole map as one patch)."""
    b, c, h, w = f.shape
    ph, pw = min(p, h), min(p, w)
    patches = F.unfold(f, kernel_size=(ph, pw), stride=(ph, pw))  # [B, C·ph·pw, L]
    n = patches.shape[-1]
    patches = patches.reshape(b, c, ph * pw, n).permute(0, 3, 2, 1)  # [B, L, p², C]
    gram = patches @ patches.transpose(-1, -2)  # A = P·Pᵀ, [B, L, p², p²]
    return F.normalize(gram.reshape(b, n, -1), dim=-1)


def spd_loss(student: Tensor, teacher: Tensor, p: int) -> Tensor:
    """Mean L2 distance between the normalised patch Gram maps of student and FP features."""
    return (patch_gram(student, p) - patch_gram(teacher, p)).norm(dim=-1).mean()


class SPDLoss(LossTerm):
    """BiDM's Space Patched Distillation over the named block outputs (mean over blocks)."""

    name = "spd"
    needs_teacher = True

    def __init__(self, block_names: list[str], weight: float, patch_size: int) -> None:
        super().__init__(weight)
        self.feature_names = tuple(block_names)
        self.patch_size = patch_size

    def forward(self, out: StepOutputs) -> Tensor:
        terms = [spd_loss(as_tensor(out.student_features[n]), as_tensor(out.teacher_features[n]),
                          self.patch_size) for n in self.feature_names]
        return torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class BiDMParams(BinaryQATParams):
    tbs: bool = True
    shortcut: str = "conv"
    shortcut_init: float = 0.3
    ctc_blocks: int = 4
    ctc_buckets: int = 10
    ctc_alpha: float = 0.3
    ctc_offset: int | None = None
    spd: bool = True
    spd_weight: float = 1.0e-2
    patch_size: int = 4

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.shortcut not in ("identity", "conv", "none"):
            raise HParamError(f"{prefix}.shortcut={self.shortcut!r}: choose identity, conv or "
                              f"none")
        for key in ("ctc_buckets", "patch_size"):
            if getattr(self, key) < 1:
                raise HParamError(f"{prefix}.{key}={getattr(self, key)}: must be positive")


class BiDM(BinaryQAT):
    name = "bidm"
    params_class = BiDMParams
    families = ("unet", "unet_text")
    family_reason = ("BiDM is defined for U-Nets: TBS's k×k scaling filter and SPD's patches act "
                     "on conv feature maps, the cross-timestep connection on the up-path blocks; "
                     "a DiT has neither (method=binary_baseline binarizes a DiT)")
    default_ctc_blocks = 4  # conf/method/bidm.yaml; other values show in the label
    default_patch_size = 4

    @property
    def label(self) -> str:
        p, parts = self.params, []
        if not p.tbs:
            parts.append("no-tbs")
        elif p.ctc_blocks != self.default_ctc_blocks:
            parts.append(f"ctc_blocks={p.ctc_blocks}")
        if not p.spd:
            parts.append("no-spd")
        elif p.patch_size != self.default_patch_size:
            parts.append(f"patch={p.patch_size}")
        return self.name if not parts else f"{self.name}({','.join(parts)})"

    def binary_spec(self) -> BinarySpec:
        p = self.params
        if not p.tbs:
            return BinarySpec(weight="xnor", act="sign")
        return BinarySpec(weight="bidm", act="rsign", scaling="learned", shortcut=p.shortcut,
                          shortcut_init=p.shortcut_init)

    def ctc_offset(self, ctx: MethodContext, num_train_timesteps: int) -> int:
        """Training's t → previous-step gap: ``method.ctc_offset``, or by default the gap of the
        evaluation sampler (T / steps), the gap the carried features have when sampling."""
        if self.params.ctc_offset is not None:
            return self.params.ctc_offset
        return max(1, num_train_timesteps // int(ctx.cfg.sampler.steps))

    def prepare(self, teacher: nn.Module, ctx: MethodContext) -> nn.Module:
        p = self.params
        blocks = timestep_blocks(teacher)
        student = self.binary_student(teacher, ctx, self.binary_spec())
        schedule = NoiseSchedule(ctx.model.noise_schedule)
        T = schedule.num_train_timesteps
        terms: list[LossTerm] = []
        if p.tbs and p.ctc_blocks > 0:
            attach_cross_timestep(student, p.ctc_blocks, p.ctc_buckets, p.ctc_alpha, T)
            terms.append(CrossTimestepTerm(student, self.ctc_offset(ctx, T), schedule))
        if p.spd:
            terms.append(SPDLoss([b.output for b in blocks], p.spd_weight, p.patch_size))
        self.train(student, teacher, ctx, terms)
        reset_cross_timestep(student)
        ctx.report["cross_timestep_blocks"] = len(cross_timestep_blocks(student))
        student.requires_grad_(False)
        return student.eval()
