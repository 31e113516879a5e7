"""CLIP score, paired SSIM and LPIPS, and the clip / coco / paired metrics configs.

Offline: the CLIP model is a tiny random-weight ``CLIPModel`` with a character-level CLIP
tokenizer, written by the test with ``save_pretrained``; the LPIPS backbone is a random-weight
torchvision AlexNet state dict. Random weights say nothing about how well images match prompts,
so the CLIP tests check the arithmetic (against ``CLIPModel.forward``'s own embeddings), batch
invariance and truncation; the LPIPS network is checked against torchmetrics' own LPIPS module
fed the same weights through torch hub's cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.cli import compose_config
from lowbit.config import ConfigError
from lowbit.data.datasets import DigitsDataset, PromptsDataset, build_dataset
from lowbit.metrics import (
    ClipScore,
    MetricInputs,
    MetricSuite,
    PairedFidelity,
    PairedLPIPS,
    PairedSSIM,
    build_metrics,
    paired_ssim,
)
from lowbit.metrics.paired import torchvision_weights_file

pytestmark = pytest.mark.usefixtures("omp_threads")

CONTEXT = 77  # CLIP's text context, start and end tokens included
SIDE = 32  # sample side: the tiny CLIP's input size, and at least AlexNet's 31 px
PROMPTS = ["a red square", "two cats on a sofa", "a lighthouse at night", "an empty road",
           "a bowl of fruit"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random-weight CLIP (ViT and text transformer, 2 layers each) with a character-level CLIP
    BPE tokenizer and an image processor for 32 px inputs, saved like a hub model."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in range(33, 127):  # every printable ASCII character, inside and at the end of a word
        vocab.setdefault(chr(c), len(vocab))
        vocab.setdefault(chr(c) + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=CONTEXT)
    images = CLIPImageProcessor(size={"shortest_edge": SIDE},
                                crop_size={"height": SIDE, "width": SIDE})
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=CONTEXT, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, **small),
        vision_config=dict(image_size=SIDE, patch_size=8, **small), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> Path:
    """A random-weight torchvision AlexNet state dict, as torchvision's weights file holds it."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("alexnet") / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (len(PROMPTS), 3, SIDE, SIDE), dtype=torch.uint8, generator=g)


def noisy(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = images.float() + sigma * torch.randn(images.shape, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


def smooth_images(n: int = 4, side: int = SIDE) -> torch.Tensor:
    """Images with structure (smooth gradients and blobs), where SSIM and LPIPS see noise."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    out = []
    for i in range(n):
        r = 0.5 + 0.5 * torch.sin(6 * xx + i)
        g = 0.5 + 0.5 * torch.cos(5 * yy - i)
        b = torch.exp(-((xx - 0.3 - 0.1 * i) ** 2 + (yy - 0.5) ** 2) * 20)
        out.append(torch.stack([r, g, b]))
    return (torch.stack(out) * 255).round().to(torch.uint8)


# -- CLIP score --------------------------------------------------------------------------------

@torch.no_grad()
def hand_scores(folder: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """100 · max(cos, 0) from CLIPModel.forward's own normalised embeddings, the processor used
    as its documentation shows (text padded to the longest prompt only)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    out = model(**inputs)
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    return 100 * cos.clamp(min=0)


def test_clip_score_is_100_max_cos_0(clip_dir, images):
    metric = ClipScore(model_path=str(clip_dir), batch_size=2)
    want = hand_scores(clip_dir, images, PROMPTS)
    got = metric.scores(images, PROMPTS)
    assert got.shape == (len(PROMPTS),)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    res = metric(MetricInputs(sample_dir=Path("."), images=images, conditions=list(PROMPTS)))
    assert res["clip_score"] == pytest.approx(float(want.double().mean()), abs=1e-4)
    assert res["clip_score_std"] == pytest.approx(float(want.double().std(correction=0)),
                                                  abs=1e-4)
    assert res["clip_n"] == len(PROMPTS)
    assert res["clip_model"] == clip_dir.name  # a local folder is recorded by its name
    # grey samples are read as RGB
    grey = images[:, :1]
    torch.testing.assert_close(metric.scores(grey, PROMPTS),
                               metric.scores(grey.expand(-1, 3, -1, -1), PROMPTS))


def test_clip_score_does_not_depend_on_the_batch_size(clip_dir, images):
    by_batch = [ClipScore(model_path=str(clip_dir), batch_size=b).scores(images, PROMPTS)
                for b in (1, 2, len(PROMPTS))]
    for s in by_batch[1:]:
        torch.testing.assert_close(s, by_batch[0], atol=1e-5, rtol=1e-5)


def test_long_prompts_are_truncated_to_clips_context(clip_dir, images, caplog):
    metric = ClipScore(model_path=str(clip_dir))
    _, processor = metric.load()
    head = " ".join(f"w{i}" for i in range(60))  # 3 tokens a word: far more than 77 tokens
    long_a, long_b = f"{head} and a cat", f"{head} and then something else entirely"
    ids = processor.tokenizer(long_a, truncation=True, max_length=CONTEXT)["input_ids"]
    assert len(processor.tokenizer(long_a)["input_ids"]) > CONTEXT
    assert len(ids) == CONTEXT and ids[0] == 0 and ids[-1] == 1  # start and end tokens kept
    with caplog.at_level(logging.WARNING, logger="lowbit.metrics.clip"):
        s = metric.scores(images[[0, 0, 1]], [long_a, long_b, "a cat"])
    assert "2 of 3 prompts are longer than CLIP's 77 tokens" in caplog.text
    assert s[0] == pytest.approx(float(s[1]), abs=1e-5)  # they differ only after the cut
    # the same as scoring the truncated token ids by hand
    want = hand_scores(clip_dir, images[:1], [processor.tokenizer.decode(
        ids, skip_special_tokens=True)])
    assert float(s[0]) == pytest.approx(float(want[0]), abs=1e-4)


def test_clip_score_needs_prompts(clip_dir, images):
    metric = ClipScore(model_path=str(clip_dir))
    labels = torch.arange(len(images))
    with pytest.raises(ValueError, match=r"needs the prompts.*class-conditional.*"
                                         r"metrics\.items\.clip=null"):
        metric(MetricInputs(sample_dir=Path("."), images=images, conditions=labels))
    with pytest.raises(ValueError, match="unconditional"):
        metric(MetricInputs(sample_dir=Path("."), images=images))
    with pytest.raises(ConfigError, match=r"metrics\.items\.clip=.*dataset=digits has none.*"
                                          r"'class'") as e:
        metric.check(DigitsDataset(), "metrics.items.clip")
    assert e.value.key == "metrics.items.clip"


def test_clip_model_must_be_local(tmp_path):
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache.*"
                                          r"huggingface-cli download nobody/no-such-clip") as e:
        ClipScore(model_path="nobody/no-such-clip").check(None, "metrics.items.clip")
    assert e.value.key == "metrics.items.clip.model_path"
    with pytest.raises(ConfigError, match="no such folder") as e:
        ClipScore(model_path=str(tmp_path / "missing")).check(None, "metrics.items.clip")
    assert e.value.key == "metrics.items.clip.model_path"
    with pytest.raises(ConfigError, match="no config.json") as e:
        ClipScore(model_path=str(tmp_path)).check()
    assert e.value.key == "metrics.items.clip.model_path"
    with pytest.raises(ConfigError, match="positive integer") as e:
        ClipScore(model_path=str(tmp_path), batch_size=0).check(None, "metrics.items.clip")
    assert e.value.key == "metrics.items.clip.batch_size"


# -- paired SSIM and LPIPS -----------------------------------------------------------------------

def _ctx(images: torch.Tensor, fp: torch.Tensor | None) -> MetricInputs:
    return MetricInputs(sample_dir=Path("."), images=images, fp_images=fp)


def test_paired_ssim_is_1_for_identical_images_and_falls_with_noise():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    x = smooth_images()
    metric = PairedSSIM(batch_size=3)
    assert metric.needs_fp_images
    assert metric(_ctx(x, x))["ssim"] == pytest.approx(1.0, abs=1e-5)
    values = [metric(_ctx(noisy(x, s), x))["ssim"] for s in (4, 16, 48)]
    assert 1 > values[0] > values[1] > values[2] > 0, values
    # the per-image mean of torchmetrics' module on the [0, 1] scale
    module = StructuralSimilarityIndexMeasure(data_range=1.0)
    want = float(module(noisy(x, 16).float() / 255, x.float() / 255))
    assert values[1] == pytest.approx(want, abs=1e-5)
    assert paired_ssim(x[:, :1], x[:, :1]).shape == (len(x),)  # grey images too


def test_paired_lpips_is_0_for_identical_images_and_grows_with_noise(alexnet_file):
    x = smooth_images()
    metric = PairedLPIPS(backbone_weights=str(alexnet_file), batch_size=3)
    metric.check()
    assert metric.needs_fp_images
    same = metric(_ctx(x, x))
    assert same == {"lpips": 0.0, "lpips_net": "alex"}
    values = [metric(_ctx(noisy(x, s), x))["lpips"] for s in (4, 16, 48)]
    assert 0 < values[0] < values[1] < values[2], values


def test_paired_lpips_equals_torchmetrics_with_torchvisions_cache(alexnet_file, tmp_path,
                                                                  monkeypatch):
    """backbone_weights=null reads the file torchvision caches; torchmetrics' own LPIPS module,
    which asks torchvision for the pretrained backbone, finds the same file and gives the same
    distances."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = torchvision_weights_file("alex")
    assert cached == tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    with pytest.raises(ConfigError, match=r"no LPIPS backbone weights.*alexnet-owt-7be5be79"
                                          r"\.pth.*metrics\.items\.lpips=null") as e:
        PairedLPIPS().check()
    assert e.value.key == "metrics.items.lpips.backbone_weights"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(alexnet_file)
    x = smooth_images()
    y = noisy(x, 24)
    got = PairedLPIPS(batch_size=2)(_ctx(y, x))["lpips"]
    reference = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    want = float(reference(y.float() / 255, x.float() / 255))
    assert got == pytest.approx(want, rel=1e-5)


def test_paired_lpips_refuses_wrong_weights_and_small_images(alexnet_file, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, bad)
    with pytest.raises(ConfigError, match=r"features\.0\.weight has shape") as e:
        PairedLPIPS(backbone_weights=str(bad)).check(None, "metrics.items.lpips")
    assert e.value.key == "metrics.items.lpips.backbone_weights"
    with pytest.raises(ConfigError) as e:
        PairedLPIPS(net="squeeze", backbone_weights=str(alexnet_file)).check()
    assert e.value.key == "metrics.items.lpips.net"
    small = smooth_images(2, side=16)
    metric = PairedLPIPS(backbone_weights=str(alexnet_file))
    with pytest.raises(ValueError, match=r"at least 31 px.*resize=64"):
        metric(_ctx(noisy(small, 8), small))
    resized = PairedLPIPS(backbone_weights=str(alexnet_file), resize=64)
    assert resized(_ctx(noisy(small, 8), small))["lpips"] > 0


def test_paired_metrics_need_the_fp_samples(images):
    for metric in (PairedSSIM(), PairedLPIPS()):
        with pytest.raises(ValueError, match="FP model's samples"):
            metric(_ctx(images, None))
        with pytest.raises(ValueError, match="shapes"):
            metric(_ctx(images, images[:2]))


# -- configs -------------------------------------------------------------------------------------

@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_clip_config_composes_with_a_prompts_dataset(clip_dir, alexnet_file, prompts_file):
    cfg = compose_config(["metrics=clip", "dataset=prompts", f"dataset.path={prompts_file}",
                          f"metrics.items.clip.model_path={clip_dir}",
                          f"metrics.items.lpips.backbone_weights={alexnet_file}"])
    suite = build_metrics(cfg.metrics)
    assert isinstance(suite, MetricSuite) and suite.needs_fp_images
    assert list(suite.items) == ["clip", "fidelity", "ssim", "lpips"]
    assert isinstance(suite.items["clip"], ClipScore)
    assert isinstance(suite.items["fidelity"], PairedFidelity)
    dataset = build_dataset(cfg.dataset)
    assert isinstance(dataset, PromptsDataset)
    suite.check(dataset)
    with pytest.raises(ConfigError) as e:
        suite.check(DigitsDataset())
    assert e.value.key == "metrics.items.clip"
    # the results of the whole suite, FP samples against themselves
    x = smooth_images(len(PROMPTS))
    res = suite(MetricInputs(sample_dir=Path("."), images=x, conditions=dataset.conditions(5),
                             fp_images=x))
    assert res["mse"] == 0.0 and res["lpips"] == 0.0
    assert res["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert res["clip_n"] == len(PROMPTS) and res["clip_model"] == clip_dir.name


def test_coco_and_paired_configs():
    coco = compose_config(["metrics=coco"]).metrics
    assert coco.num_samples == 10000
    assert set(coco["items"]) == {"inception", "clip", "fidelity", "ssim", "lpips"}
    assert coco["items"].inception._target_ == "lowbit.metrics.InceptionMetrics"
    assert coco["items"].clip.model_path == "openai/clip-vit-large-patch14"
    paired = compose_config(["metrics=paired"]).metrics
    assert set(paired["items"]) == {"fidelity", "ssim", "lpips"}
    suite = build_metrics(paired)
    assert [type(m) for m in suite.items.values()] == [PairedFidelity, PairedSSIM, PairedLPIPS]


@pytest.mark.slow
def test_text_to_image_run_records_clip_and_paired_metrics(tmp_path, clip_dir, alexnet_file,
                                                           prompts_file):
    """An FP run of a random-weight SD v1.x pipeline on 2 prompts with metrics=clip."""
    from lowbit.models.presets import write_preset_pipeline
    from lowbit.pipeline import run_experiment

    folder = write_preset_pipeline(tmp_path / "sd", "sd_v1")
    cfg = compose_config([
        "model=diffusers", f"model.path={folder}", "model.name=sd_v1", f"model.resolution={SIDE}",
        "dataset=prompts", f"dataset.path={prompts_file}", "metrics=clip",
        "metrics.num_samples=2", "metrics.grid_size=2",
        f"metrics.items.clip.model_path={clip_dir}",
        f"metrics.items.lpips.backbone_weights={alexnet_file}",
        "sampler=ddim20", "sampler.steps=2", "sampler.batch_size=2", "logger=none", "threads=1",
        "device=cpu"], output_dir=tmp_path / "run")
    cfg.paths.cache_dir = str(tmp_path / "cache")
    res = run_experiment(cfg)
    assert res["status"] == "done"
    m = res["metrics"]
    assert m["clip_n"] == 2 and m["clip_model"] == clip_dir.name
    assert np.isfinite(m["clip_score"]) and 0 <= m["clip_score"] <= 100
    assert m["mse"] == 0.0 and m["lpips"] == 0.0  # the FP model against itself
    assert m["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert m["lpips_net"] == "alex"


def test_pickscore_reward_is_the_temperature_scaled_clip_cosine(clip_dir, images):
    """reward=pickscore: logit_scale · cos(image, prompt) of the CLIP-architecture model in the
    folder (PickScore's score), with the gradient reaching the images; no folder is refused
    naming reward.model_path."""
    from transformers import CLIPModel

    from lowbit.config import ConfigError
    from lowbit.rewards import ClipReward, PickScoreReward

    x = (images.float() / 127.5 - 1).requires_grad_(True)
    batch = {"image_idx": torch.arange(len(PROMPTS))}
    pick, clip = PickScoreReward(str(clip_dir)), ClipReward(str(clip_dir))
    pick.captions = clip.captions = list(PROMPTS)
    scale = float(CLIPModel.from_pretrained(str(clip_dir)).logit_scale.exp())
    value = pick(x, batch)
    assert torch.allclose(value, scale * clip(x, batch), rtol=1e-5)
    value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="reward.model_path"):
        PickScoreReward(None).check()
