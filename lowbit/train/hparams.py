"""Typed method hyper-parameters: a frozen dataclass per method, built strictly from its yaml.

``MyParams.from_cfg(cfg.method)`` checks every key: an unknown key, a missing key or a value of
the wrong type raises :class:`HParamError` naming ``method.<key>`` — before any compute. Nested
dataclasses (QuEST's stages) are checked the same way. ``optimizer`` / ``scheduler`` keys hold
Hydra ``_target_`` nodes (``_partial_: true``) and are instantiated by :meth:`MethodParams.
build_optimizer` / :meth:`MethodParams.build_scheduler`.

Key names common to the methods: ``steps`` (optimisation steps), ``batch_size`` (training batch),
``checkpoint_every`` (steps between ``last.ckpt`` writes), ``calib_n`` / ``calib_batch_size``
(calibration samples and their batch size), ``calib_steps`` (kept steps of the calibration
trajectories), ``max_samples`` (values kept per quantizer for MSE/percentile inits),
``optimizer``, ``scheduler``, ``grad_clip``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T", bound="MethodParams")

# keys every method yaml carries for the framework (not hyper-parameters of the method)
FRAMEWORK_KEYS = ("_target_", "name", "supported_bits", "bits_rules")


class HParamError(ValueError):
    """A method hyper-parameter is unknown, missing or of the wrong type (names the key)."""


def _container(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise HParamError(f"expected a mapping of hyper-parameters, got {type(cfg).__name__}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (int, float, bool, str, tuple[...],
    dict, Optional, nested dataclass); ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except HParamError as e:
                errors.append(str(e))
        raise HParamError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise HParamError(f"{key}={value!r}: expected a mapping of {tp.__name__} keys")
        return _build(tp, dict(value), key)
    if tp is Any:
        return value
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise HParamError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise HParamError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise HParamError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HParamError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HParamError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise HParamError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields) - set(getattr(cls, "ignored_keys", ())))
    if unknown:
        raise HParamError(f"{prefix}.{unknown[0]}: unknown key for {cls.__name__}; known keys: "
                          f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise HParamError(f"{key} is missing (add it to the method's yaml)")
            continue
        kwargs[name] = _coerce(values[name], hints[name], key)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(prefix)
    return obj


@dataclasses.dataclass(frozen=True)
class MethodParams:
    """Base of the per-method hyper-parameter dataclasses (see the module doc)."""

    ignored_keys: ClassVar[tuple[str, ...]] = FRAMEWORK_KEYS

    @classmethod
    def from_cfg(cls: type[T], cfg: Any, prefix: str = "method") -> T:
        return _build(cls, _container(cfg), prefix)

    def check(self, prefix: str) -> None:  # noqa: B027 - optional cross-key checks
        """Cross-key checks; raise :class:`HParamError` naming the key."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def instantiate_partial(node: Mapping[str, Any] | None, key: str) -> Any:
    """A Hydra ``_target_`` node with ``_partial_: true`` as a callable (``None`` stays None)."""
    if node is None:
        return None
    from hydra.utils import instantiate

    if "_target_" not in node:
        raise HParamError(f"{key}: needs a _target_ (e.g. torch.optim.AdamW) and _partial_: true")
    if not node.get("_partial_", False):
        raise HParamError(f"{key}: set _partial_: true (the module supplies the parameters)")
    try:
        return instantiate(dict(node))
    except Exception as e:  # noqa: BLE001 - name the key whatever Hydra raised
        raise HParamError(f"{key}: cannot instantiate {node['_target_']}: {e}") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainParams(MethodParams):
    """The keys of every fine-tuning method: ``steps``, ``batch_size``, ``checkpoint_every``,
    ``optimizer`` and ``scheduler`` (Hydra nodes, ``_partial_: true``), ``grad_clip``."""

    steps: int
    batch_size: int
    checkpoint_every: int
    optimizer: dict
    scheduler: dict | None = None
    grad_clip: float | None = None

    def check(self, prefix: str) -> None:
        for key in ("steps", "batch_size", "checkpoint_every"):
            v = getattr(self, key)
            if v < (0 if key == "steps" else 1):
                raise HParamError(f"{prefix}.{key}={v}: must be positive")
        instantiate_partial(self.optimizer, f"{prefix}.optimizer")  # fails now, not after calib.
        instantiate_partial(self.scheduler, f"{prefix}.scheduler")

    def build_optimizer(self) -> Any:
        return instantiate_partial(self.optimizer, "method.optimizer")

    def build_scheduler(self) -> Any:
        return instantiate_partial(self.scheduler, "method.scheduler")
