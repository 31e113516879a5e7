"""DeepCache (cache=deepcache): exact at N = 1, partial steps equal the stock blocks run by hand
on the cached feature, timestep hooks see every sampler step once, refusals before compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.cache import DeepCache, build_cache, full_step_indices
from lowbit.models.presets import build_preset, example_inputs

TIMESTEPS = [900, 700, 500, 300, 100]


def _calls(net, inputs_at, timesteps):
    with torch.no_grad():
        return [net(**inputs_at(t)).sample for t in timesteps]


@pytest.mark.parametrize("preset", ["digits", "ddpm_cifar10", "sd_v1"])
def test_interval_one_is_bit_exact(preset):
    net = build_preset(preset)
    base = example_inputs(net, batch_size=2, generator=torch.Generator().manual_seed(0))

    def at(t):
        return {**base, "timestep": torch.full((2,), t)}

    plain = _calls(net, at, TIMESTEPS)
    with DeepCache(interval=1, branch=1).attach(net, TIMESTEPS) as h:
        cached = _calls(net, at, TIMESTEPS)
    assert h.calls == {"full": 5, "partial": 0}
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
    assert _calls(net, at, TIMESTEPS[:1])[0].equal(plain[0])  # detached: stock forward again


def _by_hand(net, sample, t, class_labels, branch, deep_input):
    """UNet2DModel's forward with the stock blocks: the shallow path only, the deep part's
    output replaced by ``deep_input`` (what DeepCache's partial step must compute)."""
    t_emb = net.time_proj(t).to(sample.dtype)
    emb = net.time_embedding(t_emb) + net.class_embedding(class_labels)
    h = net.conv_in(sample)
    res = (h,)
    for block in net.down_blocks[:branch]:
        h, r = block(hidden_states=h, temb=emb)
        res += r
    h = deep_input
    n = sum(len(b.resnets) for b in net.up_blocks[len(net.up_blocks) - branch:])
    res = res[:n]
    for block in net.up_blocks[len(net.up_blocks) - branch:]:
        k = len(block.resnets)
        h, res = block(h, res[-k:], emb), res[:-k]
    return net.conv_out(net.conv_act(net.conv_norm_out(h)))


@pytest.mark.parametrize("branch", [1, 2])
def test_partial_step_equals_the_stock_blocks_on_the_cached_feature(branch):
    net = build_preset("digits")
    base = example_inputs(net, batch_size=2, generator=torch.Generator().manual_seed(1))
    deep_in = {}
    first_live = net.up_blocks[len(net.up_blocks) - branch]

    def keep(_module, args):
        deep_in.setdefault("x", args[0])

    hook = first_live.register_forward_pre_hook(keep)
    # the downsampler after the last live down block feeds only the deep part: skipped too
    down_conv = net.down_blocks[branch - 1].downsamplers[0].conv
    ran = []
    down_conv.register_forward_hook(lambda *_: ran.append(1))
    with DeepCache(interval=2, branch=branch).attach(net, TIMESTEPS) as h, torch.no_grad():
        net(**{**base, "timestep": torch.full((2,), 900)})  # full: caches the deep part
        hook.remove()
        assert len(ran) == 1
        got = net(**{**base, "timestep": torch.full((2,), 700)}).sample  # partial
        assert len(ran) == 1
        want = _by_hand(net, base["sample"], torch.full((2,), 700), base["class_labels"],
                        branch, deep_in["x"])
    assert h.calls == {"full": 1, "partial": 1}
    assert torch.equal(got, want)
    with torch.no_grad():
        stock = net(**{**base, "timestep": torch.full((2,), 700)}).sample
    assert not torch.equal(got, stock)  # the deep part really was the cached one


def test_timestep_aware_quantizers_see_each_sampler_step_once():
    from lowbit.models.digits import load_digits_model
    from lowbit.quant import QuantConfig, TimestepActQuantizer, calibrate_, quantize_
    from lowbit.sampling import SamplerConfig, build_scheduler, sample_many

    model = load_digits_model()
    net = model.net
    quantize_(net, QuantConfig.preset("w8a8", act={"timestep_aware": True}))
    base = example_inputs(net, batch_size=4, generator=torch.Generator().manual_seed(0))
    calibrate_(net, [{**base, "timestep": torch.full((4,), t)} for t in (999, 500, 1)])
    q = next(m for m in net.modules() if isinstance(m, TimestepActQuantizer) and not m.passthrough)
    seen = []
    original = q.set_timestep
    q.set_timestep = lambda t: (seen.append(int(t)), original(t))[1]
    s = SamplerConfig(kind="ddim", steps=10, guidance_scale=2.0, batch_size=4)
    timesteps = build_scheduler(model.noise_schedule, "ddim", 10).timesteps
    with DeepCache(interval=3).attach(net, timesteps) as h:
        sample_many(model, s, torch.arange(4), 4, seed=0, progress=False)
    assert seen == [int(t) for t in timesteps]  # guidance: cond + uncond in one call
    assert h.calls == {"full": 4, "partial": 6}


def test_full_step_schedules():
    assert full_step_indices(20, 3) == [0, 3, 6, 9, 12, 15, 18]
    assert full_step_indices(5, 1) == [0, 1, 2, 3, 4]
    nu = full_step_indices(50, 5, "nonuniform", center=25, power=1.4)
    assert len(nu) == 10 and nu[0] == 0 and nu == sorted(set(nu))
    gaps = [b - a for a, b in zip(nu, nu[1:])]
    near = min(range(len(nu)), key=lambda i: abs(nu[i] - 25))
    assert gaps[near] < max(gaps)  # denser around the centre than at the ends
    with pytest.raises(ValueError, match="center"):
        full_step_indices(20, 3, "nonuniform", center=25)


@pytest.mark.parametrize(("over", "key"), [
    ({"interval": 0}, "cache.interval"), ({"branch": 0}, "cache.branch"),
    ({"schedule": "cosine"}, "cache.schedule"), ({"depth": 2}, "cache.depth"),
])
def test_bad_cache_config_names_the_key(over, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_cache({"name": "deepcache", **over})


def test_refusals_name_the_model_and_fix():
    with pytest.raises(ValueError, match="needs a U-Net.*cache=none"):
        DeepCache().check(build_preset("dit"))
    with pytest.raises(ValueError, match=r"cache.branch=3: .*\[1, 2\]"):
        DeepCache(branch=3).check(build_preset("digits"))
    net = build_preset("digits")
    with DeepCache(interval=2).attach(net, TIMESTEPS), torch.no_grad(), \
            pytest.raises(RuntimeError, match="nothing is cached yet"):
        net(**example_inputs(net, timestep=700))


def test_run_records_cache_costs_and_fidelity(make_cfg):
    from lowbit.pipeline import run_experiment

    cfg = make_cfg("cache=deepcache", "cache.interval=5", "metrics.num_samples=40",
                   "sampler.steps=10", "logger=none")
    res = run_experiment(cfg)
    c = res["cost"]
    assert res["cache"] == "deepcache(N=5,b=1)"
    assert (c["cache_full_steps"], c["cache_partial_steps"]) == (2, 8)
    assert c["flops_partial_step"] < 0.5 * c["flops_full_step"] and c["flops_x"] > 1.5
    assert c["cache_speedup"] > 0
    # the FP run with a cache is compared with the FP model without it
    assert 0 < res["metrics"]["psnr"] < 60
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["cache"] == res["cache"]
    # deterministic like every run: a forced re-run gives the same images and metrics
    again = run_experiment(make_cfg("cache=deepcache", "cache.interval=5",
                                    "metrics.num_samples=40", "sampler.steps=10", "logger=none",
                                    "force=true", output_dir=cfg.paths.output_dir))
    for k in ("fid", "psnr", "cond_acc"):
        assert again["metrics"][k] == res["metrics"][k], k


# the DeepCache recipes of the paper's real models: composed as shipped, then run for 2 samples
# on the random-weight pipeline of their architecture written by the test
RECIPES = {"sd15": ("sd_v1", {}, {"sampler.steps": 50, "sampler.guidance_scale": 7.5,
                                  "cache.interval": 3, "cache.branch": 1}),
           "ddpm_cifar10": ("ddpm_cifar10", {"block_out_channels": (32, 32, 32, 32)},
                            {"sampler.steps": 100, "cache.interval": 5, "cache.branch": 1,
                             "metrics.num_samples": 50000})}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_paper_recipes_compose_and_run(tmp_path, recipe):
    from omegaconf import OmegaConf

    from lowbit.cli import compose_config
    from lowbit.models.presets import write_preset_pipeline
    from lowbit.pipeline import run_experiment

    preset, kw, paper = RECIPES[recipe]
    folder = write_preset_pipeline(tmp_path / preset, preset, **kw)
    extra = []
    if preset == "sd_v1":
        prompts = tmp_path / "captions.txt"
        prompts.write_text("a red bus on a street\ntwo cats on a sofa\n")
        extra = [f"dataset.path={prompts}"]
    shipped = compose_config([f"experiment=deepcache/{recipe}", f"model.path={folder}", *extra],
                             output_dir=tmp_path / "run")
    for key, want in paper.items():
        assert OmegaConf.select(shipped, key) == want, key
    cfg = compose_config([f"experiment=deepcache/{recipe}", f"model.path={folder}", *extra,
                          "model.resolution=32", "metrics.num_samples=2", "metrics.grid_size=2",
                          "sampler.steps=6", "sampler.batch_size=2", "logger=none",
                          "device=cpu", "threads=2"], output_dir=tmp_path / "run")
    cfg.paths.cache_dir = str(tmp_path / "cache")
    res = run_experiment(cfg)
    assert res["status"] == "done"
    assert res["cache"].startswith(f"deepcache(N={paper['cache.interval']},b=1")
    c = res["cost"]
    # 6 steps (PLMS evaluates its second timestep twice): every N-th of them full
    calls = 7 if recipe == "sd15" else 6
    assert c["cache_full_steps"] == -(-calls // paper["cache.interval"])
    assert c["cache_full_steps"] + c["cache_partial_steps"] == calls and c["flops_x"] > 1
    assert res["metrics"]["psnr"] > 0  # compared with the uncached model on the same seeds


def test_paired_times_alternate_and_keep_the_fastest(monkeypatch):
    """Interference only adds time: each side's fastest of its alternating repeats is kept."""
    import lowbit.pipeline as pipeline

    clock = iter([0.0, 5.0, 5.0, 8.0, 8.0, 12.0, 12.0, 14.0])  # a: 5, 4; b: 3, 2
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
    order = []
    a, b = pipeline._paired_times(lambda: order.append("a"), lambda: order.append("b"), 2)
    assert order == ["a", "b", "a", "b"] and (a, b) == (4.0, 2.0)
