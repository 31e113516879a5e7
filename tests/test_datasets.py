"""Datasets built from the ``dataset`` config group: digits splits, image folders, prompt files,
early errors that name the key, and reference folders that are rebuilt when they do not match."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from lowbit.config import ConfigError
from lowbit.data.datasets import (
    MANIFEST,
    DigitsDataset,
    ImageFolderDataset,
    PromptsDataset,
    image_files,
)
from lowbit.data.digits import split_indices


def _dataset(make_cfg, *overrides):
    return instantiate(make_cfg(*overrides).dataset)


# -- digits ------------------------------------------------------------------------------------------

def test_digits_from_config_has_fixed_disjoint_splits(make_cfg):
    ds = _dataset(make_cfg)
    assert isinstance(ds, DigitsDataset) and ds.resolution == 16 and ds.num_classes == 10
    ds.check()
    x_all, y_all = ds.images("all"), ds.labels("all")
    assert x_all.shape == (1797, 1, 16, 16) and x_all.dtype == torch.float32
    assert float(x_all.min()) >= -1.0 and float(x_all.max()) <= 1.0
    train, held = split_indices(1797)
    assert len(ds.images("heldout")) == 359 and len(ds.images("train")) == 1438
    assert set(train.tolist()).isdisjoint(held.tolist())
    # the held-out digits are exactly those images, with their labels, on every construction
    assert torch.equal(ds.images("heldout"), x_all[held])
    assert torch.equal(ds.labels("heldout"), y_all[held])
    assert torch.equal(_dataset(make_cfg).images("heldout"), ds.images("heldout"))
    with pytest.raises(ValueError, match="unknown split"):
        ds.images("test")


def test_digits_conditions_are_spread_over_the_classes(make_cfg):
    ds = _dataset(make_cfg)
    assert ds.conditions(23).tolist() == [i % 10 for i in range(23)]


def test_digits_bad_keys_name_the_key(make_cfg):
    with pytest.raises(ConfigError, match="dataset.reference_split"):
        _dataset(make_cfg, "dataset.reference_split=test").check()
    with pytest.raises(ConfigError, match="dataset.num_classes"):
        _dataset(make_cfg, "dataset.num_classes=7").check()
    with pytest.raises(ConfigError, match="dataset.reference_stats"):
        _dataset(make_cfg, "dataset.reference_stats=/no/such/stats.npz").check()


def test_digits_reference_folder_is_verified_and_rebuilt(tmp_path):
    ds = DigitsDataset()
    ref = ds.reference(tmp_path)
    files = image_files(ref)
    assert len(files) == 1797
    manifest = json.loads((ref / MANIFEST).read_text())
    assert manifest["count"] == 1797 and len(manifest["files"]) == 1797
    # the PNGs are the digits themselves
    first = np.asarray(Image.open(files[0]))
    assert np.array_equal(first, ((ds.images("all")[0, 0] + 1) * 127.5).round().byte().numpy())

    # an extra PNG: rebuilt without it
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(ref / "extra.png")
    assert ds.reference(tmp_path) == ref
    assert len(image_files(ref)) == 1797 and not (ref / "extra.png").exists()
    # a missing PNG: rebuilt with it
    files[5].unlink()
    ds.reference(tmp_path)
    assert files[5].is_file() and len(image_files(ref)) == 1797
    # a changed PNG (same count): rebuilt
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(files[7])
    ds.reference(tmp_path)
    assert np.array_equal(np.asarray(Image.open(files[7])),
                          ((ds.images("all")[7, 0] + 1) * 127.5).round().byte().numpy())
    # a missing manifest: rebuilt
    (ref / MANIFEST).unlink()
    ds.reference(tmp_path)
    assert (ref / MANIFEST).is_file()


def test_digits_heldout_reference_split(tmp_path):
    ds_all = DigitsDataset()
    ds_held = DigitsDataset(reference_split="heldout")
    ref = ds_held.reference(tmp_path)
    assert len(image_files(ref)) == 359
    assert ref != ds_all.reference(tmp_path)  # both live side by side in the cache


# -- image folders -------------------------------------------------------------------------------

def _stripes(w: int = 40, h: int = 20) -> np.ndarray:
    """Red | green | blue columns; the centred h×h square is all green."""
    a = np.zeros((h, w, 3), np.uint8)
    side = (w - h) // 2
    a[:, :side, 0] = 255
    a[:, side : side + h, 1] = 255
    a[:, side + h :, 2] = 255
    return a


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "images"
    for name in ["cat", "dog", "emu"]:
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(_stripes()).save(root / name / f"{i}.png")
        Image.fromarray(_stripes(30, 30)).save(root / name / "sq.jpg", quality=100)
    return root


def test_image_folder_with_class_subfolders(make_cfg, class_folder):
    ds = _dataset(make_cfg, "dataset=image_folder", f"dataset.path={class_folder}")
    assert isinstance(ds, ImageFolderDataset)
    ds.check()
    assert ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3
    assert ds.conditioning == "class"
    x, y = ds.images("all"), ds.labels("all")
    assert x.shape == (15, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # center-cropped to the green square, then resized
    png = x[y == 0][1]  # a 40×20 PNG
    assert float(png[1].min()) == 1.0 and float(png[0].max()) == -1.0 and float(png[2].max()) == -1.0
    train, held = ds.labels("train"), ds.labels("heldout")
    assert len(train) + len(held) == 15 and len(held) == 3
    assert ds.conditions(7).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_image_folder_flat_is_unconditional_and_grey(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.full((24, 24), 40 * i, np.uint8)).save(root / f"{i}.png")
    ds = ImageFolderDataset(path=str(root), resolution=8, channels=1, limit=4)
    ds.check()
    assert ds.conditioning == "none" and ds.num_classes is None and ds.conditions(5) is None
    assert ds.images("all").shape == (4, 1, 8, 8)
    with pytest.raises(ConfigError, match="no class labels"):
        ds.labels()


@pytest.mark.parametrize("kind", ["none", "missing", "file", "empty", "broken"])
def test_image_folder_errors_name_dataset_path(tmp_path, kind):
    path = {"none": None, "missing": tmp_path / "nowhere", "file": tmp_path / "a.txt",
            "empty": tmp_path / "empty", "broken": tmp_path / "broken"}[kind]
    if kind == "file":
        path.write_text("x")
    if kind == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("no images here")
    if kind == "broken":
        path.mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(path / "ok.png")
        (path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = ImageFolderDataset(path=None if path is None else str(path))
    with pytest.raises(ConfigError, match="dataset.path") as e:
        ds.check()
    assert "Fix:" in str(e.value)
    if kind == "broken":
        assert "bad.png" in str(e.value)


def test_image_folder_class_subfolders_forced_on_a_flat_folder(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="dataset.class_subfolders"):
        ImageFolderDataset(path=str(tmp_path), class_subfolders=True).check()


def test_image_folder_reference_follows_its_source(tmp_path, class_folder):
    ds = ImageFolderDataset(path=str(class_folder), resolution=16)
    ref = ds.reference(tmp_path / "cache")
    assert len(image_files(ref)) == 15
    Image.fromarray(_stripes()).save(class_folder / "dog" / "new.png")
    ref2 = ImageFolderDataset(path=str(class_folder), resolution=16).reference(tmp_path / "cache")
    assert len(image_files(ref2)) == 16
    # a stray file in the cached folder is never used as is
    Image.fromarray(_stripes()).save(ref2 / "stray.png")
    ref3 = ImageFolderDataset(path=str(class_folder), resolution=16).reference(tmp_path / "cache")
    assert ref3 == ref2 and len(image_files(ref3)) == 16


# -- prompts -------------------------------------------------------------------------------------

def test_prompts_from_txt_cycle(make_cfg, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n  a blue sphere  \na green cone\n", encoding="utf-8")
    ds = _dataset(make_cfg, "dataset=prompts", f"dataset.path={f}")
    assert isinstance(ds, PromptsDataset) and ds.conditioning == "text"
    ds.check()
    assert ds.prompts() == ["a red cube", "a blue sphere", "a green cone"]
    assert ds.conditions(5) == ["a red cube", "a blue sphere", "a green cone", "a red cube",
                                "a blue sphere"]
    assert PromptsDataset(path=str(f), limit=2).conditions(3) == ["a red cube", "a blue sphere",
                                                                  "a red cube"]


@pytest.mark.parametrize("suffix,sep,col", [(".csv", ",", "caption"), (".tsv", "\t", "Prompt"),
                                            (".csv", ",", "text")])
def test_prompts_from_tables(tmp_path, suffix, sep, col):
    f = tmp_path / f"p{suffix}"
    f.write_text(f"id{sep}{col}\n1{sep}\"a cat, sitting\"\n2{sep}a dog\n", encoding="utf-8")
    assert PromptsDataset(path=str(f)).prompts() == ["a cat, sitting", "a dog"]


def test_prompts_named_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,desc\n1,a cat\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="caption / prompt / text column"):
        PromptsDataset(path=str(f)).check()
    assert PromptsDataset(path=str(f), column="desc").prompts() == ["a cat"]
    with pytest.raises(ConfigError, match="dataset.column"):
        PromptsDataset(path=str(f), column="nope").check()


@pytest.mark.parametrize("kind", ["none", "missing", "suffix", "empty"])
def test_prompts_errors_name_dataset_path(tmp_path, kind):
    path = {"none": None, "missing": tmp_path / "no.txt", "suffix": tmp_path / "p.json",
            "empty": tmp_path / "empty.txt"}[kind]
    if kind == "suffix":
        path.write_text('["a"]')
    if kind == "empty":
        path.write_text("\n \n")
    with pytest.raises(ConfigError, match="dataset.path"):
        PromptsDataset(path=None if path is None else str(path)).check()


def test_prompts_have_no_images_or_reference(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n")
    ds = PromptsDataset(path=str(f))
    with pytest.raises(ConfigError, match="no images"):
        ds.images()
    with pytest.raises(ConfigError, match="dataset.reference_stats"):
        ds.reference(tmp_path)
