"""Config composition for every group option, and failures before any compute."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from lowbit.cli import CONF_DIR
from lowbit.config import ConfigError, validate

GROUPS = ["model", "method", "bits", "dataset", "sampler", "cache", "metrics", "trainer", "logger"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _valid_pair(group: str, option: str) -> list[str]:
    """Overrides that make ``group=option`` a runnable combination (method × bits)."""

    if group == "model" and OmegaConf.is_missing(
            OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml"), "path"):
        return ["model.path=google/ddpm-cifar10-32"]  # a hub id: composing downloads nothing
    if group == "method":
        return [f"bits={_supported_bits(option)[0]}"]
    if group == "bits" and option != "fp":
        for m in _options("method"):
            if option in _supported_bits(m):
                return [f"method={m}"]
    return []


def _supported_bits(method: str) -> list:
    """A method's supported_bits, following its defaults list (qdiffusion extends ptq)."""
    spec = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"))
    if "supported_bits" in spec:
        return spec["supported_bits"]
    parents = [d for d in spec.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    assert parents, f"method/{method}.yaml has no supported_bits and no parent config"
    return _supported_bits(parents[0])


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}", *_valid_pair(group, option))
    if group == "trainer":
        assert cfg.trainer._target_ == "lightning.Trainer"
    else:
        assert cfg[group].name == option
    validate(cfg)


def test_model_without_a_path_fails_before_compute(make_cfg):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("model=diffusers"))
    assert e.value.key == "model.path" and "Fix:" in str(e.value)


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


# ------------------------------------------------------------------------------------------------
# bits presets by name, names that never contradict the bits, labels from the effective settings
# ------------------------------------------------------------------------------------------------
def _bits_yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((CONF_DIR / "bits" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", _options("bits"))
def test_preset_by_name_equals_its_yaml_and_labels_itself(name):
    from lowbit.quant import QuantConfig

    cfg = QuantConfig.preset(name)
    assert cfg == QuantConfig.from_dict(_bits_yaml(name))
    assert cfg.name == name and cfg.label() == name


def test_preset_names_lists_the_shipped_yamls():
    from lowbit.quant import preset_names

    assert list(preset_names()) == _options("bits")


def test_preset_with_overrides_and_unknown_name():
    from lowbit.quant import QuantConfig

    cfg = QuantConfig.preset("w4a4", act={"init": "mse"}, skip_fp=True)
    assert (cfg.act.bits, cfg.act.granularity, cfg.act.init, cfg.skip_fp) == (4, "tensor", "mse", True)
    with pytest.raises(ConfigError) as e:
        QuantConfig.preset("w4a5")
    assert e.value.key == "bits" and "w4a4_pchan" in str(e.value) and "w8a8" in str(e.value)


@pytest.mark.parametrize("name", ["w4a4", "w4a4_pchan", "fp", "my-recipe"])
def test_a_mapping_with_only_a_name_is_rejected(name):
    from lowbit.quant import QuantConfig

    with pytest.raises(ConfigError) as e:
        QuantConfig.from_dict({"name": name})
    assert e.value.key == "bits.name" and "QuantConfig.preset(" in str(e.value)
    if name != "my-recipe":
        assert f"QuantConfig.preset({name!r})" in str(e.value)


@pytest.mark.parametrize("d,key_part", [
    ({"name": "w4a4", "weight": {"bits": 4}}, "bits.act.bits=8"),  # act left at the W8A8 default
    ({"name": "w4a4_pchan", "weight": {"bits": 8}, "act": {"bits": 4}}, "bits.weight.bits=8"),
    ({"name": "W2A8", "weight": {"bits": 4}}, "bits.weight.bits=4"),  # case-insensitive
    ({"name": "w1a32", "weight": {"bits": 1}, "act": {"bits": 8}}, "bits.act.bits=8"),
    ({"name": "w4a16", "weight": {"bits": 4}, "act": {"bits": 4}}, "bits.act.bits=4"),
    ({"name": "fp", "weight": {"bits": 4}, "act": {"bits": None}}, "bits.weight.bits=4"),
    ({"name": "fp", "weight": {"bits": None}, "act": {"bits": None}, "attn_bits": 8},
     "attention matmuls"),
])
def test_a_name_that_contradicts_the_bits_is_rejected(d, key_part):
    from lowbit.quant import QuantConfig

    with pytest.raises(ConfigError) as e:
        QuantConfig.from_dict(d)
    assert e.value.key == "bits.name" and key_part in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize("d", [
    {"name": "w1a32", "weight": {"bits": 1}, "act": {"bits": None}},  # 32 and 16 mean FP
    {"name": "w2a16", "weight": {"bits": 2}, "act": {"bits": 16}},
    {"name": "w8a8-t", "act": {"timestep_aware": True}},  # a wXaY prefix with a free suffix
    {"name": "fp", "weight": {"bits": None}, "act": {"bits": None}, "quantize_attention": False},
    {"name": "w4", "weight": {"bits": 4}},  # not wXaY: a free-form label
    {"name": "my recipe", "weight": {"bits": 3}, "act": {"bits": 5}},
])
def test_names_that_agree_or_are_free_form_are_accepted(d):
    from lowbit.quant import QuantConfig

    assert QuantConfig.from_dict(d).name == d["name"]


def test_derived_configs_cannot_keep_a_stale_name():
    from lowbit.quant import QuantConfig, QuantSpec

    with pytest.raises(ConfigError, match="bits.name='w4a4'"):
        QuantConfig.preset("w4a4").with_overrides({"act": {"bits": 8}})
    assert QuantConfig.preset("w4a4").with_overrides({"act": {"bits": 8}, "name": "w4a8"}).act.bits == 8
    with pytest.raises(ConfigError):  # also direct construction and dataclasses.replace
        QuantConfig(name="w8a8", weight=QuantSpec(bits=4))
    # without a name, the name is the label of the settings
    assert QuantConfig.from_dict({"weight": {"bits": 4}}).name == "w4a8"
    assert QuantConfig(weight=QuantSpec(bits=4, granularity="channel")).name == "w4a8"
    assert QuantConfig().name == "w8a8"
    assert QuantConfig(weight=QuantSpec(bits=4, granularity="channel", init="mse")).name == "w4a8+mse-w"


@pytest.mark.parametrize("preset,over,label", [
    # an override that makes another preset's settings gets that preset's name
    ("w4a4", {"act": {"granularity": "channel"}}, "w4a4_pchan"),
    ("w4a4_pchan", {"act": {"granularity": "tensor"}}, "w4a4"),
    ("w4a4", {"act": {"granularity": "token"}}, "w4a4+token-act"),
    ("w4a8", {"weight": {"granularity": "group:64"}}, "w4a8+group64-w"),
    ("w8a8", {"act": {"granularity": "channel"}}, "w8a8+chan-act"),
    ("w4a4", {"weight": {"init": "mse"}, "act": {"init": "mse"}}, "w4a4+mse-w+mse-act"),
    ("w4a4", {"act": {"init": "percentile", "percentile": 99.9}}, "w4a4+pct99.9-act"),
    ("w8a8", {"weight": {"symmetric": True}}, "w8a8+sym-w"),
    ("w1a8", {"act": {"learnable": False}}, "w1a8+fixed-act"),
    ("w8a8", {"act": {"timestep_aware": True}}, "w8a8+ts-act"),
    ("w8a8", {"act": {"timestep_aware": True, "interp": "linear"}}, "w8a8+ts-act+linear-act"),
    ("w8a8", {"quantize_attention": False}, "w8a8+fp-attn"),
    ("w4a4", {"attn_bits": 8}, "w4a4+8bit-attn"),
    ("w4a4", {"sm_bits": None}, "w4a4+fp-sm"),
    ("w4a4", {"first_last_bits": 8}, "w4a4+8bit-io"),
    ("w4a4", {"first_last_bits": 16}, "w4a4+16bit-io"),
    ("w4a4", {"time_emb_bits": 8}, "w4a4+8bit-temb"),
    ("w1a4", {"first_last_bits": None, "time_emb_bits": None}, "w1a4+same-io+same-temb"),
    ("w4a8", {"skip_fp": True}, "w4a8+fp-skip"),
    ("w4a8", {"split_shortcut": False}, "w4a8+nosplit"),
    ("w4a8", {"split_conv1": True}, "w4a8+split-conv1"),
    ("w4a8", {"exclude": ["*attentions*"]}, "w4a8+exclude"),
    ("w4a8", {"overrides": {"conv_in": "fp"}}, "w4a8+overrides"),
])
def test_label_names_every_setting_that_differs_from_the_preset(preset, over, label):
    from lowbit.quant import QuantConfig

    cfg = QuantConfig.preset(preset, **over)
    assert cfg.name == preset and cfg.label() == label


@pytest.mark.parametrize("preset,over", [
    ("w8a8", {"first_last_bits": 8}),  # already at 8 bits: no effect
    ("w8a8", {"act": {"interp": "linear"}}),  # interp without timestep_aware: no effect
    ("w4a16", {"act": {"granularity": "channel"}, "sm_bits": 4}),  # FP activations and attention
    ("w4a4", {"weight": {"percentile": 99.0}}),  # percentile without init=percentile
    ("fp", {"weight": {"granularity": "tensor"}, "first_last_bits": 4, "skip_fp": True}),
])
def test_label_ignores_settings_without_effect(preset, over):
    from lowbit.quant import QuantConfig

    assert QuantConfig.preset(preset, **over).label() == preset


def test_label_of_bits_without_a_preset_and_of_free_names():
    from lowbit.quant import QuantConfig, bits_label

    assert QuantConfig.from_dict({"name": "x", "weight": {"bits": 5}, "act": {"bits": 6}}).label() == "w5a6"
    assert bits_label({"name": "x", "weight": {"bits": 5}, "act": {"bits": None},
                       "sm_bits": None}) == "w5a16"
    # a free name does not pick the reference: same settings, same label
    w4 = _bits_yaml("w4a8")
    assert bits_label({**w4, "name": "mine", "skip_fp": True}) == "w4a8+fp-skip"
    assert bits_label({**_bits_yaml("w1a32"), "name": "fp-weights-off"}) == "w1a32"
    assert bits_label({**_bits_yaml("fp"), "name": "attn8", "attn_bits": 8, "sm_bits": 8}
                      ) == "fp+8bit-attn+8bit-sm"


def test_hydra_override_gets_a_truthful_label(make_cfg):
    from omegaconf import OmegaConf

    from lowbit.quant import bits_label

    def label(*over):
        return bits_label(OmegaConf.to_container(make_cfg("method=ptq", *over).bits, resolve=True))

    assert label("bits=w4a4") == "w4a4"
    assert label("bits=w4a4", "bits.act.granularity=channel") == "w4a4_pchan"
    assert label("bits=w4a8", "bits.weight.init=mse") == "w4a8+mse-w"
    with pytest.raises(ConfigError, match="bits.name='w4a4'"):
        label("bits=w4a4", "bits.weight.bits=8")


def test_plain_presets_are_the_papers_naive_setting():
    """Q-Diffusion's linear-quant rows: every layer at the bits, min-max, per-tensor activations."""
    from lowbit.quant import QuantConfig

    for name in ("w8a8", "w4a8", "w4a4", "w2a8"):
        cfg = QuantConfig.preset(name)
        assert (cfg.weight.init, cfg.act.init, cfg.act.granularity) == ("minmax", "minmax", "tensor")
        assert cfg.first_last_bits is None and cfg.time_emb_bits is None
        assert cfg.split_shortcut and not cfg.split_conv1
        for layer in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv1"):
            plan = cfg.plan(layer, "conv")
            assert (plan.weight.bits, plan.act.bits) == (cfg.weight.bits, cfg.act.bits), layer


def test_method_bits_rules_merge_and_show_in_the_label(make_cfg):
    from lowbit.quant import QuantConfig, bits_label, run_bits

    quest = make_cfg("method=quest", "bits=w4a4")
    assert bits_label(run_bits(quest)) == "w4a4+mse-w+mse-act+8bit-io+8bit-temb"
    assert QuantConfig.from_dict(run_bits(quest)).plan("conv_in", "conv").weight.bits == 8
    # a user switches one rule off on the command line
    off = make_cfg("method=quest", "bits=w4a4", "method.bits_rules.first_last_bits=null")
    assert bits_label(run_bits(off)) == "w4a4+mse-w+mse-act+8bit-temb"
    # the plain method leaves the preset as it is; the resolved dict of results.json works too
    from omegaconf import OmegaConf

    ptq = make_cfg("method=ptq", "bits=w4a4")
    assert bits_label(run_bits(OmegaConf.to_container(ptq, resolve=True))) == "w4a4"


@pytest.mark.parametrize(("rules", "key"), [
    ({"weight": {"bits": 8}}, "method.bits_rules.weight"),
    ({"name": "w8a8"}, "method.bits_rules.name"),
    ({"first_layers": ["x"]}, "method.bits_rules.first_layers"),
    ([1, 2], "method.bits_rules"),
])
def test_method_bits_rules_cannot_change_bits_or_names(rules, key):
    from lowbit.quant import run_bits

    with pytest.raises(ConfigError) as e:
        run_bits({"bits": _bits_yaml("w4a4"), "method": {"bits_rules": rules}})
    assert e.value.key == key and "Fix:" in str(e.value)


def test_split_rules_choose_which_concat_inputs_split():
    from lowbit.models.digits import build_digits_unet
    from lowbit.quant import QuantConfig, concat_split_points, quantize_

    points = concat_split_points(build_digits_unet())
    assert any(n.endswith(".conv1") for n in points) and any(n.endswith(".conv_shortcut") for n in points)

    def split(**over):
        m = build_digits_unet()
        quantize_(m, QuantConfig.preset("w4a4", **over))
        return {n for n, mod in m.named_modules() if getattr(mod, "split", 0)}

    assert split() == {n for n in points if n.endswith(".conv_shortcut")}  # Q-Diffusion
    assert split(split_conv1=True) == set(points)
    assert split(split_shortcut=False) == set()


def test_a_bits_override_shadowed_by_a_method_rule_is_refused(make_cfg):
    from lowbit.quant import run_bits

    cfg = make_cfg("method=quest", "bits=w4a4", "bits.weight.init=percentile")
    with pytest.raises(ConfigError) as e:
        run_bits(cfg)
    assert e.value.key == "bits.weight.init" and "method.bits_rules.weight.init=percentile" in str(e.value)
    with pytest.raises(ConfigError, match="bits.first_last_bits"):
        validate(make_cfg("method=quest", "bits=w4a4", "bits.first_last_bits=4"))
    # keys no rule sets stay the user's
    assert run_bits(make_cfg("method=quest", "bits=w4a4", "bits.sm_bits=6"))["sm_bits"] == 6
