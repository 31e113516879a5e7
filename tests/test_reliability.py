"""Runs never record a wrong result: one attempt per run folder, config fingerprints on
results, students and checkpoints, NaN guards, errors before compute, a report that survives bad
files. Every case is reproduced with tiny settings; each asserts the exact behaviour."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import rundir
from lowbit.config import ConfigError
from lowbit.rundir import RESULTS, STUDENT, RunDirError

TINY = ("threads=1", "metrics.num_samples=20", "sampler.steps=3", "logger=none",
        "metrics.items.digits.kid=false")
PTQ = ("method=ptq", "method.calib_n=4", "method.calib_steps=2", "method.calib_batch_size=4")
BIN = Path(sys.executable).parent


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a run loads the model, samples or calibrates."""
    import lowbit.pipeline as pipeline

    def boom(*a, **k):
        pytest.fail("compute started before the error")

    monkeypatch.setattr(pipeline, "sample_many", boom)
    monkeypatch.setattr(pipeline, "build_method", boom)


def _run(cfg):
    from lowbit.pipeline import run_experiment

    return run_experiment(cfg)


def _wrapped(cfg):
    """As the ``lowbit`` entry point runs a job (failures recorded in results.json)."""
    from lowbit.cli import task_wrapper
    from lowbit.pipeline import run_experiment

    return task_wrapper(run_experiment)(cfg)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder except what is kept across attempts."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in
            (*rundir.KEPT, rundir.FAILED_ATTEMPT)}


# ------------------------------------------------------------------------------------------------
# errors before compute
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "key", "fix"), [
    (("sampler.guidance_scale=nan",), "sampler.guidance_scale", "finite"),
    (("sampler.eta=inf",), "sampler.eta", "finite"),
    (("device=tpu",), "device=", "device=cpu"),
    (("seed=abc",), "seed=", "seed=0"),
    (("force=maybe",), "force=", "force=true"),
    (("resume=maybe",), "resume=", "resume=true"),
    (("sampler.kind=foo",), "sampler.kind", "ddim"),
    (("metrics.grid_size=0",), "metrics.grid_size", "metrics.grid_size=100"),
    (("metrics.num_samples=1",), "metrics.num_samples", "metrics.num_samples=50"),
    ((*PTQ, "bits=w8a8", "method.calib_n=0"), "method.calib_n", "lowbit/conf/method/ptq.yaml"),
])
def test_bad_values_fail_before_compute(make_cfg, no_compute, overrides, key, fix):
    cfg = make_cfg(*TINY, *overrides)
    with pytest.raises(ConfigError) as err:
        _run(cfg)
    assert key in str(err.value) and "Fix:" in str(err.value) and fix in str(err.value)


def test_unwritable_cache_dir_fails_before_compute(make_cfg, no_compute, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = make_cfg(*TINY, f"paths.cache_dir={blocker / 'cache'}")
    with pytest.raises(ConfigError, match=r"paths\.cache_dir=.*cannot create it.*LOWBIT_CACHE"):
        _run(cfg)


@pytest.mark.parametrize("corrupt", [False, True])
def test_bad_classifier_checkpoint_fails_before_the_model_loads(make_cfg, tmp_path, monkeypatch,
                                                                 corrupt):
    monkeypatch.setattr("lowbit.models.digits.load_digits_model",
                        lambda *a, **k: pytest.fail("model loaded"))
    path = tmp_path / "clf.safetensors"
    if corrupt:
        path.write_bytes(b"\x00" * 100)
    cfg = make_cfg(*TINY, *PTQ, "bits=w8a8",
                   f"metrics.items.digits.classifier_checkpoint={path}")
    problem = "cannot load the digit classifier" if corrupt else "no such file"
    with pytest.raises(ConfigError, match=rf"metrics\.items\.digits\.classifier_checkpoint=.*"
                                          rf"{problem}.*Fix:"):
        _run(cfg)


def test_too_many_steps_names_sampler_steps(make_cfg, monkeypatch):
    import lowbit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build_method", lambda *a: pytest.fail("method built"))
    cfg = make_cfg(*TINY, "sampler.steps=1001")
    with pytest.raises(ConfigError, match=r"sampler\.steps=1001.*1000 training timesteps.*"
                                          r"sampler\.steps<=1000"):
        _run(cfg)


def test_corrupt_results_json_names_the_file_and_force(make_cfg, no_compute):
    cfg = make_cfg(*TINY)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True)
    (out / RESULTS).write_text('{"status": "done", "metr')
    with pytest.raises(RunDirError, match=rf"{out / RESULTS} is unreadable.*force=true"):
        _run(cfg)
    assert (out / RESULTS).read_text() == '{"status": "done", "metr'  # untouched


def test_corrupt_reference_png_is_rebuilt(make_cfg, tmp_path):
    from lowbit.data.datasets import DigitsDataset, image_files

    cache = tmp_path / "cache"
    ds = DigitsDataset(resolution=16)
    ref = ds.reference(cache)
    first = image_files(ref)[0]
    good = first.read_bytes()
    first.write_bytes(b"not a png")
    (ref / "99999_c0.png").write_bytes(good)  # a leftover extra file is not counted either
    again = ds.reference(cache)
    assert first.read_bytes() == good and not (again / "99999_c0.png").exists()


# ------------------------------------------------------------------------------------------------
# one attempt per folder; skip/refuse by fingerprint
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished tiny FP run (the folder is copied by each test that changes it)."""
    from lowbit.cli import compose_config

    tmp = tmp_path_factory.mktemp("done")
    cfg = compose_config([f"paths.cache_dir={tmp / 'cache'}", *TINY], output_dir=tmp / "run")
    return cfg, _run(cfg)


def _copy_run(done_run, tmp_path, *overrides):
    from lowbit.cli import compose_config

    cfg, _ = done_run
    run = tmp_path / "run"
    shutil.copytree(cfg.paths.output_dir, run)
    return compose_config([f"paths.cache_dir={cfg.paths.cache_dir}", *TINY, *overrides],
                          output_dir=run)


def test_results_carry_the_fingerprint_and_effective_sampler(done_run):
    cfg, res = done_run
    assert res["fingerprint"] == rundir.run_fingerprint(cfg)
    assert res["sampler"] == "ddim3" and res["sampler_preset"] == "ddim20"


def test_skip_only_when_the_fingerprint_matches(done_run, tmp_path, no_compute):
    # keys that do not shape results: skipped, returns the recorded result
    cfg = _copy_run(done_run, tmp_path, "threads=2", "logger=wandb", "device=cpu")
    assert _run(cfg)["metrics"] == done_run[1]["metrics"]
    # another config: refused, naming the key and the fixes; nothing touched
    cfg = _copy_run(done_run, tmp_path / "b", "sampler.steps=4")
    before = _snapshot(Path(cfg.paths.output_dir))
    with pytest.raises(RunDirError, match=r"another config \(sampler\.steps: 3 → 4\).*"
                                          r"force=true.*another run dir"):
        _run(cfg)
    assert _snapshot(Path(cfg.paths.output_dir)) == before


def test_force_rerun_measures_only_its_own_samples(done_run, tmp_path):
    """Case: fewer samples with force=true → exactly those samples, the FID of a fresh
    run with them."""
    from lowbit.cli import compose_config

    cfg = _copy_run(done_run, tmp_path, "force=true", "metrics.num_samples=12")
    res = _run(cfg)
    out = Path(cfg.paths.output_dir)
    assert len(list((out / "samples").glob("*.png"))) == 12
    fresh = compose_config([f"paths.cache_dir={cfg.paths.cache_dir}", *TINY,
                            "metrics.num_samples=12"], output_dir=tmp_path / "fresh")
    assert res["metrics"]["fid"] == pytest.approx(_run(fresh)["metrics"]["fid"], rel=1e-9)
    assert not [p for p in out.iterdir() if p.name.startswith((".staging", ".replaced"))]


def test_failed_force_rerun_leaves_the_folder_as_it_was(tmp_path, make_cfg, monkeypatch):
    """Case: a done ptq w8a8 folder, a w4a8 force=true re-run failing after it saved its
    student → results, student, samples, grid unchanged; export packs the w8a8 student."""
    import lowbit.pipeline as pipeline
    from lowbit.export import export_run

    cfg = make_cfg(*TINY, *PTQ, "bits=w8a8")
    _run(cfg)
    out = Path(cfg.paths.output_dir)
    before = _snapshot(out)

    def broken(*a, **k):
        raise RuntimeError("metrics crashed")

    monkeypatch.setattr(pipeline, "_measure", broken)
    cfg2 = make_cfg(*TINY, *PTQ, "bits=w4a8", "force=true")
    with pytest.raises(RuntimeError, match="metrics crashed"):
        _wrapped(cfg2)
    assert _snapshot(out) == before
    failed = out / rundir.FAILED_ATTEMPT
    assert "metrics crashed" in (failed / "error.txt").read_text()
    assert not (failed / STUDENT).exists()  # a failed attempt's outputs are dropped
    summary = export_run(out)
    assert "8" in summary["sizes"]["by_weight_bits"] and "4" not in summary["sizes"]["by_weight_bits"]


def test_export_refuses_a_student_of_another_attempt(tmp_path, make_cfg):
    from lowbit.export import export_run

    a = make_cfg(*TINY, *PTQ, "bits=w8a8", output_dir=tmp_path / "a")
    b = make_cfg(*TINY, *PTQ, "bits=w4a8", output_dir=tmp_path / "b")
    _run(a), _run(b)
    shutil.copy(tmp_path / "b" / STUDENT, tmp_path / "a" / STUDENT)
    with pytest.raises(ValueError, match=rf"{STUDENT} does not belong to .*{RESULTS}.*force=true"):
        export_run(tmp_path / "a")


def test_export_into_a_read_only_folder_is_a_clear_error(tmp_path, make_cfg):
    from lowbit.export import PACKED_DIR, main

    cfg = make_cfg(*TINY, *PTQ, "bits=w8a8")
    _run(cfg)
    out = Path(cfg.paths.output_dir)
    (out / PACKED_DIR).write_text("")  # something in the way: mkdir fails as in a read-only dir
    assert main([str(out)]) == 1


def test_file_modes_are_those_of_other_outputs(done_run, tmp_path, make_cfg):
    cfg, _ = done_run
    out = Path(cfg.paths.output_dir)
    expected = 0o666 & ~_umask()
    assert stat.S_IMODE((out / RESULTS).stat().st_mode) == expected
    assert stat.S_IMODE((out / "grid.png").stat().st_mode) == expected
    ptq = make_cfg(*TINY, *PTQ, "bits=w8a8")
    _run(ptq)
    assert stat.S_IMODE((Path(ptq.paths.output_dir) / STUDENT).stat().st_mode) == expected


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


# ------------------------------------------------------------------------------------------------
# disk full
# ------------------------------------------------------------------------------------------------
def test_disk_full_is_a_clear_error_and_touches_no_earlier_result(done_run, tmp_path,
                                                                  monkeypatch):
    import lowbit.pipeline as pipeline

    def full(images, folder, labels=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "00000_c0.png"))

    monkeypatch.setattr(pipeline, "save_png_folder", full)
    cfg = _copy_run(done_run, tmp_path, "force=true")
    out = Path(cfg.paths.output_dir)
    before = _snapshot(out)
    with pytest.raises(RunDirError, match=r"no space left .*00000_c0\.png.*untouched.*free space"):
        _wrapped(cfg)
    assert _snapshot(out) == before  # the done result and its files

    fresh = cfg.copy()
    fresh.paths.output_dir = str(tmp_path / "fresh")
    with pytest.raises(RunDirError):
        _wrapped(fresh)
    saved = json.loads((tmp_path / "fresh" / RESULTS).read_text())
    assert saved["status"] == "failed" and "no space left" in saved["error"]


# ------------------------------------------------------------------------------------------------
# NaN guards
# ------------------------------------------------------------------------------------------------
def test_huge_guidance_fails_the_run_instead_of_recording_garbage(make_cfg):
    cfg = make_cfg(*TINY, "sampler.guidance_scale=1e30")
    from lowbit.sampling import NonFiniteError

    with pytest.raises(NonFiniteError, match="NaN or inf.*sampler.guidance_scale"):
        _wrapped(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / RESULTS).read_text())
    assert saved["status"] == "failed" and "NonFiniteError" in saved["error"]
    assert not (Path(cfg.paths.output_dir) / "samples").exists()


@pytest.mark.parametrize("bad_step", [0, 2])
def test_sampling_stops_at_the_first_non_finite_step(bad_step):
    from lowbit.sampling import NonFiniteError, build_scheduler, sample

    class Fake:
        device = torch.device("cpu")
        sample_shape = (1, 4, 4)
        calls = 0

        def guided(self, x, t, cond, scale):
            Fake.calls += 1
            return torch.full_like(x, float("nan")) if Fake.calls > bad_step else x * 0.1

    sched = build_scheduler({"num_train_timesteps": 1000}, "ddim", 5)
    with pytest.raises(NonFiniteError, match=f"sampling step {bad_step} "):
        sample(Fake(), sched, None, 2, torch.Generator().manual_seed(0))
    assert Fake.calls == bad_step + 1


def test_non_finite_cached_trajectories_are_regenerated(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowbit.data.trajectories import fp_trajectories
    from lowbit.models.digits import load_digits_model
    from lowbit.sampling import SamplerConfig

    model = load_digits_model()
    s = SamplerConfig(steps=2, guidance_scale=1.0, batch_size=4)
    first = fp_trajectories(model, s, 4, 2, 0, tmp_path)
    (path,) = (tmp_path / "trajectories").glob("*.safetensors")
    d = load_file(str(path))
    d["xt"][0, 0, 0, 0, 0] = float("nan")
    save_file(d, str(path))
    again = fp_trajectories(model, s, 4, 2, 0, tmp_path)
    assert torch.isfinite(again.xt).all() and torch.equal(again.xt, first.xt)


def test_a_second_live_attempt_on_the_folder_is_refused(make_cfg, no_compute):
    from lowbit.pipeline import run_experiment
    from lowbit.rundir import RunDirError, RunLock

    cfg = make_cfg("metrics.num_samples=20")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out), pytest.raises(  # another process's attempt, alive
            RunDirError, match=r"another attempt \(pid \d+\).*Fix:.*hydra.run.dir"):
        run_experiment(cfg)
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]
    RunLock(out).acquire().release()  # released: the next attempt may run


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_calibration_on_non_finite_inputs_stops_naming_the_quantizer(bad):
    from lowbit.models.digits import build_digits_unet
    from lowbit.quant import QuantConfig, calibrate_, quantize_

    torch.manual_seed(0)
    net = build_digits_unet().eval()
    quantize_(net, QuantConfig.preset("w8a8"))
    x = torch.randn(2, 1, 16, 16)
    good = {"sample": x, "timestep": torch.tensor(500), "class_labels": torch.tensor([0, 1])}
    x_bad = x.clone()
    x_bad[0, 0, 3, 3] = bad
    with pytest.raises(FloatingPointError, match=r"calibrating conv_in\.input: .*NaN/inf.*Fix:"):
        calibrate_(net, [good, {**good, "sample": x_bad}])


# ------------------------------------------------------------------------------------------------
# trajectory cache key
# ------------------------------------------------------------------------------------------------
def test_trajectory_cache_key_covers_batch_size(tmp_path):
    from lowbit.data.trajectories import fp_trajectories
    from lowbit.models.digits import load_digits_model
    from lowbit.sampling import SamplerConfig

    model = load_digits_model()
    a = fp_trajectories(model, SamplerConfig(steps=2, batch_size=2), 4, 2, 0, tmp_path)
    b = fp_trajectories(model, SamplerConfig(steps=2, batch_size=4), 4, 2, 0, tmp_path)
    cold = fp_trajectories(model, SamplerConfig(steps=2, batch_size=4), 4, 2, 0, None)
    assert len(list((tmp_path / "trajectories").glob("*.safetensors"))) == 2
    assert not torch.equal(a.xt, b.xt)  # the noise differs per batch …
    assert torch.equal(b.xt, cold.xt)  # … and the cache returns what a cold run computes


# ------------------------------------------------------------------------------------------------
# training state: fingerprint, resume, discard
# ------------------------------------------------------------------------------------------------
def _stamp(out: Path, cfg) -> None:
    rundir.stamp_state(out, cfg)
    (out / rundir.CHECKPOINTS / "cma").mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 5}, out / rundir.CHECKPOINTS / "cma" / "last.ckpt")


def test_checkpoints_of_another_config_are_refused_before_compute(make_cfg, no_compute):
    old = make_cfg(*TINY, *PTQ, "bits=w8a8")
    out = Path(old.paths.output_dir)
    _stamp(out, old)
    cfg = make_cfg(*TINY, *PTQ, "bits=w4a8", "resume=true")
    with pytest.raises(RunDirError, match=r"training state \(checkpoints/\) of another config "
                                          r"\(bits\.name: 'w8a8' → 'w4a8'.*force=true"):
        _run(cfg)
    assert (out / rundir.CHECKPOINTS / "cma" / "last.ckpt").is_file()


def test_checkpoints_without_a_stamp_are_refused(make_cfg, no_compute):
    cfg = make_cfg(*TINY, *PTQ, "bits=w8a8")
    out = Path(cfg.paths.output_dir)
    (out / rundir.CHECKPOINTS).mkdir(parents=True)
    (out / rundir.CHECKPOINTS / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunDirError, match=r"without a readable checkpoints/fingerprint\.json.*"
                                          r"resume=false"):
        _run(cfg)


@pytest.mark.parametrize(("flags", "expected"), [
    ((), True),  # plain re-run with matching checkpoints: resumed (documented default)
    (("resume=true",), True),
    (("resume=false",), False),  # discarded
    (("force=true",), False),  # a forced re-run starts afresh …
    (("force=true", "resume=true"), True),  # … unless told to resume
])
def test_matching_checkpoints_resume_by_default(make_cfg, flags, expected):
    cfg = make_cfg(*TINY, *PTQ, "bits=w8a8", "metrics.num_samples=30", *flags)
    out = Path(cfg.paths.output_dir)
    _stamp(out, cfg)
    assert rundir.plan_resume(out, cfg) is expected
    assert (out / rundir.CHECKPOINTS / "cma" / "last.ckpt").is_file() is expected


def test_truncated_checkpoint_is_named(make_cfg, no_compute):
    cfg = make_cfg(*TINY, *PTQ, "bits=w8a8")
    out = Path(cfg.paths.output_dir)
    _stamp(out, cfg)
    ckpt = out / rundir.CHECKPOINTS / "cma" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:40])
    with pytest.raises(RunDirError, match=rf"{ckpt} is truncated or corrupt.*resume=false"):
        _run(cfg)


# ------------------------------------------------------------------------------------------------
# lowbit-report
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["[1,2,3]", "null", '{"metrics": "oops"}', '"text"',
                                     "\x00\xff\xfe garbage", '{"status": "done", "cost": 3}'])
def test_report_survives_a_malformed_results_json(tmp_path, done_run, content):
    from lowbit.report import main

    cfg, _ = done_run
    shutil.copytree(cfg.paths.output_dir, tmp_path / "0")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / RESULTS).write_bytes(content.encode("latin-1"))
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "results.csv").read_text()
    assert "unreadable" in text and "ddim3" in text


def test_report_shows_failed_errors_and_effective_sampler(tmp_path, done_run):
    from lowbit.report import collect, columns, to_markdown

    cfg, _ = done_run
    shutil.copytree(cfg.paths.output_dir, tmp_path / "0")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / RESULTS).write_text(json.dumps(
        {"status": "failed", "error": "NonFiniteError: the samples | are NaN", "method": "ptq"}))
    rows = collect(tmp_path)
    table = to_markdown(rows, columns(rows))
    assert "ddim3" in table and "ddim20" not in table.split("\n")[2]
    assert "NonFiniteError: the samples \\| are NaN" in table


# ------------------------------------------------------------------------------------------------
# through the CLI: an unwritable run dir, a refused re-run keeps .hydra/
# ------------------------------------------------------------------------------------------------
def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "LOWBIT_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "lowbit"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_unwritable_run_dir_is_lowbits_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = _cli([*TINY, f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    assert p.returncode != 0
    assert "hydra.run.dir=" in p.stderr and "Fix:" in p.stderr and "Traceback" not in p.stderr


def test_cli_refused_rerun_keeps_the_folder(tmp_path):
    run = tmp_path / "run"
    assert _cli([*TINY, f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = _snapshot(run)
    assert (run / ".hydra" / "config.yaml").is_file()
    p = _cli([*TINY, "sampler.steps=4", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode != 0 and "sampler.steps: 3 → 4" in p.stderr
    assert "force=true" in p.stderr and "Traceback" not in p.stderr
    assert _snapshot(run) == before
    assert not [x for x in run.iterdir() if x.name.startswith(".staging")]


# ------------------------------------------------------------------------------------------------
# sampler presets reach the FP quality of DDIM-20
# ------------------------------------------------------------------------------------------------
PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "lowbit" / "conf"
                                  / "sampler").glob("*.yaml"))


def _preset_fid(tmp_path: Path, preset: str, n: int) -> float:
    from lowbit.cli import compose_config

    cfg = compose_config([f"paths.cache_dir={tmp_path / 'cache'}", f"sampler={preset}",
                          f"metrics.num_samples={n}", "logger=none", "metrics.items.fidelity=null",
                          "metrics.items.digits.kid=false"], output_dir=tmp_path / preset)
    return _run(cfg)["metrics"]["fid"]


def test_dpm_solver_stays_in_the_data_range():
    """Case: DPM-Solver on the built-in model's squaredcos_cap_v2 schedule left 99.9 % of
    pixels outside [-1, 1] (absmax 3588). With clip_sample mapped to its thresholding, the final
    sample is a clamped x̂_0: inside the clip range by construction."""
    from lowbit.models.digits import load_digits_model
    from lowbit.sampling import SamplerConfig, sample_many

    model = load_digits_model()
    x = sample_many(model, SamplerConfig(kind="dpm", steps=10, guidance_scale=2.0, batch_size=20),
                    torch.arange(20) % 10, 20, seed=0, progress=False)
    assert float(x.abs().max()) <= 1.0 + 1e-5


# the few-step presets of the FP model (lcm* sample consistency-distilled students only)
@pytest.mark.parametrize("preset", [p for p in PRESETS if int("".join(filter(str.isdigit, p)))
                                    <= 20 and not p.startswith("lcm")])
def test_few_step_presets_reach_ddim20_fid(tmp_path, preset):
    """The fast variant: the presets of at most 20 steps at 100 samples. Both FIDs carry the same
    small-sample bias at equal N and seeds, so the 1.5× bound of the slow test applies unchanged
    (it only gets easier to meet, never harder)."""
    ref = _preset_fid(tmp_path, "ddim20", 100)
    assert _preset_fid(tmp_path, preset, 100) <= 1.5 * ref


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_sampler_preset_reaches_ddim20_fid(tmp_path, preset):
    """Every preset at the 200 samples of the shipped FP reference: FID within 1.5× of DDIM-20."""
    ref = _preset_fid(tmp_path, "ddim20", 200)
    assert _preset_fid(tmp_path, preset, 200) <= 1.5 * ref


# ------------------------------------------------------------------------------------------------
# fine-tuning: interrupted at random points, resumed by a plain re-run
# ------------------------------------------------------------------------------------------------
QUEST = ("method=quest", "bits=w8a8", "method.calib_n=4", "method.calib_steps=2",
         "method.calib_batch_size=4", "method.max_samples=256", "method.batch_size=4",
         "method.checkpoint_every=2", "method.tla.steps=4", "method.cma.steps=4",
         "method.adaround.iters=2")


class Killed(BaseException):
    """Stands in for kill -9: not an Exception, so nothing in the run handles it."""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interrupted_finetune_resumes_to_the_uninterrupted_result(make_cfg, tmp_path,
                                                                  monkeypatch, seed):
    import importlib
    import random

    fit = importlib.import_module("lowbit.train.fit")  # the module (lowbit.train.fit is a function)

    whole = make_cfg(*TINY, *QUEST, output_dir=tmp_path / "whole")
    expected = _run(whole)["metrics"]

    saves = {"n": 0}
    kill_at = random.Random(seed).randint(1, 3)  # after the k-th last.ckpt of 4 (2 per stage)
    original = fit.LastCheckpoint.save

    def save_then_die(self, trainer):
        original(self, trainer)
        saves["n"] += 1
        if saves["n"] == kill_at:
            raise Killed

    monkeypatch.setattr(fit.LastCheckpoint, "save", save_then_die)
    cfg = make_cfg(*TINY, *QUEST, output_dir=tmp_path / "run")
    out = Path(cfg.paths.output_dir)
    with pytest.raises(Killed):
        _run(cfg)
    # nothing of the killed attempt is in the folder: no results, student or samples
    assert not (out / RESULTS).exists() and not (out / STUDENT).exists()
    assert (out / rundir.CHECKPOINTS / rundir.FINGERPRINT_FILE).is_file()
    monkeypatch.setattr(fit.LastCheckpoint, "save", original)
    res = _run(cfg)  # a plain re-run: resumed because the fingerprint matches
    assert res["config"]["resume"] is True
    assert res["metrics"] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def _fp_samples_job(cache_dir: str) -> bytes:
    torch.set_num_threads(1)
    from lowbit.models.digits import load_digits_model
    from lowbit.pipeline import fp_samples
    from lowbit.sampling import SamplerConfig

    model = load_digits_model()
    cond = torch.arange(12) % 10
    images = fp_samples(model, SamplerConfig(kind="ddim", steps=4, guidance_scale=2.0,
                                             batch_size=3), cond, 12, 0, Path(cache_dir))
    return images.numpy().tobytes()


@pytest.mark.slow
def test_concurrent_jobs_share_the_fp_sample_cache(tmp_path):
    """Jobs that need the same FP reference at once (a sweep's runs of one seed) must not read
    or remove each other's shards: one samples, the others wait and read its file."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx) as pool:
        out = list(pool.map(_fp_samples_job, [str(tmp_path)] * 3))
    assert out[0] == out[1] == out[2]
    cache = tmp_path / "fp_samples"
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob("*.shards"))
