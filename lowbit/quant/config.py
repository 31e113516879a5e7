"""Quantization configuration: what to quantize, at which bits, with which rules.

``QuantSpec`` describes one quantizer (bits, granularity, init …); ``QuantConfig`` holds one spec
for weights and one for activations plus the rules that map module names to specs (first/last
layer, time embedding, skip convs, include/exclude globs and per-pattern overrides). The rules are
pure functions of the module name, so they can be tested and printed without a model.

A ``bits`` yaml (``conf/bits/*.yaml``) is a plain mapping read by :meth:`QuantConfig.from_dict`;
the shipped ones load by name with :meth:`QuantConfig.preset` (package data, so a wheel works).
A config's ``name`` never contradicts its bits (``w4a4`` must have 4-bit weights and
activations; ``fp`` must quantize nothing), and :meth:`QuantConfig.label` names a run from the
effective settings, so a command-line override never leaves a misleading label.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowbit.config import ConfigError

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
    """A whole-model quantization recipe (the ``bits`` config group plus layer rules). The
    defaults are the plain ``w8a8`` preset: every layer at 8 bits, min-max ranges, per-channel
    weights, per-tensor activations, the skip conv's concat input split."""

    name: str = ""  # "" = derived from the settings by label(); a wXaY or fp name must match them
    weight: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=8, granularity="channel", init="minmax"))
    act: QuantSpec = field(
        default_factory=lambda: QuantSpec(bits=8, granularity="tensor", init="minmax"))
    attn_bits: int | None | str = "act"  # Q/K/V matmul inputs; "act" = same as act.bits
    sm_bits: int | None = 8  # softmax output (unsigned); null/16 = keep FP
    quantize_attention: bool = True  # quantize the two attention matmuls (QKᵀ, softmax·V)
    first_last_bits: int | None = None  # first/last layer at least this many bits; null = as the rest
    first_layers: tuple[str, ...] = DEFAULT_FIRST_LAYERS
    last_layers: tuple[str, ...] = DEFAULT_LAST_LAYERS
    time_emb_bits: int | None = None  # time-embedding MLP at least this many bits; null = as the rest
    time_emb_layers: tuple[str, ...] = DEFAULT_TIME_EMB_LAYERS
    skip_fp: bool = False  # EfficientDM: keep skip 1x1 convs and downsample convs FP
    skip_layers: tuple[str, ...] = DEFAULT_SKIP_LAYERS
    split_shortcut: bool = True  # Q-Diffusion: the skip conv's own quantizers per half of cat([h, skip])
    split_conv1: bool = False  # also split the input of the up-block resnets' conv1 (a strengthening)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.label())
        _check_name(self.name, self.weight, self.act, self.is_fp, "bits")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """A shipped ``bits`` preset (``lowbit/conf/bits/<name>.yaml``) by name, optionally with
        some keys replaced as in :meth:`with_overrides` (``act={"granularity": "tensor"}``).

        >>> QuantConfig.preset("w4a4").act.bits
        4
        """
        names = preset_names()
        if name not in names:
            raise ConfigError("bits", name, "no such bits preset",
                              f"choose one of {', '.join(names)}")
        cfg = cls.from_dict(_raw_preset(name), key=f"bits[{name}]")
        return cfg.with_overrides(overrides) if overrides else cfg

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, key: str = "bits") -> QuantConfig:
        """Build from a ``bits`` yaml mapping (or any dict); unknown keys and values raise, and so
        does a ``name`` that contradicts the bits: ``w<X>a<Y>…`` needs X-bit weights and Y-bit
        activations (16/32 = FP), ``fp`` needs nothing quantized; other names are free-form. A
        mapping without a name is named by :meth:`label`.

        Keys absent from ``d`` take the dataclass defaults (W8A8), not a preset's values: to load a
        shipped preset by name use :meth:`preset`.
        """
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(f'{key}.{u}' for u in unknown)}; "
                             f"allowed: {', '.join(sorted(names))}.")
        if set(d) == {"name"}:
            name = str(d["name"])
            known = preset_names()
            fix = (f"use QuantConfig.preset({name!r}) (bits={name} on the command line)"
                   if name in known else
                   f"use QuantConfig.preset(<name>) with one of {', '.join(known)}, "
                   f"or give weight/act settings")
            raise ConfigError(f"{key}.name", name,
                              "a mapping with only a name does not load a preset (the other keys "
                              "would take the W8A8 defaults)", fix)
        default = cls(name="w8a8")  # the dataclass defaults (no label(): presets use from_dict)
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
        for k in ("quantize_attention", "skip_fp", "split_shortcut", "split_conv1"):
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
        if "name" in kw:  # checked here to name the key; without a name, label() gives one
            qkv = cls._qkv(kw["act"], kw.get("attn_bits", cls.attn_bits))
            is_fp = not (kw["weight"].enabled or kw["act"].enabled
                         or (kw.get("quantize_attention", cls.quantize_attention) and qkv.enabled))
            _check_name(kw["name"], kw["weight"], kw["act"], is_fp, key)
        cfg = cls(**kw)
        for o in cfg.overrides:  # fail now, not at quantize_ time
            cfg._apply_override(o, cfg.weight, cfg.act, cfg.sm_bits)
        return cfg

    def with_overrides(self, d: Mapping[str, Any]) -> QuantConfig:
        """A copy with some keys replaced (nested weight/act dicts merge), re-validated. Changing
        the weight/act bits of a ``wXaY``-named config needs a new ``name`` too."""
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
    def label(self) -> str:
        """A run label derived from the effective settings, never from ``name`` alone.

        * Settings equal to a shipped preset's give that preset's name (``w4a4``, ``w4a4_pchan``,
          ``fp`` …); the preset named by ``name`` wins a tie.
        * Otherwise the label is a reference preset's name plus one ``+suffix`` per setting that
          differs from it, in the fixed order below. The reference is the preset named by
          ``name`` when there is one, else the first preset (plain ``wXaY`` names first, then
          alphabetical) with the same weight/activation bits, else W8A8's settings at these bits,
          labelled ``w<X>a<Y>`` (16 = floating point).

        Suffixes (``<side>`` is ``w`` for weights, ``act`` for activations; ``<b>bit`` is a bit
        width, ``fp`` floating point)::

            +<g>-<side>       granularity: tensor | chan | group<g> | token
            +sym-<side>       symmetric grid         (+asym-<side> when the reference is symmetric)
            +<init>-<side>    range init: minmax | mse | pct<p> (init percentile at p)
            +lsq-<side>       learnable step (LSQ)   (+fixed-<side>)
            +ts-act           one step per timestep  (+nots-act); +<interp>-act: its mapping
            +fp-attn          attention matmuls kept FP; +<b>bit-attn: their Q/K/V bits
            +<b>bit-sm        softmax output bits    (+fp-sm)
            +<b>bit-io        first/last layers at >= b bits (+same-io: like the rest)
            +<b>bit-temb      time-embedding MLP at >= b bits (+same-temb)
            +fp-skip          skip/downsample convs FP (skip_fp; +q-skip)
            +nosplit          no own quantizers for the skip conv's concat halves
                              (split_shortcut; +split)
            +split-conv1      the up-block resnets' conv1 input split too (split_conv1;
                              +nosplit-conv1)
            +include, +exclude, +overrides   module-name rules differ (see the config itself)

        Settings without effect are ignored: the fields of a floating-point quantizer, a bump to
        a precision every quantizer already has, the softmax bits of FP attention. The layer-name
        lists (first/last/time-embedding/skip layers) are facts about a model, not settings, and
        do not appear. A method's own changes (QuEST's timestep-aware activations) are the
        method's, and belong to its name.
        """
        if self.is_fp and not self.overrides:
            return "fp"
        eff = self._effective()
        presets, effs = _presets(), _preset_effectives()
        order = sorted(presets, key=lambda n: (n != self.name, "_" in n, n))
        for n in order:
            if effs[n] == eff:
                return n
        bits = (eff["weight"] and eff["weight"]["bits"], eff["act"] and eff["act"]["bits"])
        same_bits = [n for n in order if _eff_bits(presets[n]) == bits]
        if same_bits:
            base, ref = same_bits[0], effs[same_bits[0]]
        else:
            base, w8a8 = _bits_name(*bits), presets["w8a8"]
            ref = dataclasses.replace(w8a8, name=base,
                                      weight=dataclasses.replace(w8a8.weight, bits=bits[0]),
                                      act=dataclasses.replace(w8a8.act, bits=bits[1]))._effective()
        return base + "".join(_suffixes(eff, ref))

    def _effective(self) -> dict[str, Any]:
        """What quantizes differently, with settings that have no effect normalised away."""
        w, a = _eff_spec(self.weight, act=False), _eff_spec(self.act, act=True)
        qkv = self.qkv_spec
        attn = None
        if self.quantize_attention and qkv.enabled:
            attn = (qkv.bits, None if is_fp_bits(self.sm_bits) else self.sm_bits)
        low = [s["bits"] for s in (w, a) if s is not None]

        def bump(b: int | None) -> int | None:
            return b if b is not None and any(x < b for x in low) else None

        return {
            "weight": w, "act": a, "attn": attn,
            "first_last_bits": bump(self.first_last_bits),
            "time_emb_bits": bump(self.time_emb_bits),
            "skip_fp": self.skip_fp if low else None,
            "split_shortcut": self.split_shortcut if a is not None else None,
            "split_conv1": self.split_conv1 if a is not None else None,
            "include": self.include, "exclude": self.exclude,
            "overrides": self.to_dict()["overrides"],
        }

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


# ------------------------------------------------------------------------------------------------
# presets and labels
# ------------------------------------------------------------------------------------------------
_WXAY = re.compile(r"^w(\d+)a(\d+)(?![0-9])", re.IGNORECASE)


def _bits_dir() -> Any:
    """``lowbit/conf/bits`` as an importlib.resources Traversable (works from a wheel)."""
    return importlib.resources.files("lowbit").joinpath("conf", "bits")


@functools.lru_cache(maxsize=1)
def preset_names() -> tuple[str, ...]:
    """Names of the shipped ``bits`` presets, sorted (``fp``, ``w1a1`` …)."""
    return tuple(sorted(p.name[:-5] for p in _bits_dir().iterdir() if p.name.endswith(".yaml")))


@functools.cache
def _raw_preset_text(name: str) -> str:
    return _bits_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def _raw_preset(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(_raw_preset_text(name)) or {}


@functools.lru_cache(maxsize=1)
def _presets() -> dict[str, QuantConfig]:
    return {n: QuantConfig.preset(n) for n in preset_names()}


@functools.lru_cache(maxsize=1)
def _preset_effectives() -> dict[str, dict[str, Any]]:
    return {n: c._effective() for n, c in _presets().items()}


_MISSING = object()

# What a method's ``bits_rules`` may set: the strengthenings of a plain preset (never its bits or
# its name, which stay the preset's, nor the layer-name lists, which are the model's).
RULE_KEYS = ("sm_bits", "attn_bits", "quantize_attention", "first_last_bits", "time_emb_bits",
             "skip_fp", "split_shortcut", "split_conv1", "weight", "act")
RULE_SPEC_KEYS = ("granularity", "symmetric", "init", "percentile", "learnable", "timestep_aware",
                  "interp")


def run_bits(config: Mapping[str, Any]) -> dict[str, Any]:
    """The effective ``bits`` mapping of a run config (a DictConfig or the resolved dict that
    results.json keeps): ``config["bits"]`` with the
    method's ``bits_rules`` merged over it (nested ``weight``/``act`` merge key by key).

    A method states the rules of its paper there (QuEST: MSE ranges, 8-bit first/last layers and
    time embedding), so the bits preset stays the papers' plain setting and every strengthening
    shows in the run label (:func:`bits_label` of this mapping). A user changes them with
    ``method.bits_rules.<key>=...``; a ``bits.<key>`` override that a rule would replace is
    refused, naming that key.
    """
    from omegaconf import DictConfig, OmegaConf

    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node

    bits = dict(plain(config.get("bits")) or {})
    method = config.get("method")
    rules = plain(method.get("bits_rules") if method is not None else None) or {}
    if not isinstance(rules, Mapping):
        raise ConfigError("method.bits_rules", rules, "must be a mapping",
                          f"give keys among {', '.join(RULE_KEYS)}")
    preset = _raw_preset(bits["name"]) if bits.get("name") in preset_names() else None

    def shadowed(path: tuple[str, ...]) -> None:
        """A rule that would silently replace a ``bits.<key>`` override is refused."""
        if preset is None:
            return
        have, ref = bits, preset
        for p in path:
            have, ref = (have or {}).get(p, _MISSING), (ref or {}).get(p, _MISSING)
        if have is not _MISSING and have != ref:
            key = ".".join(path)
            raise ConfigError(f"bits.{key}", have,
                              f"method.bits_rules.{key} sets this key for the method",
                              f"pass method.bits_rules.{key}={have} instead")

    for k, v in rules.items():
        if k not in RULE_KEYS:
            raise ConfigError(f"method.bits_rules.{k}", v,
                              "not a rule a method may set (bits and names stay the preset's)",
                              f"use one of {', '.join(RULE_KEYS)}, or choose another bits preset")
        if k in ("weight", "act"):
            if not isinstance(v, Mapping) or set(v) - set(RULE_SPEC_KEYS):
                bad = sorted(set(v) - set(RULE_SPEC_KEYS)) if isinstance(v, Mapping) else v
                raise ConfigError(f"method.bits_rules.{k}", bad,
                                  "not a quantizer rule a method may set",
                                  f"use keys among {', '.join(RULE_SPEC_KEYS)}")
            for sk in v:
                shadowed((k, sk))
            bits[k] = {**dict(bits.get(k) or {}), **dict(v)}
        else:
            shadowed((k,))
            bits[k] = v
    return bits


def bits_label(bits: Mapping[str, Any], key: str = "bits") -> str:
    """The run label of a ``bits`` mapping (a resolved ``cfg.bits``): see :meth:`QuantConfig.label`."""
    return QuantConfig.from_dict(bits, key=key).label()


def _fp_none(bits: int | None) -> int | None:
    return None if is_fp_bits(bits) else bits


def _bits_name(w: int | None, a: int | None) -> str:
    return f"w{16 if w is None else w}a{16 if a is None else a}"


def _eff_bits(cfg: QuantConfig) -> tuple[int | None, int | None]:
    return _fp_none(cfg.weight.bits), _fp_none(cfg.act.bits)


def _eff_spec(spec: QuantSpec, *, act: bool) -> dict[str, Any] | None:
    if not spec.enabled:
        return None
    init = f"pct{spec.percentile:g}" if spec.init == "percentile" else spec.init
    d = {"bits": spec.bits, "granularity": spec.granularity, "symmetric": spec.symmetric,
         "init": init, "learnable": spec.learnable}
    if act:
        d["timestep_aware"] = spec.timestep_aware
        d["interp"] = spec.interp if spec.timestep_aware else None
    return d


def _b(bits: int | None) -> str:
    return "fp" if bits is None else f"{bits}bit"


def _suffixes(eff: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for side, tag in (("weight", "w"), ("act", "act")):
        s, r = eff[side], ref[side]
        if s is None or r is None:  # bits differ: only when the reference has other bits
            continue
        if s["granularity"] != r["granularity"]:
            kind, g = parse_granularity(side, s["granularity"])
            short = "chan" if kind == "channel" else kind
            out.append(f"+{short}{g or ''}-{tag}")
        if s["symmetric"] != r["symmetric"]:
            out.append(f"+{'sym' if s['symmetric'] else 'asym'}-{tag}")
        if s["init"] != r["init"]:
            out.append(f"+{s['init']}-{tag}")
        if s["learnable"] != r["learnable"]:
            out.append(f"+{'lsq' if s['learnable'] else 'fixed'}-{tag}")
        if side == "act":
            if s["timestep_aware"] != r["timestep_aware"]:
                out.append(f"+{'ts' if s['timestep_aware'] else 'nots'}-act")
            if s["interp"] is not None and s["interp"] != (r["interp"] or "nearest"):
                out.append(f"+{s['interp']}-act")
    s, r = eff["attn"], ref["attn"]
    if s is None and r is not None:
        out.append("+fp-attn")
    elif s is not None:
        if r is None or s[0] != r[0]:
            out.append(f"+{_b(s[0])}-attn")
        if r is None or s[1] != r[1]:
            out.append(f"+{_b(s[1])}-sm")
    for k, tag in (("first_last_bits", "io"), ("time_emb_bits", "temb")):
        if eff[k] != ref[k]:
            out.append(f"+{'same' if eff[k] is None else f'{eff[k]}bit'}-{tag}")
    if eff["skip_fp"] is not None and eff["skip_fp"] != bool(ref["skip_fp"]):
        out.append("+fp-skip" if eff["skip_fp"] else "+q-skip")
    if eff["split_shortcut"] is not None and eff["split_shortcut"] != ref["split_shortcut"] \
            and ref["split_shortcut"] is not None:
        out.append("+split" if eff["split_shortcut"] else "+nosplit")
    if eff["split_conv1"] is not None and eff["split_conv1"] != bool(ref["split_conv1"]) \
            and ref["split_conv1"] is not None:
        out.append("+split-conv1" if eff["split_conv1"] else "+nosplit-conv1")
    out.extend(f"+{k}" for k in ("include", "exclude", "overrides") if eff[k] != ref[k])
    return out


def _check_name(name: str, weight: QuantSpec, act: QuantSpec, is_fp: bool, key: str) -> None:
    """A ``wXaY…`` name must match the weight/act bits (16 and 32 mean FP); ``fp`` must quantize
    nothing. Other names are free-form labels."""
    w, a = _fp_none(weight.bits), _fp_none(act.bits)
    if str(name).lower() == "fp":
        if not is_fp:
            what = [f"{key}.{side}.bits={spec.bits}" for side, spec in (("weight", weight),
                                                                       ("act", act)) if spec.enabled]
            other = (f"name it {_suggest(w, a)!r}" if what else
                     "drop the name (QuantConfig.label() then names it, e.g. fp+8bit-attn)")
            raise ConfigError(f"{key}.name", name,
                              f"says full precision but {' and '.join(what) or 'the attention matmuls'}"
                              f" quantize", f"load QuantConfig.preset('fp') (bits=fp), or {other}")
        return
    m = _WXAY.match(str(name))
    if m is None:
        return
    nw, na = (_fp_none(int(x)) for x in m.groups())
    bad = [f"{key}.{side}.bits={spec.bits}" for side, spec, want, got
           in (("weight", weight, nw, w), ("act", act, na, a)) if want != got]
    if bad:
        said = _suggest(nw, na)
        load = f"load QuantConfig.preset({said!r}), " if said in preset_names() else ""
        raise ConfigError(f"{key}.name", name,
                          f"says W{m.group(1)}A{m.group(2)} but {' and '.join(bad)}",
                          f"set the bits the name says, {load}or name it {_suggest(w, a)!r} "
                          f"(QuantConfig.label() names a derived config)")


def _suggest(w: int | None, a: int | None) -> str:
    """A preset name with these weight/act bits (read from the yaml text: no recursion), else
    ``w<X>a<Y>``."""
    import yaml

    for n in sorted(preset_names(), key=lambda n: ("_" in n, n)):
        d = yaml.safe_load(_raw_preset_text(n)) or {}
        bits = [_fp_none((d.get(s) or {}).get("bits", 8)) for s in ("weight", "act")]
        if bits == [w, a]:
            return n
    return _bits_name(w, a)
