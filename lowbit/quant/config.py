"""Quantization configuration: what to quantize, at which bits, with which rules.

``QuantSpec`` describes one quantizer (bits, granularity, init …); ``QuantConfig`` holds one spec
for weights and one for activations plus the rules that map module names to specs (first/last
layer, time embedding, skip convs, include/exclude globs and per-pattern overrides). The rules are
pure functions of the module name, so they can be tested and printed without a model.

A ``bits`` yaml (``conf/bits/*.yaml``) is a plain mapping read by :meth:`QuantConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Bits a uniform quantizer accepts; None, 16 and 32 mean "leave this tensor in floating point".
ALLOWED_BITS: tuple[int | None, ...] = (None, 1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
FP_BITS: tuple[int | None, ...] = (None, 16, 32)
INITS = ("minmax", "mse", "percentile")
INTERPS = ("nearest", "linear")
GRANULARITY_HELP = "tensor | channel | group:<g> | token"

# Default layer-name rules; the model config group may replace them (DESIGN.md, `model` group).
DEFAULT_FIRST_LAYERS = ("conv_in", "pos_embed.proj")
DEFAULT_LAST_LAYERS = ("conv_out", "proj_out*")  # top-level names only: DiT proj_out_1/_2
DEFAULT_TIME_EMB_LAYERS = ("time_embedding.*", "add_embedding.*", "*timestep_embedder.*")
# EfficientDM keeps residual 1x1 skip convs and downsample convs FP (rule `skip_fp`).
DEFAULT_SKIP_LAYERS = ("*conv_shortcut", "*downsamplers.*")


def is_fp_bits(bits: int | None) -> bool:
    return bits in FP_BITS


def _check_bits(key: str, bits: Any) -> int | None:
    if isinstance(bits, str) and bits.lower() in ("fp", "none", "null"):
        return None
    if isinstance(bits, bool) or bits not in ALLOWED_BITS:
        raise ValueError(
            f"{key}={bits!r} is not a supported bit-width; allowed values: "
            f"{', '.join('null' if b is None else str(b) for b in ALLOWED_BITS)} "
            f"(null/16/32 = floating point)."
        )
    return bits


def parse_granularity(key: str, granularity: str) -> tuple[str, int | None]:
    """``"group:64"`` → ``("group", 64)``; other kinds → ``(kind, None)``."""
    if not isinstance(granularity, str):
        raise ValueError(f"{key}={granularity!r} must be one of {GRANULARITY_HELP}.")
    kind, _, arg = granularity.partition(":")
    if kind in ("tensor", "channel", "token") and not arg:
        return kind, None
    if kind == "group" and arg.isdigit() and int(arg) > 0:
        return kind, int(arg)
    raise ValueError(f"{key}={granularity!r} must be one of {GRANULARITY_HELP}.")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer: bits, integer grid, scale granularity, initialisation, trainability."""

    bits: int | None = 8
    symmetric: bool = False  # True: [-2^(b-1), 2^(b-1)-1], zero point 0; False: [0, 2^b-1] + zero point
    granularity: str = "tensor"  # tensor | channel | group:<g> | token (activations, dynamic)
    init: str = "minmax"  # minmax | mse (Lp, p=2.4, Q-Diffusion) | percentile
    percentile: float = 99.99  # for init=percentile: clip at this percentile (and 100 - it)
    learnable: bool = False  # LSQ: Δ (and zero point) become trainable parameters
    timestep_aware: bool = False  # activations: one Δ per calibration timestep bucket
    interp: str = "nearest"  # nearest | linear: mapping sampler timesteps to calibration buckets

    @property
    def enabled(self) -> bool:
        return not is_fp_bits(self.bits)

    def validate(self, key: str, *, weight: bool = False) -> QuantSpec:
        _check_bits(f"{key}.bits", self.bits)
        kind, _ = parse_granularity(f"{key}.granularity", self.granularity)
        if weight and kind == "token":
            raise ValueError(f"{key}.granularity=token is for activations; use channel or group:<g>.")
        if self.init not in INITS:
            raise ValueError(f"{key}.init={self.init!r}; allowed: {', '.join(INITS)}.")
        if self.interp not in INTERPS:
            raise ValueError(f"{key}.interp={self.interp!r}; allowed: {', '.join(INTERPS)}.")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"{key}.percentile={self.percentile!r} must be in (50, 100].")
        if self.bits == 1 and self.symmetric:
            raise ValueError(
                f"{key}: a symmetric 1-bit grid [-1, 0] is degenerate; use symmetric: false "
                f"or a method's binarizer (BinaryDM/BiDM)."
            )
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, key: str, *, base: QuantSpec | None = None,
                  weight: bool = False) -> QuantSpec:
        base = base or cls()
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
                             f"allowed: {', '.join(sorted(names))}.")
        if "bits" in d:
            d["bits"] = _check_bits(f"{key}.bits", d["bits"])
        return dataclasses.replace(base, **d).validate(key, weight=weight)

    def at_least(self, bits: int | None) -> QuantSpec:
        """Raise precision to ``bits`` if lower (never lowers it; FP stays FP)."""
        if bits is None or not self.enabled or self.bits >= bits:
            return self
        return dataclasses.replace(self, bits=bits)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerOverride:
    """A per-pattern override: partial weight/act specs, or ``fp`` to keep matching layers FP."""

    pattern: str
    weight: Mapping[str, Any] | None = None
    act: Mapping[str, Any] | None = None
    sm_bits: int | None | str = "inherit"  # attention modules only
    fp: bool = False

    @classmethod
    def parse(cls, pattern: str, value: Any, key: str) -> LayerOverride:
        if value in ("fp", None) or value is False:
            return cls(pattern=pattern, fp=True)
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}[{pattern!r}] must be 'fp' or a mapping with weight/act/sm_bits.")
        unknown = sorted(set(value) - {"weight", "act", "sm_bits", "fp", "pattern"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {key}[{pattern!r}]; "
                             f"allowed: weight, act, sm_bits, fp.")
        sm = value.get("sm_bits", "inherit")
        if sm != "inherit":
            sm = _check_bits(f"{key}[{pattern!r}].sm_bits", sm)
        return cls(pattern=pattern, weight=dict(value.get("weight") or {}) or None,
                   act=dict(value.get("act") or {}) or None, sm_bits=sm,
                   fp=bool(value.get("fp", False)))


@dataclass(frozen=True)
class LayerPlan:
    """What :func:`QuantConfig.plan` decided for one module."""

    weight: QuantSpec
    act: QuantSpec
    sm_bits: int | None = None
    reasons: tuple[str, ...] = ()
    fp_reason: str | None = None  # set when the layer stays entirely FP

    @property
    def quantized(self) -> bool:
        return self.fp_reason is None


def _match(name: str, patterns: Sequence[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def _as_tuple(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list of shell-style name patterns, got {value!r}.")
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class QuantConfig:
    """A whole-model quantization recipe (the ``bits`` config group plus layer rules)."""

    name: str = "w8a8"
    weight: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=8, granularity="channel", init="mse"))
    act: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=8, granularity="tensor", init="mse"))
    attn_bits: int | None | str = "act"  # Q/K/V matmul inputs; "act" = same as act.bits
    sm_bits: int | None = 8  # softmax output (unsigned); null/16 = keep FP
    quantize_attention: bool = True  # quantize the two attention matmuls (QKᵀ, softmax·V)
    first_last_bits: int | None = 8  # first/last layer at least this many bits; null = as the rest
    first_layers: tuple[str, ...] = DEFAULT_FIRST_LAYERS
    last_layers: tuple[str, ...] = DEFAULT_LAST_LAYERS
    time_emb_bits: int | None = 8  # time-embedding MLP at least this many bits; null = as the rest
    time_emb_layers: tuple[str, ...] = DEFAULT_TIME_EMB_LAYERS
    skip_fp: bool = False  # EfficientDM: keep skip 1x1 convs and downsample convs FP
    skip_layers: tuple[str, ...] = DEFAULT_SKIP_LAYERS
    split_shortcut: bool = True  # Q-Diffusion: separate quantizers for the halves of cat([h, skip])
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, key: str = "bits") -> QuantConfig:
        """Build from a ``bits`` yaml mapping (or any dict); unknown keys and values raise."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
                             f"allowed: {', '.join(sorted(names))}.")
        default = cls()
        kw: dict[str, Any] = {}
        if "name" in d:
            kw["name"] = str(d["name"])
        kw["weight"] = QuantSpec.from_dict(d.get("weight"), f"{key}.weight", base=default.weight,
                                           weight=True)
        kw["act"] = QuantSpec.from_dict(d.get("act"), f"{key}.act", base=default.act)
        if "attn_bits" in d:
            ab = d["attn_bits"]
            kw["attn_bits"] = "act" if ab == "act" else _check_bits(f"{key}.attn_bits", ab)
        for k in ("sm_bits", "first_last_bits", "time_emb_bits"):
            if k in d:
                kw[k] = _check_bits(f"{key}.{k}", d[k])
        for k in ("quantize_attention", "skip_fp", "split_shortcut"):
            if k in d:
                if not isinstance(d[k], bool):
                    raise ValueError(f"{key}.{k}={d[k]!r} must be true or false.")
                kw[k] = d[k]
        for k in ("first_layers", "last_layers", "time_emb_layers", "skip_layers", "include",
                  "exclude"):
            if k in d:
                kw[k] = _as_tuple(f"{key}.{k}", d[k])
        if "overrides" in d:
            kw["overrides"] = _parse_overrides(d["overrides"], f"{key}.overrides")
        cfg = cls(**kw)
        for o in cfg.overrides:  # fail now, not at quantize_ time
            cfg._apply_override(o, cfg.weight, cfg.act, cfg.sm_bits)
        return cfg

    def with_overrides(self, d: Mapping[str, Any]) -> QuantConfig:
        """A copy with some keys replaced (nested weight/act dicts merge), re-validated."""
        merged = self.to_dict()
        for k, v in d.items():
            if k in ("weight", "act") and isinstance(v, Mapping):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        return QuantConfig.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["weight"], d["act"] = self.weight.to_dict(), self.act.to_dict()
        for k in ("first_layers", "last_layers", "time_emb_layers", "skip_layers", "include",
                  "exclude"):
            d[k] = list(d[k])
        d["overrides"] = {
            o.pattern: ("fp" if o.fp else {k: v for k, v in (("weight", o.weight), ("act", o.act),
                                                             ("sm_bits", o.sm_bits))
                                           if v is not None and v != "inherit"})
            for o in self.overrides
        }
        return d

    # -- queries --------------------------------------------------------------------------------
    @property
    def qkv_spec(self) -> QuantSpec:
        """Spec of the Q, K, V matmul-input quantizers (signed activations)."""
        return self._qkv(self.act, self.attn_bits)

    @staticmethod
    def _qkv(act: QuantSpec, attn_bits: int | None | str) -> QuantSpec:
        return act if attn_bits == "act" else dataclasses.replace(act, bits=attn_bits)

    @property
    def is_fp(self) -> bool:
        """True when nothing at all would be quantized (``bits=fp``)."""
        attn = self.quantize_attention and self.qkv_spec.enabled
        return not (self.weight.enabled or self.act.enabled or attn)

    def plan(self, name: str, kind: str) -> LayerPlan:
        """The specs for module ``name`` (``kind``: linear | conv | attention), rules applied in
        order: include/exclude → first/last → time embedding → skip convs → user overrides."""
        weight, act, sm = self.weight, self.act, self.sm_bits
        if kind == "attention":
            weight, act = QuantSpec(bits=None), self.qkv_spec
            if not self.quantize_attention:
                return LayerPlan(weight, act, sm, fp_reason="quantize_attention=false")
        if _match(name, self.include) is None:
            return LayerPlan(weight, act, sm, fp_reason="not matched by include")
        p = _match(name, self.exclude)
        if p is not None:
            return LayerPlan(weight, act, sm, fp_reason=f"excluded by {p!r}")
        reasons: list[str] = []
        if kind != "attention":
            if self.first_last_bits is not None and _match(name, self.first_layers):
                weight, act = weight.at_least(self.first_last_bits), act.at_least(self.first_last_bits)
                reasons.append(f"first layer: >= {self.first_last_bits} bits")
            if self.first_last_bits is not None and _match(name, self.last_layers):
                weight, act = weight.at_least(self.first_last_bits), act.at_least(self.first_last_bits)
                reasons.append(f"last layer: >= {self.first_last_bits} bits")
            if self.time_emb_bits is not None and _match(name, self.time_emb_layers):
                weight, act = weight.at_least(self.time_emb_bits), act.at_least(self.time_emb_bits)
                reasons.append(f"time embedding: >= {self.time_emb_bits} bits")
            if self.skip_fp and _match(name, self.skip_layers):
                return LayerPlan(weight, act, sm, fp_reason="skip/downsample conv kept FP (skip_fp)")
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                if o.fp:
                    return LayerPlan(weight, act, sm, fp_reason=f"override {o.pattern!r}: fp")
                weight, act, sm = self._apply_override(o, weight, act, sm, attention=kind == "attention")
                reasons.append(f"override {o.pattern!r}")
        if kind == "attention":
            if not act.enabled:
                return LayerPlan(weight, act, sm, tuple(reasons), fp_reason="attention bits are FP")
        elif not (weight.enabled or act.enabled):
            return LayerPlan(weight, act, sm, tuple(reasons), fp_reason="weight and act bits are FP")
        return LayerPlan(weight, act, sm, tuple(reasons))

    def _apply_override(self, o: LayerOverride, weight: QuantSpec, act: QuantSpec, sm: int | None,
                        attention: bool = False) -> tuple[QuantSpec, QuantSpec, int | None]:
        key = f"overrides[{o.pattern!r}]"
        if o.weight and not attention:
            weight = QuantSpec.from_dict(o.weight, f"{key}.weight", base=weight, weight=True)
        if o.act:
            act = QuantSpec.from_dict(o.act, f"{key}.act", base=act)
        if o.sm_bits != "inherit":
            sm = o.sm_bits
        return weight, act, sm


def _parse_overrides(value: Any, key: str) -> tuple[LayerOverride, ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(LayerOverride.parse(str(p), v, key) for p, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, Mapping) or "pattern" not in item:
                raise ValueError(f"{key}[{i}] must be a mapping with a 'pattern' key.")
            rest = {k: v for k, v in item.items() if k != "pattern"}
            out.append(LayerOverride.parse(str(item["pattern"]), rest or "fp", key))
        return tuple(out)
    raise ValueError(f"{key} must be a mapping pattern -> override, or a list of them.")
