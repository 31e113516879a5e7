"""Which parameters of a student train, and at which learning rate.

Parameters are chosen by **role** and **module-name pattern** (``role="weight",
include=["*time_emb_proj"]``). Roles are the quant roles of :data:`lowbit.quant.ROLES`
(``weight, bias, weight_scale, weight_zero_point, act_scale, act_zero_point``) plus ``lora``:
every parameter inside a child named ``lora`` or ``lora_*`` of a matching module (the convention
LoRA-style adapters follow: ``layer.lora.A``). A :class:`ParamGroup` is one optimiser parameter
group; the optimiser itself comes from the method's config (``optimizer: {_target_: …,
_partial_: true}``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from lowbit.quant import ROLES, quant_params

LORA_ROLE = "lora"
SCALE_ROLES = ("weight_scale", "act_scale")


def _matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


def select_params(model: nn.Module, role: str, include: Sequence[str] = ("*",),
                  exclude: Sequence[str] = (), param_exclude: Sequence[str] = ()
                  ) -> list[tuple[str, nn.Parameter]]:
    """``(qualified parameter name, parameter)`` of ``role`` in the quantized modules whose names
    match ``include`` and none of ``exclude`` (shell-style patterns, e.g. ``"*time_emb_proj"``);
    ``param_exclude`` drops qualified parameter names (e.g. ``"*.softmax.scale"``).

    ``role``: one of :data:`lowbit.quant.ROLES`, or ``"lora"`` (parameters under a ``lora``/
    ``lora_*`` child of a matching module). Duplicates (shared parameters) are returned once.
    """
    if role != LORA_ROLE and role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; allowed: {', '.join(ROLES)}, lora.")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    out: dict[int, tuple[str, nn.Parameter]] = {}
    if role == LORA_ROLE:
        for pname, p in model.named_parameters():
            parts = pname.split(".")
            cut = next((i for i, s in enumerate(parts) if s == "lora" or s.startswith("lora_")),
                       None)
            if cut is not None and _matches(".".join(parts[:cut]), include, exclude):
                out[id(p)] = (pname, p)
    else:
        for mname, p in quant_params(model, role):
            if _matches(mname, include, exclude):
                out[id(p)] = (names.get(id(p), f"{mname}.<{role}>"), p)
    return [(n, p) for n, p in out.values()
            if not any(fnmatch.fnmatchcase(n, q) for q in param_exclude)]


@dataclass
class ParamGroup:
    """One optimiser parameter group: named parameters, a learning rate, a weight decay."""

    name: str
    params: list[tuple[str, nn.Parameter]]
    lr: float
    weight_decay: float = 0.0

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def to_optimizer_group(self) -> dict:
        return {"params": [p for _, p in self.params], "lr": self.lr,
                "weight_decay": self.weight_decay, "name": self.name}


def param_group(model: nn.Module, name: str, role: str, lr: float,
                include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                weight_decay: float = 0.0, allow_empty: bool = False,
                param_exclude: Sequence[str] = ()) -> ParamGroup:
    """:func:`select_params` as a :class:`ParamGroup`; an empty selection is an error (a pattern
    that matches nothing is a config mistake) unless ``allow_empty``."""
    params = select_params(model, role, include, exclude, param_exclude)
    if not params and not allow_empty:
        raise ValueError(f"parameter group {name!r}: no {role} parameters in modules matching "
                         f"{list(include)} (excluding {list(exclude)}); check the layer patterns.")
    return ParamGroup(name, params, float(lr), float(weight_decay))


def requires_grad_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter of ``model`` that currently requires a gradient (QAT: the latent weights,
    biases, norms and whatever quantizer state its spec made learnable)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def qat_groups(model: nn.Module, lr: float, scale_lr: float | None, weight_decay: float = 0.0,
               keep_lr: Iterable[nn.Parameter] = ()) -> list[ParamGroup]:
    """QAT's two groups: every trainable parameter at ``lr``, except the quantizer step sizes and
    binarizer scales (roles ``weight_scale``/``act_scale``, values ~1e-2 that Adam would move by
    ``lr`` per step), which learn at ``scale_lr``; ``keep_lr`` scales stay at ``lr``
    (BinaryDM's σ₂, which its regulariser must drive to 0). ``scale_lr=None``: one group."""
    params = requires_grad_params(model)
    if scale_lr is None:
        return [ParamGroup("weights", params, float(lr), float(weight_decay))]
    keep = {id(p) for p in keep_lr}
    scales: set[int] = set()
    for role in SCALE_ROLES:
        scales |= {id(p) for _, p in quant_params(model, role)
                   if p.requires_grad and id(p) not in keep}
    return [g for g in (
        ParamGroup("weights", [(n, p) for n, p in params if id(p) not in scales], float(lr),
                   float(weight_decay)),
        ParamGroup("scales", [(n, p) for n, p in params if id(p) in scales], float(scale_lr),
                   float(weight_decay))) if g.params]


def trainable_share(trainable: int, reference: nn.Module) -> float:
    """Trainable parameters as a share of ``reference``'s parameters (the FP model)."""
    total = sum(p.numel() for p in reference.parameters())
    return trainable / max(total, 1)
