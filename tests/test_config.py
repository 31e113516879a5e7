"""Config composition for every group option, and failures before any compute."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException

from lowbit.cli import CONF_DIR
from lowbit.config import ConfigError, validate

GROUPS = ["model", "method", "bits", "dataset", "sampler", "cache", "metrics", "trainer", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _valid_pair(group: str, option: str) -> list[str]:
    """Overrides that make ``group=option`` a runnable combination (method × bits)."""
    import yaml

    if group == "method":
        supported = yaml.safe_load((CONF_DIR / "method" / f"{option}.yaml").read_text())["supported_bits"]
        return [f"bits={supported[0]}"]
    if group == "bits" and option != "fp":
        for m in _options("method"):
            if option in yaml.safe_load((CONF_DIR / "method" / f"{m}.yaml").read_text())["supported_bits"]:
                return [f"method={m}"]
    return []


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}", *_valid_pair(group, option))
    if group == "trainer":
        assert cfg.trainer._target_ == "lightning.Trainer"
    else:
        assert cfg[group].name == option
    validate(cfg)


def test_default_config_is_digits_fp(make_cfg):
    cfg = make_cfg()
    assert (cfg.model.name, cfg.method.name, cfg.bits.name, cfg.dataset.name) == (
        "digits", "fp", "fp", "digits")
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    validate(cfg)


def test_experiment_files_compose(make_cfg):
    for exp in _options("experiment"):
        make_cfg(f"experiment={exp}")


def test_unknown_option_names_group_and_choices(make_cfg):
    with pytest.raises(MissingConfigException) as e:
        make_cfg("sampler=ddim7")
    assert "sampler" in str(e.value) and "ddim20" in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("metrics.num_samples=-5", "metrics.num_samples"),
    ("metrics.num_samples=0", "metrics.num_samples"),
    ("sampler.steps=0", "sampler.steps"),
    ("sampler.batch_size=0", "sampler.batch_size"),
    ("sampler.eta=1.5", "sampler.eta"),
    ("sampler.guidance_scale=-1", "sampler.guidance_scale"),
    ("model.loader.checkpoint=/nonexistent/unet.safetensors", "model.loader.checkpoint"),
])
def test_invalid_values_name_key_and_fix(make_cfg, override, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(override))
    assert e.value.key == key
    assert key in str(e.value) and "Fix:" in str(e.value)


def test_export_of_fp_run_fails_before_compute(make_cfg):
    with pytest.raises(ConfigError, match="no quantized model to pack"):
        validate(make_cfg("export=true"))


def test_method_bits_mismatch_fails_before_compute(make_cfg):
    cfg = make_cfg()
    cfg.bits.name = "w4a4"  # method=fp only supports bits=fp
    with pytest.raises(ConfigError, match="method=fp does not run at these bits"):
        validate(cfg)


def test_unwritable_output_dir_fails_before_compute(make_cfg, tmp_path):
    from lowbit.pipeline import run_experiment

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # even root cannot create a folder below a file
    cfg = make_cfg(output_dir=blocker / "run")
    with pytest.raises(ConfigError, match="paths.output_dir"):
        run_experiment(cfg)


@pytest.mark.parametrize("launcher,target", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_sweep_launchers_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
