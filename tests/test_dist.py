"""Several processes for one run (lowbit.dist): batch slicing, LSQ's gradient scale under a split
batch, the refusals, and — with the `lowbit` command on CPU/gloo — sharded sampling equal to one
process, a DDP fine-tune equal to one process, and exact resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit import dist
from lowbit.config import ConfigError
from lowbit.quant.config import QuantSpec
from lowbit.quant.quantizers import UniformQuantizer
from lowbit.train.data import rank_slice

LOWBIT = str(Path(sys.executable).with_name("lowbit"))


def test_rank_slice_keeps_guidance_pairs():
    x = torch.arange(8).reshape(8, 1)  # [c0 c1 c2 c3 | u0 u1 u2 u3]
    batch = {"x": x, "t": torch.full((8,), 5), "step": torch.tensor(3), "note": "k"}
    r0 = rank_slice(batch, 0, 2, halves=2)
    r1 = rank_slice(batch, 1, 2, halves=2)
    assert r0["x"].flatten().tolist() == [0, 1, 4, 5]
    assert r1["x"].flatten().tolist() == [2, 3, 6, 7]
    assert r0["step"] is batch["step"] and r0["note"] == "k"
    assert rank_slice(batch, 0, 1) is batch
    with pytest.raises(ValueError, match="multiple of"):
        rank_slice(batch, 0, 3, halves=2)


def test_micro_batches_are_parts_of_the_ranks_slice():
    """With k passes per step (trainer.accumulate_grad_batches), the sampler yields each step k
    times and rank r's pass m is part r·k + m of world·k: the rows one process with world·k
    passes would use, guidance pairs kept."""
    from lowbit.train.data import _StepDataset, _StepSampler

    assert list(_StepSampler(lambda: 3, epoch_steps=2, max_steps=10, micro=2)) == [6, 7, 8, 9]
    assert list(_StepSampler(lambda: 9, epoch_steps=2, max_steps=10, micro=2)) == [18, 19]
    x = torch.arange(8).reshape(8, 1)  # [c0 c1 c2 c3 | u0 u1 u2 u3]
    ds = _StepDataset(lambda step, r, w: rank_slice({"x": x + 100 * step}, r, w, halves=2),
                      rank=1, world=2, micro=2)
    item = ds[7]  # step 3, the second pass of rank 1: part 3 of 4
    assert int(item["step"]) == 3
    assert item["x"].flatten().tolist() == [303, 307]


def test_lsq_gradient_of_a_split_batch_equals_the_whole_batch():
    """Two ranks, each with half the batch and batch_split=2, average to the step-size gradient
    of one process with the whole batch (what DDP applies); without the split they would not."""
    torch.manual_seed(0)
    x = torch.randn(8, 16) * 3
    spec = QuantSpec(bits=4, symmetric=False, granularity="tensor", learnable=True)

    def grad(xb: torch.Tensor, split: int) -> torch.Tensor:
        q = UniformQuantizer.for_act(spec, num_channels=16, channel_axis=1)
        q.init_from_tensor(x)  # min-max Δ / zero point of the whole batch
        q.batch_split = split
        (q(xb) ** 2).mean().backward()
        return q.scale.grad.clone()

    whole = grad(x, 1)
    split = (grad(x[:4], 2) + grad(x[4:], 2)) / 2
    unsplit = (grad(x[:4], 1) + grad(x[4:], 1)) / 2
    assert torch.allclose(split, whole, rtol=1e-5, atol=0)
    assert not torch.allclose(unsplit, whole, rtol=1e-2, atol=0)  # off by √2


def test_world_size_and_refusals(monkeypatch):
    from omegaconf import OmegaConf

    assert dist.requested_world(OmegaConf.create({"devices": 2, "num_nodes": 3})) == 6
    assert dist.requested_world(None) == 1
    with pytest.raises(ConfigError, match="trainer.devices"):
        dist.requested_world(OmegaConf.create({"devices": "auto"}))
    assert dist.spawns_for_fit(OmegaConf.create({"strategy": {"start_method": "spawn"}}))
    assert not dist.spawns_for_fit(OmegaConf.create({"strategy": "ddp"}))
    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg = OmegaConf.create({"trainer": {"devices": 2, "num_nodes": 1, "accelerator": "cpu"}})
    with pytest.raises(ConfigError, match="started by the `lowbit` command"):
        dist.launch(cfg)  # not under Hydra: the ranks could not be started


def test_shards_deal_round_robin():
    assert dist.shard(range(7), 0, 3) == [0, 3, 6]
    assert dist.shard(range(7), 2, 3) == [2, 5]
    assert sorted(dist.shard(range(7), 0, 2) + dist.shard(range(7), 1, 2)) == list(range(7))


# -- with the lowbit command: 2 processes on CPU (gloo) ----------------------------------------
BASE = ("logger=none", "threads=1", "sampler.steps=3", "trainer.enable_progress_bar=false",
        "sampler.batch_size=8", "metrics.num_samples=24", "time_vs_fp=false")
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
EFFICIENTDM = ("method=efficientdm", "bits=w4a4", "method.rank=4", "method.calib_n=4",
               "method.calib_steps=2", "method.calib_batch_size=4", "method.max_samples=256",
               "method.batch_size=2", "method.checkpoint_every=2")


def _env(tmp: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_CACHE": str(tmp / "cache")}
    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _lowbit(tmp: Path, out: str, *overrides: str) -> Path:
    run = tmp / out
    proc = subprocess.run([LOWBIT, *BASE, *overrides, f"hydra.run.dir={run}"], cwd=tmp,
                          env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def _results(run: Path) -> dict:
    import json

    return json.loads((run / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_sample_the_images_of_one(tmp_path):
    one = _lowbit(tmp_path, "one", "method=ptq", "bits=w8a8")
    two = _lowbit(tmp_path, "two", "method=ptq", "bits=w8a8", *DDP, "logger=wandb")
    a, b = _results(one), _results(two)
    assert b["cost"]["processes"] == 2 and a["cost"]["processes"] == 1
    assert b["cost"]["sample_batches"] == 3 and b["cost"]["sample_batches_resumed"] == 0
    files = sorted(p.name for p in (one / "samples").glob("*.png"))
    assert files and files == sorted(p.name for p in (two / "samples").glob("*.png"))
    for f in files:
        assert (one / "samples" / f).read_bytes() == (two / "samples" / f).read_bytes(), f
    assert a["metrics"] == b["metrics"]
    assert not (two / "sample_shards").exists()  # removed once the samples are in samples/
    assert (two / "rank_logs" / "train_ddp_process_1.log").is_file()
    assert len(list((two / "wandb").glob("offline-run-*"))) == 1  # rank 0's run only


def test_sampling_skips_the_batches_already_in_the_store(tmp_path):
    """An interrupted sampling run resumes: batches found in the store are not sampled again
    (their files are what the run returns), the others are sampled and stored."""
    from lowbit.cli import compose_config
    from lowbit.sampling import SamplerConfig, sample_batch
    from lowbit.shards import ShardStore, sample_images

    cfg = compose_config(["sampler.steps=2", "sampler.batch_size=4"])
    from hydra.utils import instantiate

    model = instantiate(cfg.model.loader)
    sampler = SamplerConfig.from_cfg(cfg.sampler)
    cond = torch.arange(10) % 10
    store = ShardStore(tmp_path / "shards", "k")
    marker = torch.full((4, 1, 16, 16), 7, dtype=torch.uint8)
    store.save(1, marker)  # batch 1 "from an interrupted attempt"

    def decode(x):
        return (x.clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)

    images, stats = sample_images(model, sampler, cond, 10, 0, decode, store, progress=False)
    assert (stats.batches, stats.sampled, stats.resumed) == (3, 2, 1)
    assert torch.equal(images[4:8], marker)
    assert torch.equal(images[:4], decode(sample_batch(model, sampler, cond, 10, 0, 0)))
    assert store.has(0) and store.has(2)
    again, stats = sample_images(model, sampler, cond, 10, 0, decode, store, progress=False)
    assert stats.resumed == 3 and torch.equal(again, images)


def _trained(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student.safetensors"))


@pytest.mark.slow
def test_ddp_fine_tune_equals_one_process(tmp_path):
    """EfficientDM W4A4, 4 steps at a global batch of 2 trajectories (+ their unconditional
    halves): every rank its slice, DDP averaging the gradients, LSQ counting the whole batch.
    Weights and LoRA factors agree within 1e-5 relative. Activation step sizes are held to what
    Adam can move them: their LSQ gradients are sums of ± rounding residues that nearly cancel,
    so the last bits of the reduction order (one sum of 4 rows, or two of 2 plus an all-reduce)
    can flip the sign of a near-zero gradient, and Adam's first steps move by ≈ lr whatever
    its size; ddp and ddp_spawn, with the same reductions, agree bit for bit."""
    steps, act_lr = 4, 5.0e-4
    one = _trained(_lowbit(tmp_path, "one", *EFFICIENTDM, f"method.steps={steps}"))
    two = _trained(_lowbit(tmp_path, "two", *EFFICIENTDM, f"method.steps={steps}", *DDP))
    spawn = _trained(_lowbit(tmp_path, "spawn", *EFFICIENTDM, f"method.steps={steps}",
                             "trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2"))
    assert one.keys() == two.keys() == spawn.keys()
    for k in one:
        assert torch.equal(two[k], spawn[k]), k
        if not one[k].is_floating_point():
            continue
        if "input_quantizer" in k or "matmul_quantizers" in k:
            # Adam's step is at most lr·(1−β1)/√(1−β2) ≈ 3.2·lr per step in each run
            assert (one[k] - two[k]).abs().max() <= 2 * steps * 3.2 * act_lr, k
        else:
            rel = (one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)
            assert rel <= 1e-5, (k, float(rel))


@pytest.mark.slow
def test_ddp_fine_tune_resumes_exactly_after_a_kill(tmp_path):
    steps = ("method.steps=6",)
    whole = _trained(_lowbit(tmp_path, "whole", *EFFICIENTDM, *steps, *DDP))
    run = tmp_path / "killed"
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([LOWBIT, *BASE, *EFFICIENTDM, *steps, *DDP, f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank at once, mid-fit
    proc.wait()
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    assert 0 < state["global_step"] < 6
    resumed = _lowbit(tmp_path, "killed", *EFFICIENTDM, *steps, *DDP)
    res = _results(resumed)
    assert res["status"] == "done"
    again = _trained(resumed)
    for k in whole:
        assert torch.equal(whole[k], again[k]), k
