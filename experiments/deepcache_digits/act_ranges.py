"""Do partial (cached) steps feed the live layers activations outside the ranges a calibration on
plain trajectories sees? For every conv/linear input on the live path of DeepCache (branch 1),
the largest |x| over full steps of plain sampling against that over the partial steps of cached
sampling, on the FP digits model, 200 samples, DDIM 20, guidance 2, N = 5.

Usage: .venv/bin/python experiments/deepcache_digits/act_ranges.py   (prints a table; ~1 min)
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.cache import DeepCache, deep_modules
from lowbit.models.digits import load_digits_model
from lowbit.sampling import SamplerConfig, build_scheduler, sample_many


def main(n: int = 200, interval: int = 5) -> None:
    torch.set_num_threads(1)
    model = load_digits_model()
    net = model.net
    deep = {name for name, _ in deep_modules(net, 1)}
    live = {name: m for name, m in net.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
            and not any(name == d or name.startswith(d + ".") for d in deep)}
    state = {"phase": None}
    peak: dict[tuple[str, str], float] = {}
    cache = DeepCache(interval=interval, branch=1)
    cfg = SamplerConfig(kind="ddim", steps=20, guidance_scale=2.0, batch_size=100)
    timesteps = build_scheduler(model.noise_schedule, "ddim", 20).timesteps
    full = set(timesteps[i].item() for i in range(0, 20, interval))

    def pre(_net, args, kwargs):
        t = int(torch.as_tensor(kwargs["timestep"]).reshape(-1)[0])
        state["phase"] = (state["mode"], "full" if t in full else "partial")

    def hook(name):
        def f(_m, args):
            key = (name, *state["phase"])
            peak[key] = max(peak.get(key, 0.0), float(args[0].detach().abs().max()))
        return f

    handles = [net.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(hook(name)) for name, m in live.items()]
    labels = torch.arange(n) % 10
    state["mode"] = "plain"
    sample_many(model, cfg, labels, n, seed=0, progress=False)
    state["mode"] = "cached"
    with cache.attach(net, timesteps):
        sample_many(model, cfg, labels, n, seed=0, progress=False)
    for h in handles:
        h.remove()
    print("| live layer input | max abs, plain (all steps) | max abs, cached partial steps | ratio |")
    print("|---|---|---|---|")
    worst = 0.0
    for name in live:
        plain = max(peak.get((name, "plain", p), 0.0) for p in ("full", "partial"))
        part = peak.get((name, "cached", "partial"), 0.0)
        if plain > 0:
            worst = max(worst, part / plain)
            print(f"| {name} | {plain:.3f} | {part:.3f} | {part / plain:.3f} |")
    print(f"\nlargest ratio: {worst:.3f}")


if __name__ == "__main__":
    main()
