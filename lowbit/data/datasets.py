"""Datasets built from the ``dataset`` config group (``_target_`` + keys, ``hydra.utils.instantiate``).

A dataset answers four questions for a run:

- :meth:`Dataset.images` — real images in ``[-1, 1]``, ``[N, C, H, W]`` float, of a split
  (``"train"``, ``"heldout"``, ``"all"``): the data of QAT-style methods and of the FID reference;
- :meth:`Dataset.labels` — their class labels (class datasets only);
- :meth:`Dataset.captions` — their captions (captioned image folders: text-to-image training);
- :meth:`Dataset.conditions` — what to sample ``n`` images with: class labels spread evenly over
  ``0 … K−1``, prompts (cycled), or ``None``;
- :meth:`Dataset.reference` — the reference set of the metrics: a PNG folder written once into the
  cache and checked against a checksum manifest on every use (a folder with extra, missing or
  changed files is rebuilt, never used as is), or a precomputed statistics file when
  ``dataset.reference_stats`` is set.

Construction never touches the disk; :meth:`Dataset.check` validates paths and keys and raises
:class:`lowbit.config.ConfigError` naming the key, so a run can fail before any compute.

Splits: ``heldout`` is a fixed seeded part of the images (``heldout_fraction``, ``split_seed``),
``train`` the rest, ``all`` everything. For the digits the held-out part is the digit classifier's
validation split (:func:`lowbit.data.digits.split_indices`). ``reference_split`` chooses the split
of the reference folder; it defaults to ``all`` so FID numbers stay comparable with those recorded
before the split existed — pass ``dataset.reference_split=heldout`` to measure against digits no
training set has seen (see DESIGN.md, "Measured caution").
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lowbit.config import ConfigError

SPLITS = ("train", "heldout", "all")
MANIFEST = "manifest.json"
# what PIL reads; a reference folder is checked against everything clean-fid would read
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})
CLEANFID_EXTENSIONS = IMAGE_EXTENSIONS | {"npy"}
PROMPT_COLUMNS = ("caption", "prompt", "text")
# captions of an image folder: Hugging Face ``imagefolder`` metadata (a ``file_name`` column, the
# image's path relative to the folder, and a caption column), as .csv, .tsv or .jsonl
CAPTION_SUFFIXES = (".csv", ".tsv", ".jsonl")
FILE_COLUMN = "file_name"
_MANIFEST_VERSION = 1


# -- reference folders -------------------------------------------------------------------------------

def image_files(folder: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` (recursively, as clean-fid finds them), sorted by path."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix[1:].lower() in extensions
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def folder_matches_manifest(folder: Path, key: dict) -> bool:
    """True when ``folder`` holds exactly the files its manifest lists, with their checksums, and
    the manifest was written for ``key`` (the dataset, split and resolution it was made from)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != _MANIFEST_VERSION or manifest.get("key") != key:
        return False
    listed: dict[str, str] = manifest.get("files", {})
    present = [p.relative_to(folder).as_posix() for p in image_files(folder, CLEANFID_EXTENSIONS)]
    if len(present) != manifest.get("count") or set(present) != set(listed):
        return False
    return all(_sha256(folder / name) == digest for name, digest in listed.items())


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (jobs of one sweep share a cache)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic rename below still protects readers
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_image_folder(folder: Path, key: dict, write: Callable[[Path], None]) -> Path:
    """``folder`` if it matches its manifest for ``key``; otherwise (re)built by ``write(tmp)`` in a
    temporary folder, given a manifest (count + SHA-256 of every image) and swapped in."""
    folder = Path(folder)
    with _lock(folder.parent / f".{folder.name}.lock"):
        if folder_matches_manifest(folder, key):
            return folder
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            files = {p.relative_to(tmp).as_posix(): _sha256(p)
                     for p in image_files(tmp, CLEANFID_EXTENSIONS)}
            manifest = {"version": _MANIFEST_VERSION, "key": key, "count": len(files),
                        "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=0, sort_keys=True))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_png(image_u8: Tensor, path: Path) -> None:
    """One ``[C, H, W]`` uint8 image as a PNG file (grey when C = 1)."""
    arr = image_u8.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def _to_uint8(images: Tensor) -> Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# -- the interface -------------------------------------------------------------------------------

class Dataset(ABC):
    """What a run samples with and measures against. Subclasses are built by Hydra from
    ``cfg.dataset``; every key of the yaml is a constructor argument."""

    name: str
    #: ``"class"`` (labels), ``"text"`` (prompts) or ``"none"``
    conditioning: str = "none"
    reference_split: str = "all"
    reference_stats: str | None = None

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`ConfigError` (naming the ``dataset.*`` key and the fix) if this dataset
        cannot be used; cheap enough to call before any compute."""

    @property
    def num_classes(self) -> int | None:
        return None

    def images(self, split: str = "train") -> Tensor:
        """Real images in ``[-1, 1]``, ``[N, C, H, W]`` float32."""
        raise ConfigError("dataset", self.name, "this dataset has no images",
                          "choose a dataset with images (dataset=digits or dataset=image_folder "
                          "dataset.path=<folder>) for what needs real images")

    def labels(self, split: str = "train") -> Tensor:
        """Class labels (int64 ``[N]``) of :meth:`images` of the same split."""
        raise ConfigError("dataset", self.name, "this dataset has no class labels",
                          "choose a class dataset (dataset=digits, or dataset=image_folder with "
                          "one subfolder per class)")

    def captions(self, split: str = "train") -> list[str]:
        """Captions of :meth:`images` of the same split (captioned datasets only)."""
        raise ConfigError("dataset", self.name, "this dataset has no captions",
                          "choose a captioned image folder (dataset=image_folder "
                          "dataset.captions=<metadata .csv/.tsv/.jsonl with file_name and "
                          "caption columns>)")

    def conditions(self, n: int) -> Tensor | list[str] | None:
        """What to sample ``n`` images with: labels ``0, 1, …, K−1, 0, …`` (every class
        measured), prompts (cycled), or ``None`` for an unconditional dataset."""
        if self.conditioning == "class":
            return torch.arange(n) % int(self.num_classes)
        return None

    def reference(self, cache_dir: str | Path) -> Path:
        """The metrics' reference: ``dataset.reference_stats`` when set (a ``.npz`` in the
        metric's feature space), else a PNG folder of ``reference_split`` under ``cache_dir``."""
        self.check()
        if self.reference_stats:
            return Path(self.reference_stats)
        key = self.reference_key(self.reference_split)
        folder = Path(cache_dir) / "reference" / f"{self.name}-{self.reference_split}-{_key_hash(key)}"
        return cached_image_folder(folder, key, lambda tmp: self.write_reference(tmp, self.reference_split))

    # -- hooks of image datasets --
    def reference_key(self, split: str) -> dict:
        """Everything the reference folder of ``split`` depends on (its manifest records it)."""
        raise NotImplementedError

    def write_reference(self, folder: Path, split: str) -> None:
        """Write the images of ``split`` into ``folder`` as PNG files."""
        images = _to_uint8(self.images(split))
        labels = self.labels(split) if self.conditioning == "class" else None
        for i, img in enumerate(images):
            tag = f"_c{int(labels[i])}" if labels is not None else ""
            save_png(img, folder / f"{i:05d}{tag}.png")

    # -- shared checks --
    def _check_common(self) -> None:
        if self.reference_split not in SPLITS:
            raise ConfigError("dataset.reference_split", self.reference_split, "unknown split",
                              f"use one of {', '.join(SPLITS)}")
        if self.reference_stats and not Path(self.reference_stats).is_file():
            raise ConfigError("dataset.reference_stats", self.reference_stats, "no such file",
                              "give an existing .npz of reference statistics, or null to use "
                              "a reference image folder")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def _check_fraction(value: object, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(key, value, "must be a number in [0, 1)", f"pass {key}=0.2")


def _check_positive_int(value: object, key: str, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "must be a positive integer", f"pass {key}={example}")


def heldout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train, heldout)`` indices of ``n`` items: a fixed seeded permutation, the first
    ``round(n·fraction)`` held out (the same rule as :func:`lowbit.data.digits.split_indices`)."""
    from lowbit.data.digits import split_indices

    return split_indices(n, float(fraction), int(seed))


def _split_index(n: int, split: str, fraction: float, seed: int, key: str) -> Tensor:
    _check_split(split)
    if split == "all":
        return torch.arange(n)
    train, held = heldout_split(n, fraction, seed)
    idx = train if split == "train" else held
    if len(idx) == 0:
        raise ConfigError(key, fraction, f"the {split!r} split is empty",
                          "set dataset.heldout_fraction to a value in (0, 1), e.g. 0.2")
    return idx


# -- digits ----------------------------------------------------------------------------------------

class DigitsDataset(Dataset):
    """scikit-learn's bundled 1,797 handwritten digits, upsampled to ``resolution`` (``dataset=digits``)."""

    conditioning = "class"

    def __init__(self, name: str = "digits", num_classes: int = 10, resolution: int = 16,
                 heldout_fraction: float = 0.2, split_seed: int = 0, reference_split: str = "all",
                 reference_stats: str | None = None) -> None:
        self.name = name
        self._num_classes = num_classes
        self.resolution = resolution
        self.heldout_fraction = heldout_fraction
        self.split_seed = split_seed
        self.reference_split = reference_split
        self.reference_stats = reference_stats
        self._data: tuple[Tensor, Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def check(self) -> None:
        if self._num_classes != 10:
            raise ConfigError("dataset.num_classes", self._num_classes,
                              "the digits have 10 classes", "pass dataset.num_classes=10")
        _check_positive_int(self.resolution, "dataset.resolution", 16)
        _check_fraction(self.heldout_fraction, "dataset.heldout_fraction")
        if self.heldout_fraction == 0 and self.reference_split == "heldout":
            raise ConfigError("dataset.heldout_fraction", 0, "no held-out digits to measure "
                              "against", "set dataset.heldout_fraction=0.2")
        self._check_common()

    def _load(self) -> tuple[Tensor, Tensor]:
        if self._data is None:
            from lowbit.data.digits import load_digits_tensors

            self._data = load_digits_tensors(int(self.resolution))
        return self._data

    def _index(self, split: str) -> Tensor:
        n = len(self._load()[0])
        return _split_index(n, split, self.heldout_fraction, self.split_seed,
                            "dataset.heldout_fraction")

    def images(self, split: str = "train") -> Tensor:
        return self._load()[0][self._index(split)]

    def labels(self, split: str = "train") -> Tensor:
        return self._load()[1][self._index(split)]

    def reference_key(self, split: str) -> dict:
        key = {"dataset": "digits", "split": split, "resolution": int(self.resolution)}
        if split != "all":
            key.update(heldout_fraction=float(self.heldout_fraction), split_seed=int(self.split_seed))
        return key


# -- any folder of images -------------------------------------------------------------------------

def _read_caption_rows(path: Path, column: str | None, key: str) -> list[tuple[str, str]]:
    """``(file_name, caption)`` rows of a captions file (.csv/.tsv with a header, or .jsonl);
    the caption column is ``column`` or the first of ``caption``, ``prompt``, ``text``."""
    fix_file = (f"give {key} a .csv, .tsv or .jsonl file with a {FILE_COLUMN} column (the image's "
                f"path relative to dataset.path) and a caption column")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, str(path), f"cannot read it as UTF-8 text ({e})", fix_file) from e
    if path.suffix.lower() == ".jsonl":
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise ConfigError(key, str(path), f"not valid JSON lines ({e})", fix_file) from e
        if not all(isinstance(r, dict) for r in rows):
            raise ConfigError(key, str(path), "a line is not a JSON object", fix_file)
        header = list(dict.fromkeys(k for r in rows for k in r))
    else:
        try:
            reader = csv.DictReader(text.splitlines(),
                                    delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            header = list(reader.fieldnames or [])
            rows = list(reader)
        except csv.Error as e:
            raise ConfigError(key, str(path), f"not a valid table ({e})",
                              "fix the file's quoting or delimiter") from e
    lower = {h.strip().lower(): h for h in header}
    wanted = [column] if column else list(PROMPT_COLUMNS)
    col = next((lower[w.lower()] for w in wanted if w.lower() in lower), None)
    if FILE_COLUMN not in lower or col is None:
        missing = FILE_COLUMN if FILE_COLUMN not in lower else " / ".join(wanted)
        raise ConfigError("dataset.caption_column" if column and col is None else key,
                          column if column and col is None else str(path),
                          f"no {missing} column (columns: {', '.join(header) or 'none'})",
                          fix_file if FILE_COLUMN not in lower or not column else
                          "pass dataset.caption_column=<the caption column's name>")
    fcol = lower[FILE_COLUMN]
    return [(str(r.get(fcol) or "").strip(), str(r.get(col) or "").strip()) for r in rows]


class ImageFolderDataset(Dataset):
    """Every image under ``path`` (recursively), center-cropped to a square and resized to
    ``resolution`` (``dataset=image_folder``). With one subfolder per class
    (``class_subfolders: auto`` finds them when no image lies directly in ``path``), the sorted
    subfolder names are the classes 0 … K−1 and the dataset is class-conditional.

    With ``captions`` (a Hugging Face ``imagefolder`` metadata file: ``file_name`` relative to
    ``path`` and a ``caption``/``prompt``/``text`` column, as .csv, .tsv or .jsonl; a relative
    ``captions`` path is read from ``path``) every image carries its caption and the dataset is
    text-conditional: real-image training of a text-to-image model conditions on the captions,
    and sampling uses the captions of ``reference_split``."""

    def __init__(self, path: str | None = None, resolution: int = 64, name: str = "image_folder",
                 channels: int = 3, class_subfolders: bool | str = "auto",
                 heldout_fraction: float = 0.2, split_seed: int = 0, limit: int | None = None,
                 reference_split: str = "all", reference_stats: str | None = None,
                 captions: str | None = None, caption_column: str | None = None) -> None:
        self.path = path
        self.resolution = resolution
        self.name = name
        self.channels = channels
        self.class_subfolders = class_subfolders
        self.heldout_fraction = heldout_fraction
        self.split_seed = split_seed
        self.limit = limit
        self.reference_split = reference_split
        self.reference_stats = reference_stats
        self.captions_file = captions
        self.caption_column = caption_column
        self._files: list[Path] | None = None
        self._classes: list[str] = []
        self._captions: dict[str, str] | None = None

    # -- scanning --
    def _scan(self) -> list[Path]:
        if self._files is not None:
            return self._files
        if self.path in (None, ""):
            raise ConfigError("dataset.path", self.path, "no image folder given",
                              "pass dataset.path=<folder of images>")
        root = Path(str(self.path)).expanduser()
        if not root.exists():
            raise ConfigError("dataset.path", str(self.path), "no such folder",
                              "pass dataset.path=<an existing folder of images>")
        if not root.is_dir():
            raise ConfigError("dataset.path", str(self.path), "is a file, not a folder",
                              "pass dataset.path=<a folder of images>")
        files = image_files(root)
        if not files:
            raise ConfigError("dataset.path", str(self.path),
                              f"holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                              f"also in subfolders)", "pass dataset.path=<a folder of images>")
        nested = all(len(f.relative_to(root).parts) >= 2 for f in files)
        use_classes = nested if self.class_subfolders == "auto" else bool(self.class_subfolders)
        if self.captions_file not in (None, ""):
            if self.class_subfolders is True:
                raise ConfigError("dataset.class_subfolders", True, "a captioned folder is "
                                  "text-conditional, not one class per subfolder",
                                  "pass dataset.class_subfolders=auto (or false) with "
                                  "dataset.captions, or dataset.captions=null for classes")
            use_classes = False
        if use_classes and not nested:
            raise ConfigError("dataset.class_subfolders", self.class_subfolders,
                              f"images lie directly in {root}, not in one subfolder per class",
                              "move each class into its own subfolder, or pass "
                              "dataset.class_subfolders=false")
        if self.limit is not None and len(files) > self.limit:
            pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(
                int(self.split_seed)))[: int(self.limit)]
            files = [files[i] for i in sorted(pick.tolist())]
        self._classes = sorted({f.relative_to(root).parts[0] for f in files}) if use_classes else []
        self._files = files
        return files

    @property
    def conditioning(self) -> str:  # type: ignore[override]
        self._scan()
        if self.captions_file not in (None, ""):
            return "text"
        return "class" if self._classes else "none"

    @property
    def num_classes(self) -> int | None:
        self._scan()
        return len(self._classes) or None

    @property
    def classes(self) -> list[str]:
        self._scan()
        return list(self._classes)

    def check(self) -> None:
        _check_positive_int(self.resolution, "dataset.resolution", 64)
        if self.channels not in (1, 3):
            raise ConfigError("dataset.channels", self.channels, "must be 1 (grey) or 3 (RGB)",
                              "pass dataset.channels=3")
        if self.class_subfolders not in (True, False, "auto"):
            raise ConfigError("dataset.class_subfolders", self.class_subfolders,
                              "must be true, false or auto", "pass dataset.class_subfolders=auto")
        if self.limit is not None:
            _check_positive_int(self.limit, "dataset.limit", 1000)
        _check_fraction(self.heldout_fraction, "dataset.heldout_fraction")
        self._check_common()
        if self._files is None:
            for f in self._scan():  # a broken file fails here, not halfway through the metrics
                try:
                    with Image.open(f) as im:
                        im.verify()
                except (OSError, UnidentifiedImageError, SyntaxError) as e:
                    self._files = None
                    raise ConfigError("dataset.path", str(self.path),
                                      f"cannot read image {f} ({type(e).__name__}: {e})",
                                      "remove or replace the unreadable file") from e
        self._caption_map()  # read and checked once, then cached

    def _load_one(self, f: Path) -> Tensor:
        """One image as uint8 ``[C, R, R]``: center crop to a square, then resize (bicubic)."""
        try:
            with Image.open(f) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError("dataset.path", str(self.path), f"cannot read image {f} ({e})",
                              "remove or replace the unreadable file") from e
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        r = int(self.resolution)
        if s != r:
            im = im.resize((r, r), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
        arr = arr[..., None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def _index(self, split: str) -> Tensor:
        return _split_index(len(self._scan()), split, self.heldout_fraction, self.split_seed,
                            "dataset.heldout_fraction")

    # -- captions --
    def _caption_map(self) -> dict[str, str] | None:
        """``{path relative to the folder: caption}`` for every image (None without captions);
        read once and checked: every image has a non-empty caption, every row names an image."""
        if self.captions_file in (None, ""):
            return None
        if self._captions is not None:
            return self._captions
        files = self._scan()
        root = Path(str(self.path)).expanduser()
        path = Path(str(self.captions_file)).expanduser()
        path = path if path.is_absolute() else root / path
        fix = ("pass dataset.captions=<a .csv, .tsv or .jsonl file with file_name and caption "
               "columns> (a relative path is read from dataset.path)")
        if not path.is_file():
            raise ConfigError("dataset.captions", str(self.captions_file),
                              f"no such file ({path})" if not path.exists() else "is not a file",
                              fix)
        if path.suffix.lower() not in CAPTION_SUFFIXES:
            raise ConfigError("dataset.captions", str(self.captions_file),
                              f"unknown captions file type {path.suffix or '(none)'!r}", fix)
        captions: dict[str, str] = {}
        for name, caption in _read_caption_rows(path, self.caption_column, "dataset.captions"):
            rel = Path(name).as_posix().removeprefix("./")
            if rel in captions:
                raise ConfigError("dataset.captions", str(self.captions_file),
                                  f"{rel!r} is listed twice", "give each image one row")
            captions[rel] = caption
        present = {f.relative_to(root).as_posix() for f in image_files(root)}
        unknown = sorted(set(captions) - present)
        if unknown:
            raise ConfigError("dataset.captions", str(self.captions_file),
                              f"{len(unknown)} rows name no image in {root} (e.g. {unknown[0]!r})",
                              f"make {FILE_COLUMN} the image's path relative to dataset.path")
        names = [f.relative_to(root).as_posix() for f in files]
        bad = [n for n in names if not captions.get(n)]
        if bad:
            raise ConfigError("dataset.captions", str(self.captions_file),
                              f"{len(bad)} of the {len(names)} images have no caption (e.g. "
                              f"{bad[0]!r})", "give every image a non-empty caption")
        self._captions = {n: captions[n] for n in names}
        return self._captions

    def captions(self, split: str = "train") -> list[str]:
        self.check()
        captions = self._caption_map()
        if captions is None:
            return super().captions(split)
        names = list(captions)  # in the order of _scan()
        return [captions[names[i]] for i in self._index(split).tolist()]

    def conditions(self, n: int) -> Tensor | list[str] | None:
        if self.conditioning == "text":  # the captions of the images the samples are measured against
            captions = self.captions(self.reference_split)
            return [captions[i % len(captions)] for i in range(n)]
        return super().conditions(n)

    def images(self, split: str = "train") -> Tensor:
        self.check()
        files = self._scan()
        u8 = torch.stack([self._load_one(files[i]) for i in self._index(split).tolist()])
        return u8.float() / 127.5 - 1

    def labels(self, split: str = "train") -> Tensor:
        self.check()
        if not self._classes:
            return super().labels(split)
        root = Path(str(self.path)).expanduser()
        files = self._scan()
        cls = {c: i for i, c in enumerate(self._classes)}
        return torch.tensor([cls[files[i].relative_to(root).parts[0]]
                             for i in self._index(split).tolist()], dtype=torch.long)

    def reference_key(self, split: str) -> dict:
        root = Path(str(self.path)).expanduser().resolve()
        h = hashlib.sha256()
        for f in self._scan():  # the source's names, sizes and times: an edited folder rebuilds
            st = f.stat()
            h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        key = {"dataset": "image_folder", "path": str(root), "source": h.hexdigest(),
               "split": split, "resolution": int(self.resolution), "channels": int(self.channels),
               "classes": self._classes, "limit": self.limit}
        if split != "all":
            key.update(heldout_fraction=float(self.heldout_fraction), split_seed=int(self.split_seed))
        return key

    def write_reference(self, folder: Path, split: str) -> None:
        files = self._scan()  # one image at a time: a large folder never sits in memory
        labels = self.labels(split) if self._classes else None
        for j, i in enumerate(self._index(split).tolist()):
            tag = f"_c{int(labels[j])}" if labels is not None else ""
            save_png(self._load_one(files[i]), folder / f"{j:06d}{tag}.png")


# -- prompts ----------------------------------------------------------------------------------------

class PromptsDataset(Dataset):
    """Prompts from ``path``: a ``.txt`` file (one prompt per line, blank lines skipped) or a
    ``.csv``/``.tsv`` file with a header and a ``caption``, ``prompt`` or ``text`` column (or the
    one ``column`` names); the first ``limit`` prompts when set (``dataset=prompts``)."""

    conditioning = "text"

    def __init__(self, path: str | None = None, name: str = "prompts", limit: int | None = None,
                 column: str | None = None, reference_stats: str | None = None) -> None:
        self.path = path
        self.name = name
        self.limit = limit
        self.column = column
        self.reference_stats = reference_stats
        self._prompts: list[str] | None = None

    def check(self) -> None:
        if self.limit is not None:
            _check_positive_int(self.limit, "dataset.limit", 1000)
        self._check_common()
        self.prompts()

    def prompts(self) -> list[str]:
        if self._prompts is None:
            self._prompts = self._read()
        return list(self._prompts)

    def _read(self) -> list[str]:
        fix = "pass dataset.path=<a .txt (one prompt per line), .csv or .tsv file>"
        if self.path in (None, ""):
            raise ConfigError("dataset.path", self.path, "no prompt file given", fix)
        path = Path(str(self.path)).expanduser()
        if not path.is_file():
            raise ConfigError("dataset.path", str(self.path),
                              "no such file" if not path.exists() else "is not a file", fix)
        suffix = path.suffix.lower()
        if suffix not in (".txt", ".csv", ".tsv"):
            raise ConfigError("dataset.path", str(self.path), f"unknown prompt file type "
                              f"{suffix or '(none)'!r}", fix)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("dataset.path", str(self.path), f"cannot read it as UTF-8 text ({e})",
                              "save the file as UTF-8") from e
        if suffix == ".txt":
            prompts = [line.strip() for line in text.splitlines()]
        else:
            prompts = self._read_table(text, "\t" if suffix == ".tsv" else ",")
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ConfigError("dataset.path", str(self.path), "holds no prompts",
                              "write at least one prompt into the file")
        return prompts[: self.limit] if self.limit else prompts

    def _read_table(self, text: str, delimiter: str) -> list[str]:
        try:
            reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
            header = [h.strip() for h in (reader.fieldnames or [])]
            lower = {h.lower(): raw for h, raw in zip(header, reader.fieldnames or [], strict=True)}
            wanted = [self.column] if self.column else list(PROMPT_COLUMNS)
            col = next((lower[w.lower()] for w in wanted if w.lower() in lower), None)
            if col is None:
                key = "dataset.column" if self.column else "dataset.path"
                raise ConfigError(key, self.column or str(self.path),
                                  f"no {' / '.join(wanted)} column (columns: "
                                  f"{', '.join(header) or 'none'})",
                                  "give the file a header row naming the prompt column, or pass "
                                  "dataset.column=<its name>")
            return [(row.get(col) or "").strip() for row in reader]
        except csv.Error as e:
            raise ConfigError("dataset.path", str(self.path), f"not a valid table ({e})",
                              "fix the file's quoting or delimiter") from e

    def conditions(self, n: int) -> list[str]:
        prompts = self.prompts()
        return [prompts[i % len(prompts)] for i in range(n)]

    def reference(self, cache_dir: str | Path) -> Path:
        self.check()
        if self.reference_stats:
            return Path(self.reference_stats)
        raise ConfigError("dataset.reference_stats", None, "a prompt list has no reference images",
                          "pass dataset.reference_stats=<.npz of reference statistics>, or use "
                          "metrics that need no reference (e.g. metrics=fidelity)")


def build_dataset(dataset_cfg) -> Dataset:
    """The dataset of a ``dataset`` group config (``cfg.dataset``): ``instantiate`` with every key."""
    from hydra.utils import instantiate

    return instantiate(dataset_cfg)


__all__ = ["SPLITS", "Dataset", "DigitsDataset", "ImageFolderDataset", "PromptsDataset",
           "build_dataset", "cached_image_folder", "folder_matches_manifest", "heldout_split",
           "image_files"]
