"""method=binarydm on the digits model: EBB placement, LRM's channel PCA, training effect, the run."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import compose_config
from lowbit.data.digits import load_digits_tensors
from lowbit.methods.base import MethodContext
from lowbit.methods.binarydm import (
    BinaryDM,
    EBBRegularizer,
    EBBWeightBinarizer,
    LRMLoss,
    block_channels,
    channel_pca,
    ebb_binarizers,
    ebb_block_set,
    project,
)
from lowbit.models.digits import load_digits_model
from lowbit.quant.binary import SignWeightBinarizer
from lowbit.train import (
    DiffusionLoss,
    RealImageData,
    StepOutputs,
    StudentModule,
    qat_groups,
    real_calibration_batches,
    timestep_blocks,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("binarydm")
    # W1A32 keeps the fixture fast (no activation calibration); the run test covers W1A4
    cfg = compose_config(["method=binarydm", "bits=w1a32", "method.calib_n=128",
                          f"paths.cache_dir={tmp / 'cache'}"], output_dir=tmp / "run")
    loaded = load_digits_model()
    ctx = MethodContext(cfg=cfg, output_dir=tmp / "run", cache_dir=tmp / "cache", model=loaded)
    method = BinaryDM(cfg.method)
    blocks = timestep_blocks(loaded.net)
    student = method.binary_student(loaded.net, ctx,
                                    method.spec_for(method.ebb_blocks(loaded, loaded.net, blocks)))
    return loaded, ctx, method, blocks, student


def test_ebb_blocks_follow_the_resolution_rule():
    """BinaryDM's EBB blocks are the highest-resolution ones: on LDM-4 (four levels, 64² … 8²,
    two blocks per down level and three per up level in LDM's numbering) the upper half of the
    levels — the paper's first and last six timestep blocks; not a fixed count."""
    from lowbit.train import TimestepBlock

    down = [64, 64, 32, 32, 16, 16, 8, 8]
    up = [8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    res = [r * r for r in [*down, 8, *up]]
    blocks = [TimestepBlock(f"b{i}", (f"b{i}",), "down") for i in range(len(res))]
    chosen = [int(b.output[1:]) for b in ebb_block_set(blocks, res)]
    assert chosen == [0, 1, 2, 3, 15, 16, 17, 18, 19, 20]
    assert [int(b.output[1:]) for b in ebb_block_set(blocks, res, levels=1)] == [0, 1, 18, 19, 20]


def test_ebb_only_on_head_and_tail_blocks(setup):
    loaded, _, method, blocks, student = setup
    head_tail = method.ebb_blocks(loaded, loaded.net, blocks)
    # the digits U-Net works at 16², 8², 4²: the upper half of three levels is the 16² level
    assert [b.output for b in head_tail] == ["down_blocks.0.resnets.0", "up_blocks.2.resnets.0",
                                             "up_blocks.2.resnets.1"]
    ebb, plain = 0, 0
    for name, m in student.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, EBBWeightBinarizer):
            assert any(b.contains(name) for b in head_tail), name
            ebb += m.weight.numel()
        elif isinstance(q, SignWeightBinarizer):
            assert not any(b.contains(name) for b in head_tail), name
            plain += m.weight.numel()
    # the paper puts EBB on ~15 % of the parameters; on digits the 16² blocks hold ≈ 9 %
    assert 0.05 < ebb / (ebb + plain) < 0.2
    # the input/output convs stay 8-bit uniform, not binarized
    assert not isinstance(student.conv_in.weight_quantizer, SignWeightBinarizer | EBBWeightBinarizer)


def test_channel_pca_is_over_channels_not_width():
    torch.manual_seed(0)
    # features whose channel vectors vary along one direction u; the width axis is noise
    u = torch.tensor([3.0, 0.0, 4.0, 0.0]) / 5
    coef = torch.randn(64, 1, 5, 7)
    f = coef * u.reshape(1, 4, 1, 1) + 0.01 * torch.randn(64, 4, 5, 7)
    mean, basis = channel_pca(f, 1)
    assert basis.shape == (4, 1)
    assert abs(float(basis[:, 0] @ u)) > 0.99
    proj = project(f, mean, basis)
    assert proj.shape == (64, 5, 7, 1)


def test_lrm_is_zero_for_the_teacher_and_stored_as_buffers(setup):
    loaded, _, _, blocks, _ = setup
    names = [b.output for b in blocks]
    lrm = LRMLoss(names, block_channels(loaded, loaded.net, names), 1e-4)
    lrm.fit_pca(loaded, loaded.net, _calib(loaded))
    assert bool(lrm.fitted)
    sd = lrm.state_dict()
    assert {f"basis_{i}" for i in range(len(names))} <= set(sd)
    assert sd["basis_0"].shape == (32, 8)  # C = 32 → top C/4 directions
    feats = {n: torch.randn(2, c, 4, 4) for n, c in zip(names, lrm_channels(lrm))}
    assert float(lrm(StepOutputs({}, None, feats, None, feats))) == 0.0


def test_lrm_is_averaged_over_blocks_not_summed():
    """BinaryDM's LRM is a mean over the mimicked blocks: the same per-block error on one block
    or on three gives the same loss (a sum would triple it)."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)

    def lrm(n: int) -> float:
        names = [f"b{i}" for i in range(n)]
        term = LRMLoss(names, [8] * n, 1.0)
        for i in range(n):
            getattr(term, f"basis_{i}").copy_(torch.eye(8)[:, :2])
        feats_s, feats_t = dict.fromkeys(names, s), dict.fromkeys(names, t)
        return float(term(StepOutputs({}, None, feats_s, None, feats_t)))

    one = lrm(1)
    assert one > 0
    assert lrm(3) == pytest.approx(one, rel=1e-6)


def test_w1a4_activations_are_per_layer_lsq():
    """BinaryDM W1A4 (paper): one learnable 4-bit step per layer input (per tensor, LSQ), not
    per channel or per timestep; the binarized layers keep these quantizers."""
    from lowbit.methods.ptq import quant_config

    cfg = compose_config(["method=binarydm", "bits=w1a4"])
    act = quant_config(cfg).act
    assert (act.bits, act.granularity, act.learnable, act.timestep_aware) == (4, "tensor", True,
                                                                                False)


def _calib(model):
    x, y = load_digits_tensors()
    return real_calibration_batches(model, x, y, 32, 32, seed=1)


def lrm_channels(lrm: LRMLoss) -> list[int]:
    return [getattr(lrm, f"mean_{i}").numel() for i in range(len(lrm.feature_names))]


def _params(module: StudentModule) -> list:
    return [p for g in module.groups for _, p in g.params]


def _steps(module: StudentModule, batch, n: int, lr: float = 5e-4, key: str = "loss") -> None:
    """``n`` Adam steps on the loss term ``key`` (default: the total)."""
    opt = torch.optim.Adam(_params(module), lr=lr)
    for _ in range(n):
        opt.zero_grad()
        module.losses(batch)[key].backward()
        opt.step()


def _losses(module: StudentModule, batch) -> dict[str, float]:
    with torch.no_grad():
        return {k: float(v) for k, v in module.losses(batch).items()}


def test_training_steps_reduce_binarydm_loss(setup):
    loaded, _, _, blocks, student = setup
    names = [b.output for b in blocks]
    chans = block_channels(loaded, loaded.net, names)
    lrm = LRMLoss(names, chans, 1e-4)
    lrm.fit_pca(loaded, loaded.net, _calib(loaded))
    ebb = EBBRegularizer(ebb_binarizers(student), tau=0.09, switch_at=1.0)
    module = StudentModule(student, loaded.net, loaded, qat_groups(student, 5e-4, None),
                           [DiffusionLoss(), ebb, lrm], max_steps=100)
    x, y = load_digits_tensors()
    batch = RealImageData(loaded, x[:16], y[:16], 16, seed=1).batch(0)
    before = _losses(module, batch)
    assert set(before) == {"task", "ebb_reg", "lrm", "loss"}
    _steps(module, batch, 5)
    after = _losses(module, batch)
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    # the regulariser τ·mean|σ₂| alone shrinks the second basis (with the task loss, σ₂ may
    # grow in the first steps: the task gradient is ~100× larger)
    only_ebb = StudentModule(student, loaded.net, loaded, qat_groups(student, 5e-4, None),
                             [ebb], max_steps=100)
    ebb_before = _losses(only_ebb, batch)["ebb_reg"]
    _steps(only_ebb, batch, 3, key="ebb_reg")
    assert _losses(only_ebb, batch)["ebb_reg"] < ebb_before
    # LRM's own gradient (weight 1e-4 in the paper) is drowned by the task loss in a few steps;
    # alone, it pulls the student's low-rank features towards the teacher's
    lrm.weight = 1.0
    only_lrm = StudentModule(student, loaded.net, loaded, qat_groups(student, 5e-4, None),
                             [lrm], max_steps=100)
    lrm_before = _losses(only_lrm, batch)["lrm"]
    _steps(only_lrm, batch, 3, key="lrm")
    assert _losses(only_lrm, batch)["lrm"] < lrm_before


def test_labels_name_the_ablations():
    def label(*ov):
        return BinaryDM(compose_config(["method=binarydm", *ov]).method).label
    assert label() == "binarydm"
    assert label("method.ebb=false") == "binarydm(no-ebb)"
    assert label("method.lrm=false", "method.ebb_levels=1") == "binarydm(ebb_levels=1,no-lrm)"


def test_binarydm_run_writes_costs_checkpoint_and_resumes(make_cfg, tmp_path):
    out = tmp_path / "run"
    from lowbit.pipeline import run_experiment

    # per-tensor activations: the w1a4 preset's per-input-channel activation scales cannot run
    # as a binary GEMM, so its OPs are FLOPs (lowbit.metrics.cost.integer_gemm)
    ov = ["method=binarydm", "bits=w1a4", "bits.act.granularity=tensor", "method.steps=3",
          "method.batch_size=8",
          "method.calib_n=64", "method.lrm_samples=64", "metrics.num_samples=20",
          "sampler.steps=3", "logger=none"]
    res = run_experiment(make_cfg(*ov, output_dir=out))
    cost = res["cost"]
    for k in ("size_mb", "ops", "finetune_s", "calib_s", "trainable_params", "ops_fp", "size_x", "ops_x"):
        assert k in cost, k
    assert cost["size_x"] > 10 and cost["ops_x"] > 5
    assert res["method"] == "binarydm" and res["report"]["training"]["steps"] == 3
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert any(k.startswith("terms.2.basis_") for k in ck["state_dict"])  # LRM bases
    assert not any(k.startswith("teacher.") for k in ck["state_dict"])
    # after training every EBB keeps one basis: the saved model is purely 1-bit
    from safetensors.torch import load_file

    assert json.loads((out / "results.json").read_text())["report"]["ebb_layers"] > 0
    stages = [v for k, v in load_file(str(out / "student.safetensors")).items()
              if k.endswith("weight_quantizer.stage")]
    assert stages and all(int(s) == 2 for s in stages)
    res2 = run_experiment(make_cfg(*ov, "resume=true", "force=true", output_dir=out))
    assert res2["report"]["training"]["resumed"] is True
    assert res2["report"]["training"]["steps"] == 3  # nothing left to train


def test_unsupported_bits_fail_before_compute(make_cfg):
    from lowbit.config import ConfigError
    from lowbit.pipeline import run_experiment

    with pytest.raises(ConfigError, match="bits"):
        run_experiment(make_cfg("method=binarydm", "bits=w1a1", "logger=none"))


def test_quantizer_scales_get_their_own_learning_rate(setup):
    loaded, _, _, _, student = setup
    ebb = ebb_binarizers(student)
    groups = qat_groups(student, 1e-3, 1e-4, keep_lr=[b.sigma2 for b in ebb])
    assert [g.name for g in groups] == ["weights", "scales"]
    scales = {id(p) for _, p in groups[1].params}
    assert all(id(b.sigma1) in scales and id(b.sigma2) not in scales for b in ebb)
    plain = [m.weight_quantizer for m in student.modules()
             if isinstance(getattr(m, "weight_quantizer", None), SignWeightBinarizer)]
    assert all(id(q.alpha) in scales for q in plain)
    params = BinaryDM(compose_config(["method=binarydm", "method.steps=10"]).method).params
    module = StudentModule(student, loaded.net, loaded, groups, [DiffusionLoss()], max_steps=10,
                           optimizer=params.build_optimizer(), scheduler=params.build_scheduler())
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.AdamW
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-4, 1e-3]
