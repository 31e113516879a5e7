"""QAT on real images for the binary methods (BinaryDM, BiDM, the XNOR/ReActNet baselines).

The student starts from the FP weights (quantized with the ``bits`` config, its 1-bit layers
binarized by the method's spec, the remaining static activation quantizers calibrated on noised
real images) and is trained by :class:`~lowbit.train.module.StudentModule` with the diffusion
loss on real images + noise (label dropout keeps classifier-free guidance working), plus each
method's own terms (BinaryDM: LRM and the EBB regulariser; BiDM: SPD). The teacher runs only
when a term needs it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from lowbit.data.digits import load_digits_tensors
from lowbit.methods.base import Method, MethodContext
from lowbit.methods.ptq import quant_config
from lowbit.quant.binary import SpecFn, binarize_
from lowbit.train import (
    DiffusionLoss,
    LossTerm,
    RealImageData,
    StudentModule,
    TeacherMSE,
    build_student,
    fit,
    qat_groups,
    real_calibration_batches,
)
from lowbit.train.hparams import HParamError, TrainParams

log = logging.getLogger(__name__)

SPLITS = ("train", "all")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryQATParams(TrainParams):
    """Keys shared by the binary QAT methods."""

    lr: float
    scale_lr: float | None = None
    weight_decay: float = 0.0
    p_uncond: float = 0.1
    kd_weight: float = 0.0
    calib_n: int = 512
    calib_batch_size: int = 64
    train_split: str = "train"

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if not 0.0 <= self.p_uncond <= 1.0:
            raise HParamError(f"{prefix}.p_uncond={self.p_uncond}: a probability in [0, 1]")
        if self.train_split not in SPLITS:
            raise HParamError(f"{prefix}.train_split={self.train_split!r}: choose one of "
                              f"{', '.join(SPLITS)} (train keeps the held-out images out)")
        for key in ("calib_n", "calib_batch_size"):
            if getattr(self, key) < 1:
                raise HParamError(f"{prefix}.{key}={getattr(self, key)}: must be positive")


def real_images(ctx: MethodContext, split: str) -> tuple[Tensor, Tensor | None]:
    """The dataset's real images in [-1, 1] and their conditions: class labels, or for a
    text-to-image model the embeddings of their captions (digits: all 1,797 without a dataset)."""
    if ctx.dataset is None:
        return load_digits_tensors()
    if ctx.model.conditioning == "text":
        captions = ctx.dataset.captions(split)  # a dataset without captions fails, naming the key
        return ctx.dataset.images(split), ctx.model.make_cond(captions, len(captions))
    labels = ctx.dataset.labels(split) if ctx.model.conditioning == "class" else None
    return ctx.dataset.images(split), labels


class BinaryQAT(Method):
    """Base of the binary QAT methods: :meth:`binary_student` and :meth:`train`."""

    params_class: type[BinaryQATParams] = BinaryQATParams

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.params = self.params_class.from_cfg(cfg)

    def binary_student(self, teacher: nn.Module, ctx: MethodContext, spec_for: SpecFn
                       ) -> nn.Module:
        """Quantize a copy of the teacher with the ``bits`` config, binarize its 1-bit layers
        with ``spec_for`` and calibrate the remaining static activation quantizers on noised real
        images (seed stream ``calibration``). Records what was done in ``ctx.report``."""
        p = self.params
        qcfg = quant_config(ctx.cfg)  # bad bits fail here, before any compute
        if qcfg.weight.bits != 1:
            raise ValueError(f"bits={qcfg.name}: binary methods need 1-bit weights (bits=w1a*)")
        images, labels = real_images(ctx, p.train_split)
        batches = real_calibration_batches(ctx.model, images, labels, p.calib_n,
                                           p.calib_batch_size, seed=int(ctx.cfg.seed))
        # weight quantizers are initialised by calibrate_: the 1-bit uniform ones that the
        # binarizers replace never need their (MSE-searched) grid
        student, info = build_student(teacher, qcfg, batches, init_weights=False,
                                      transform=lambda s: binarize_(s, spec_for))
        ctx.cost["calib_s"] = info.calib_s
        ctx.report.update(info.report())
        ctx.report["binarized"] = info.transform
        log.info("%d layers binarized", len(info.transform))
        return student

    def train(self, student: nn.Module, teacher: nn.Module, ctx: MethodContext,
              terms: Sequence[LossTerm] = (), keep_lr: Iterable[nn.Parameter] = ()) -> dict:
        """Diffusion loss (+ ``kd_weight``·ε-MSE to the teacher) + ``terms`` on real images;
        records ``finetune_s`` and ``trainable_params`` in ``ctx.cost``, the fit in
        ``ctx.report["training"]``."""
        p = self.params
        all_terms: list[LossTerm] = [DiffusionLoss()]
        if p.kd_weight > 0:
            all_terms.append(TeacherMSE(p.kd_weight, name="kd"))
        all_terms += list(terms)
        groups = qat_groups(student, p.lr, p.scale_lr, p.weight_decay, keep_lr)
        module = StudentModule(student, teacher, ctx.model, groups, all_terms,
                               max_steps=p.steps, optimizer=p.build_optimizer(),
                               scheduler=p.build_scheduler(), grad_clip=p.grad_clip)
        images, labels = real_images(ctx, p.train_split)
        data = RealImageData(ctx.model, images, labels, p.batch_size, seed=int(ctx.cfg.seed),
                             p_uncond=p.p_uncond, stream="qat_images")
        stats = fit(module, data, ctx, max_steps=p.steps, checkpoint_every=p.checkpoint_every)
        ctx.cost["finetune_s"] = stats.seconds
        ctx.cost["trainable_params"] = stats.trainable_params
        ctx.report["training"] = stats.to_dict()
        return stats.to_dict()
