"""One run: load the FP model, apply the method, sample, measure, write results, log to W&B."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import lowbit
from lowbit import dist, rundir
from lowbit.cache import DeepCache, build_cache
from lowbit.config import ConfigError, check_writable, validate
from lowbit.data.digits import save_png_folder, to_uint8
from lowbit.memory import PeakMemory
from lowbit.methods import MethodContext, build_method
from lowbit.metrics import build_metrics
from lowbit.metrics.cost import integer_gemm, model_costs
from lowbit.models.adapter import Denoiser
from lowbit.quant import QuantModuleMixin, bits_label, run_bits
from lowbit.rundir import RESULTS, STUDENT, Attempt
from lowbit.sampling import (
    NonFiniteError,
    SamplerConfig,
    build_scheduler,
    check_scheduler,
    sample_many,
)
from lowbit.shards import SHARD_DIR, ShardStats, ShardStore, sample_images, shard_key
from lowbit.tracking import (
    SampleTable,
    WandbRun,
    image_grid_uint8,
    read_results,
    upscale_nearest,
    write_json_atomic,
)

log = logging.getLogger(__name__)

__all__ = ["RESULTS", "STUDENT", "run_experiment", "fp_samples", "decode_images"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine",
                          "pass device=cpu (or device=auto)")
    return torch.device(name)


def _summary_table(results: dict) -> str:
    m, c = results["metrics"], results["cost"]
    head = ["model", "method", "bits", "sampler", *m, "size_mb", "total_s"]
    row = [results["model"], results["method"], results["bits"], results["sampler"],
           *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in m.values()),
           f"{c.get('size_mb', float('nan')):.3g}", f"{c.get('total_s', float('nan')):.1f}"]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n| " + " | ".join(row) + " |"


def run_experiment(cfg: DictConfig) -> dict:
    """Run one job of ``cfg`` and return its results (also written to ``results.json``).

    The run folder holds one attempt (:mod:`lowbit.rundir`): a finished result of the same config
    is returned without running, one of another config is refused (``force=true`` replaces it);
    the attempt writes into a staging folder swapped in when done, so a failure never touches
    the folder's files."""
    validate(cfg)
    dist.launch(cfg)  # the run's other processes, when its trainer asks for several
    if not dist.is_main():
        return _follow(cfg)
    out = Path(cfg.paths.output_dir)
    check_writable(out)
    attempt = Attempt(out, rundir.hydra_staging(out), rundir.run_fingerprint(cfg))
    lock = rundir.RunLock(out)
    try:
        lock.acquire()
    except Exception:
        attempt.discard()
        raise
    try:
        return _attempt(cfg, out, attempt)
    finally:
        lock.release()


def _attempt(cfg: DictConfig, out: Path, attempt: Attempt) -> dict:
    """:func:`run_experiment` once this process holds the folder's lock."""
    try:
        previous = rundir.check_skip(out, cfg)
        resume = rundir.plan_resume(out, cfg) if previous is None else False
    except Exception as e:
        attempt.discard()
        dist.broadcast({"error": f"{type(e).__name__}: {e}"})
        raise
    # the other ranks follow rank 0's decision and write into its run folder
    dist.broadcast({"skip": previous is not None, "resume": resume, "out": str(out)})
    if previous is not None:
        attempt.discard()  # Hydra's .hydra/ of this attempt: the folder keeps the finished one's
        log.info("%s already done with this config — skipped (force=true to re-run)",
                 out / RESULTS)
        return previous
    if bool(cfg.get("resume", None)) != resume:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.resume = resume  # what the training stack reads (lowbit.train.fit)
    attempt.begin()

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    t_start = time.perf_counter()

    try:
        rundir.stamp_state(out, cfg)
        with PeakMemory(device) as memory:
            results = _run(cfg, out, attempt, device, memory, t_start)
    except BaseException as e:
        kept = attempt.fail(e)
        if isinstance(e, OSError) and e.errno in rundir.NO_SPACE:
            raise rundir.no_space_error(e, out) from e
        if kept is not None:
            log.error("attempt failed; its log and config are in %s", kept)
        raise
    finally:
        rundir.unstamp_if_unused(out)
    return results


def _follow(cfg: DictConfig) -> dict:
    """A rank other than 0: rank 0 owns the run folder and decides (skip, resume); this rank
    computes its part of the run in that folder (the fine-tune, its sampling shards) and returns
    ``{}`` — rank 0 returns the results."""
    decision = dist.broadcast(None)
    if "error" in decision:
        raise RuntimeError(f"rank 0 did not start the run: {decision['error']}")
    if decision["skip"]:
        return {}
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.resume = decision["resume"]
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    with PeakMemory(device) as memory:
        _run(cfg, Path(decision["out"]), None, device, memory, time.perf_counter())
    return {}


def build_dataset(cfg: DictConfig):
    """The ``dataset`` group instantiated (``_target_`` + every key), or None without a target."""
    if OmegaConf.select(cfg, "dataset._target_") is None:
        return None
    return instantiate(cfg.dataset, _convert_="all")


@torch.no_grad()
def decode_images(model: Denoiser, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` of samples ``x`` (latents decoded by the model's VAE)."""
    if not model.latent:
        return to_uint8(x)
    return torch.cat([to_uint8(model.decode(x[i : i + batch_size]).cpu())
                      for i in range(0, len(x), batch_size)])


def _run(cfg: DictConfig, out: Path, attempt: Attempt | None, device: torch.device,
         memory: PeakMemory, t_start: float) -> dict | None:
    dataset = build_dataset(cfg)
    suite = build_metrics(cfg.metrics)
    if dataset is not None:
        dataset.check()
    suite.check(dataset)
    model: Denoiser = instantiate(cfg.model.loader)
    model.to(device)
    sampler = SamplerConfig.from_cfg(cfg.sampler)
    check_scheduler(model.noise_schedule, sampler)  # steps vs. the model's schedule: no compute
    fp_sampler = reference_sampler(cfg)  # how the FP model is sampled for paired fidelity
    check_scheduler(model.noise_schedule, fp_sampler)
    teacher = model.net.eval()
    feature_cache = build_cache(cfg.get("cache"))
    if feature_cache is not None:
        feature_cache.check(teacher)  # e.g. a DiT: refused before any compute
    method = build_method(cfg.method)
    method.check_model(model)  # a method not defined for this family: refused before any compute
    ctx = MethodContext(cfg=cfg, output_dir=out, cache_dir=Path(cfg.paths.cache_dir),
                        model=model, dataset=dataset)
    student = method.prepare(teacher, ctx).to(device).eval()
    if student is not teacher and dist.is_main():
        # weights + quantization map (reload without the method), with the attempt's fingerprint
        save_student(student, attempt.staging)

    n = int(cfg.metrics.num_samples)
    conditions = dataset.conditions(n) if dataset is not None else None
    cond = model.make_cond(conditions, n)
    prompts = ([conditions[i % len(conditions)] for i in range(n)]
               if model.conditioning == "text" else None)
    decode = functools.partial(decode_images, model, batch_size=sampler.batch_size)
    key = shard_key(student, sampler, n, int(cfg.seed), cond,
                    "none" if feature_cache is None else feature_cache.label)
    if len(set(dist.gather(key))) > 1:
        raise RuntimeError("the processes of this run hold different students (their weights "
                           "differ after the method); their samples would not be one model's")
    store = ShardStore(out / SHARD_DIR, key)
    if dist.is_main():
        store.prune_stale()  # batches of another student or sampler in this folder
    dist.barrier()
    t0 = time.perf_counter()
    cache_cost: dict = {}
    if feature_cache is None:
        images, shard_stats = sample_images(model.with_net(student), sampler, cond, n,
                                            int(cfg.seed), decode, store)
    else:
        images, shard_stats, cache_cost = _sample_cached(model.with_net(student), feature_cache,
                                                         sampler, cond, n, int(cfg.seed),
                                                         decode, store)
    sample_s = time.perf_counter() - t0
    done = dist.gather((shard_stats.sampled, shard_stats.resumed))
    fp_images = None
    # the run's own samples are the FP reference: the FP model, uncached, on the FP sampler
    own_fp = student is teacher and feature_cache is None and fp_sampler == sampler
    if not dist.is_main():
        if suite.needs_fp_images and not own_fp:
            fp_samples(model, fp_sampler, cond, n, int(cfg.seed), Path(cfg.paths.cache_dir))
        return None  # rank 0 measures and records the run
    if student is not teacher and bool(cfg.get("time_vs_fp", True)):
        cache_cost.update(_time_vs_fp(model, teacher, student, feature_cache, sampler, cond, n,
                                      int(cfg.seed), fp_sampler))
    labels = cond if model.conditioning == "class" else None

    sample_dir = attempt.path(rundir.SAMPLES)  # a fresh folder: the metrics read these n files
    save_png_folder(images, sample_dir, labels)
    grid = image_grid_uint8(images[: int(cfg.metrics.grid_size)], nrow=model.num_classes or 10)
    # small samples (16×16 digits) enlarged with nearest-neighbour: a grid readable at a glance
    grid = torch.from_numpy(upscale_nearest(grid.numpy(), 64, int(images.shape[-1])))
    from PIL import Image

    Image.fromarray(grid.numpy()).save(attempt.path(rundir.GRID))

    t0 = time.perf_counter()
    if suite.needs_fp_images:
        fp_images = images if own_fp else fp_samples(
            model, fp_sampler, cond, n, int(cfg.seed), Path(cfg.paths.cache_dir))
    metrics = _measure(cfg, suite, sample_dir, images,
                       prompts if prompts is not None else labels, dataset, device, fp_images,
                       model=model, student=student, sampler=sampler)
    metrics_s = time.perf_counter() - t0
    bad = rundir.all_finite(metrics)
    if bad:
        raise NonFiniteError(f"metrics {', '.join(bad)} are not finite ({metrics}); the samples "
                             f"in {sample_dir} are too few or degenerate for them. Fix: more "
                             f"metrics.num_samples, or check the samples")

    cost = {
        **model_costs(student, model, reference=teacher),
        "params": sum(p.numel() for p in student.parameters()),
        **ctx.cost,
        # quantized layers whose activation scales vary along the reduction axis: they run as
        # fake quant (dequantize, FP GEMM), so the model is not the integer model its bits say
        "fake_quant_layers": sum(1 for m in student.modules()
                                 if isinstance(m, QuantModuleMixin) and not integer_gemm(m)),
        "sample_s": sample_s,
        # batches of samples drawn by this attempt (over all processes) and found finished in
        # the run folder's sample_shards/ (an interrupted attempt's)
        "sample_batches": sum(d[0] for d in done),
        "sample_batches_resumed": sum(d[1] for d in done),
        "processes": dist.world_size(),
        **cache_cost,
        "metrics_s": metrics_s,
        "total_s": time.perf_counter() - t_start,
        "peak_mem_mb": memory.read(),
    }
    results = {
        "model": cfg.model.name,
        "method": method.label,
        "bits": bits_label(run_bits(cfg)),
        "bits_preset": cfg.bits.name,
        # every quantized layer can run as an integer/binary GEMM (no fake-quant-only layers)
        "deployable": cost["fake_quant_layers"] == 0,
        "dataset": cfg.dataset.name,
        "sampler": sampler.label(),
        "sampler_preset": cfg.sampler.name,
        # the FP samples that paired fidelity and sample_x_fp compare with
        "fp_sampler": fp_sampler.label(),
        "cache": "none" if feature_cache is None else feature_cache.label,
        "metrics": metrics,
        "cost": cost,
        "report": ctx.report,
        "status": "done",
        "seed": int(cfg.seed),
        "fingerprint": attempt.fingerprint,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "version": lowbit.__version__,
    }
    write_json_atomic(attempt.path(RESULTS), results)
    if cfg.get("export", False):
        from lowbit.export import export_run

        # packed/ belongs to the attempt too; its paths name the run dir it is swapped into
        results["export"] = export_run(attempt.staging, report_dir=out)
        write_json_atomic(attempt.path(RESULTS), results)
    attempt.commit()
    store.remove()  # the samples are in samples/ now
    results_path = out / RESULTS
    log.info("results written to %s", results_path)
    if cfg.logger.name == "wandb":
        _log_wandb(cfg, out, results, grid, _sample_table(
            images, fp_images, prompts if prompts is not None else labels, suite,
            int(cfg.metrics.grid_size), model.num_classes or 10))
    results = read_results(results_path)  # what is recorded (non-finite values as null)
    print(_summary_table(results))
    return results


def save_student(student: torch.nn.Module, out: Path) -> Path:
    """The method's model (weights and quantizer state) as safetensors, with its quantization
    map and the fingerprint of the attempt writing ``out`` (:func:`lowbit.export.
    save_student_files`)."""
    from lowbit.export import save_student_files

    return save_student_files(student, out)[0]


def _measure(cfg: DictConfig, suite, sample_dir: Path, images: torch.Tensor, conditions,
             dataset, device: torch.device, fp_images: torch.Tensor | None,
             model: Denoiser | None = None, student: torch.nn.Module | None = None,
             sampler: SamplerConfig | None = None) -> dict:
    """The ``metrics`` group's numbers for the samples of this run (and, for metrics that read
    them, for its networks: the FP model, the student and the sampler)."""
    from lowbit.metrics import MetricInputs

    inputs = MetricInputs(sample_dir=sample_dir, images=images, conditions=conditions,
                          dataset=dataset, cache_dir=Path(cfg.paths.cache_dir), device=device,
                          fp_images=fp_images, model=model, student=student, sampler=sampler,
                          seed=int(cfg.seed))
    return suite(inputs)


def reference_sampler(cfg: DictConfig) -> SamplerConfig:
    """How the FP model is sampled as the reference of paired fidelity and of ``sample_x_fp``:
    ``sampler.reference`` when the sampler preset names one (the LCM presets: a few-step
    student is compared with its teacher on the teacher's own sampler, DDIM-20 with guidance,
    on the same seeds), else the run's sampler."""
    ref = cfg.sampler.get("reference")
    if ref is None:
        return SamplerConfig.from_cfg(cfg.sampler)
    try:
        return SamplerConfig.from_cfg(ref)
    except Exception as e:  # noqa: BLE001 - a missing key, named with the fix
        raise ConfigError("sampler.reference", OmegaConf.to_container(ref, resolve=True),
                          f"not a sampler config ({e})", "give kind, steps, eta, guidance_scale "
                          "and batch_size, or sampler.reference=null (the run's sampler)") from e


def fp_samples(model: Denoiser, sampler: SamplerConfig, cond: torch.Tensor | None, n: int,
               seed: int, cache_dir: Path | None) -> torch.Tensor:
    """uint8 images of the FP model on the seeds and conditions of a run (the reference of paired
    fidelity), cached per (model weights, sampler, n, seed, conditioning). Sampled in shards
    over the run's processes (:func:`lowbit.shards.sample_images`): rank 0 gets the images,
    the other ranks None."""
    import hashlib

    from lowbit.data.trajectories import model_fingerprint

    h = hashlib.sha256(repr((model.name, model_fingerprint(model.net), sampler, n, seed)).encode())
    if cond is not None:
        h.update(cond.detach().cpu().contiguous().numpy().tobytes())
    path = (Path(cache_dir) / "fp_samples" / f"{model.name or 'model'}-{h.hexdigest()[:16]}"
            ".safetensors") if cache_dir else None
    # jobs running at once (a sweep, or the 2- and 4-step runs of one seed) share this cache:
    # the first one samples, the others wait on the lock and then read its file, so no job
    # reads or removes the shards another one is writing. Rank 0 holds it for the run's ranks.
    lock = contextlib.nullcontext()
    if path is not None and dist.is_main():
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(f"{path.name}.lock")))
    with lock:
        return _fp_samples_unlocked(model, sampler, cond, n, seed, path)


def _fp_samples_unlocked(model: Denoiser, sampler: SamplerConfig, cond: torch.Tensor | None,
                         n: int, seed: int, path: Path | None) -> torch.Tensor | None:
    from safetensors.torch import load_file, save_file

    cached = dist.broadcast(path is not None and path.is_file())
    if cached:
        if not dist.is_main():
            return None
        try:
            return load_file(str(path))["images"]
        except Exception as e:  # noqa: BLE001 - a broken cache file is regenerated
            log.warning("FP sample cache %s unreadable (%s); regenerating", path, e)
    store = (ShardStore(path.with_name(f"{path.stem}.shards"), "batches")
             if path is not None else None)
    images, _ = sample_images(model, sampler, cond, n, seed,
                              functools.partial(decode_images, model,
                                                batch_size=sampler.batch_size),
                              store, progress=False)
    if not dist.is_main():
        return None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"images": images.contiguous()}, str(tmp))
        tmp.replace(path)
        store.remove()
    return images


#: timing batches of ``_time_vs_fp`` / ``cache_speedup``: at most this many samples, each side
#: timed this many times alternately, the fastest kept (interference from other processes only
#: ever adds time)
TIMING_BATCH, TIMING_REPEATS = 64, 2


def _paired_times(a, b, repeats: int = TIMING_REPEATS) -> tuple[float, float]:
    """Wall times of ``a()`` and ``b()``, run alternately ``repeats`` times: the minimum of each."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def _timing_batch(sampler: SamplerConfig, cond: torch.Tensor | None, n: int
                  ) -> tuple[SamplerConfig, torch.Tensor | None, int]:
    m = min(sampler.batch_size, n, TIMING_BATCH)
    return dataclasses.replace(sampler, batch_size=m), cond[:m] if cond is not None else None, m


def _time_vs_fp(model: Denoiser, teacher: torch.nn.Module, student: torch.nn.Module,
                cache: DeepCache | None, sampler: SamplerConfig, cond: torch.Tensor | None,
                n: int, seed: int, fp_sampler: SamplerConfig | None = None) -> dict[str, float]:
    """Sampling batches of the FP model (on ``fp_sampler``, default the run's sampler) and of
    the student (with its feature cache, if any), alternately on the same seed and machine
    (:func:`_paired_times`): ``sample_x_fp`` = student time / FP time. The student's weights
    are already quantized and cached by the run's sampling."""
    one, c, m = _timing_batch(sampler, cond, n)
    one_fp = dataclasses.replace(fp_sampler or sampler, batch_size=one.batch_size)
    fp, quant = model.with_net(teacher), model.with_net(student)
    timesteps = build_scheduler(model.noise_schedule, sampler.kind, sampler.steps).timesteps

    def run_student():
        with contextlib.ExitStack() as stack:
            if cache is not None:
                stack.enter_context(cache.attach(student, timesteps))
            sample_many(quant, one, c, m, seed=seed, progress=False)

    fp_s, student_s = _paired_times(
        lambda: sample_many(fp, one_fp, c, m, seed=seed, progress=False), run_student)
    return {"sample_batch_fp_s": fp_s, "sample_batch_s": student_s,
            "sample_x_fp": student_s / max(fp_s, 1e-12)}


def _sample_cached(model: Denoiser, cache: DeepCache, sampler: SamplerConfig,
                   cond: torch.Tensor | None, n: int, seed: int, decode, store: ShardStore
                   ) -> tuple[torch.Tensor | None, ShardStats, dict]:
    """Sample with the feature cache attached; costs measured, not estimated (rank 0): FLOPs of
    one full and one partial call (torch's FlopCounterMode, per sample) averaged over the
    schedule, and the wall time of a batch without and with the cache, alternately on the same
    seed (``cache_speedup``, :func:`_paired_times`). ``cache_calls``: the network calls of the
    batches this attempt sampled, over all processes."""
    from lowbit.metrics.cost import example_inputs

    timesteps = build_scheduler(model.noise_schedule, sampler.kind, sampler.steps).timesteps
    with cache.attach(model.net, timesteps) as handle:
        images, stats = sample_images(model, sampler, cond, n, seed, decode, store)
        calls = dict(handle.calls)
    calls = {k: sum(c[k] for c in dist.gather(calls)) for k in calls}
    if not dist.is_main():
        return None, stats, {}
    full = _full_steps(cache, model.net, timesteps)
    full_t = max(full)
    partial_t = next((int(t) for t in timesteps if int(t) not in full), None)
    flops = {"full": _flops(model.net, example_inputs(model, model.device, full_t)), "partial": None}
    if partial_t is not None:
        with cache.attach(model.net, timesteps):
            _flops(model.net, example_inputs(model, model.device, full_t))  # fills the cache
            flops["partial"] = _flops(model.net, example_inputs(model, model.device, partial_t))
    n_full = sum(int(t) in full for t in timesteps)
    n_part = len(timesteps) - n_full
    avg = (n_full * flops["full"] + n_part * (flops["partial"] or 0)) / len(timesteps)
    one, c, m = _timing_batch(sampler, cond, n)

    def cached():
        with cache.attach(model.net, timesteps):
            sample_many(model, one, c, m, seed=seed, progress=False)

    plain_s, cached_s = _paired_times(
        lambda: sample_many(model, one, c, m, seed=seed, progress=False), cached)
    return images, stats, {
        "cache_calls": calls, "cache_full_steps": n_full, "cache_partial_steps": n_part,
        "flops_full_step": flops["full"], "flops_partial_step": flops["partial"],
        "flops_per_step": avg, "flops_x": flops["full"] / max(avg, 1e-12),
        "cache_batch_s": plain_s, "cache_batch_cached_s": cached_s,
        "cache_speedup": plain_s / max(cached_s, 1e-12)}


def _full_steps(cache: DeepCache, net: torch.nn.Module, timesteps) -> set[int]:
    """The timesteps the cache runs in full (its schedule; nothing is computed)."""
    with cache.attach(net, timesteps) as handle:
        return set(handle.full)


@torch.no_grad()
def _flops(net: torch.nn.Module, inputs: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        net(**inputs)
    return float(counter.get_total_flops())


def _sample_table(images: torch.Tensor, fp_images: torch.Tensor | None, conditions, suite,
                  n: int, nrow: int) -> SampleTable:
    """The grid's samples with their label or prompt and per-sample scores: PSNR to the FP sample
    of the same seed (when the metrics drew them) and the CLIP score (when a CLIP item ran)."""
    from lowbit.metrics.fidelity import psnr_from_mse

    n = min(n, len(images))
    if isinstance(conditions, torch.Tensor):
        conds = [f"class {int(c)}" for c in conditions[:n]]
    elif conditions is not None:
        conds = [str(c) for c in list(conditions)[:n]]
    else:
        conds = [""] * n
    scores: dict[str, list[float]] = {}
    if fp_images is not None:
        d = (images[:n].float() - fp_images[:n].float()) / 255.0
        scores["psnr_to_fp"] = [psnr_from_mse(float(m)) for m in d.pow(2).flatten(1).mean(1)]
    for item in suite.items.values():
        last = getattr(item, "last_scores", None)
        if last is not None:
            scores["clip_score"] = [float(v) for v in last[:n]]
    return SampleTable(images[:n], conds, scores, nrow)


def _log_wandb(cfg: DictConfig, out: Path, results: dict, grid: torch.Tensor,
               samples: SampleTable | None = None) -> None:
    """Results, costs and the sample grid into the job's W&B run: the run the fine-tune's
    WandbLogger wrote its curves to (same id, :func:`lowbit.train.fit.wandb_run_id`)."""
    from lowbit.train.fit import wandb_run_id

    lg = cfg.logger
    run = WandbRun(
        enabled=lg.name == "wandb",
        project=lg.get("project"), entity=lg.get("entity"), group=lg.get("group"),
        mode=lg.get("mode", "offline"), dir=str(out), tags=list(cfg.get("tags", [])),
        name=f"{results['model']}-{results['method']}-{results['bits']}-{results['sampler']}",
        config=results["config"], reinit="finish_previous",
        id=wandb_run_id(cfg), resume="allow",
    )
    try:
        run.log_results(results, grid, samples)
    finally:
        run.finish()
    if run.error:
        results["wandb_error"] = run.error
        write_json_atomic(out / RESULTS, results)
