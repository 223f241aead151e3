"""Reading a dataset in the course layout, ours or the course's own, into uint8 tensors.

Layout: ``train/<class>/*.png``, ``val/<class>/*.png``, ``test_unlabeled/*.png`` (or ``test/``),
class folders named by CIFAR class or by index 0-9. Optional ``metadata.csv`` (written by
``data build`` or ``data annotate``) adds each image's digit; optional ``test_labels.csv`` adds
test labels. The decoded images are cached under ``cache/`` as .npy so a split loads in seconds.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from ..config import CIFAR_CLASSES, FROM_DATASET, Config
from ..errors import UserError, atomic_path, read_json, require_dir
from .sources import CIFAR, class_index

SPLITS = ("train", "val", "test")
TEST_DIRS = ("test_unlabeled", "test")
METADATA = "metadata.csv"
# The training split's channel statistics, as `data build` measured them (`geometry.norm_* = dataset`).
NORMALIZATION = "normalization.json"
TEST_LABELS = "test_labels.csv"
CACHE_DIR = "cache"


@dataclass
class SplitData:
    """One split held as tensors: images uint8 (N, 3, H, W); labels and digits int64, -1 = unknown."""

    images: torch.Tensor
    labels: torch.Tensor
    digits: torch.Tensor
    files: list[str]  # paths relative to the dataset root, e.g. "val/cat/00012.png"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all()) and len(self) > 0

    @property
    def has_digits(self) -> bool:
        return bool((self.digits >= 0).all()) and len(self) > 0

    def take(self, index: torch.Tensor) -> SplitData:
        """The images at `index` (a tensor of positions), in that order."""
        cpu = index.cpu()
        return SplitData(self.images[index.to(self.images.device)], self.labels[index.to(self.labels.device)],
                         self.digits[index.to(self.digits.device)], [self.files[i] for i in cpu.tolist()])

    def to(self, device: torch.device) -> SplitData:
        return SplitData(self.images.to(device), self.labels.to(device), self.digits.to(device), self.files)


def split_dir(root: Path, split: str) -> Path:
    if split == "test":
        for name in TEST_DIRS:
            if (root / name).is_dir():
                return root / name
        raise UserError(f"no test folder in {root}: expected test_unlabeled/ (or test/)")
    return require_dir(root / split, f"{split} folder", f"build the dataset or check --data {root}")


def list_split_files(root: Path, split: str) -> list[tuple[str, int]]:
    """(relative path, label or -1) for every PNG of a split, in a stable order."""
    base = split_dir(root, split)
    if split == "test":
        files = sorted(p.name for p in base.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise UserError(f"{base} holds no .png images")
        return [(f"{base.name}/{f}", -1) for f in files]
    out = []
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not class_dirs:
        raise UserError(f"{base} has no class folders: expected {split}/<class>/*.png")
    for class_dir in class_dirs:
        label = class_index(CIFAR, class_dir.name, str(class_dir))
        files = sorted(p.name for p in class_dir.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise UserError(f"empty class folder {class_dir}: add its images or remove the folder")
        out.extend((f"{split}/{class_dir.name}/{f}", label) for f in files)
    return out


def read_image(path: Path, size: int | None) -> np.ndarray:
    """One composite as uint8 (H, W, 3); a clear error for a wrong size, mode or corrupt file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                raise UserError(f"{path}: a {img.mode} image, expected RGB — convert it to RGB")
            if size is not None and img.size != (size, size):
                raise UserError(f"{path}: {img.size[0]}x{img.size[1]} image, expected {size}x{size} "
                                "(set geometry.canvas for another size)")
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"{path}: not a readable PNG ({exc}) — replace or remove it") from None


def read_images(root: Path, rel_paths: list[str], size: int | None) -> np.ndarray:
    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(pool.map(lambda r: read_image(root / r, size), rel_paths, chunksize=256))
    if not arrays:
        return np.zeros((0, 3, size or 0, size or 0), dtype=np.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images in {root} differ in size ({sorted(shapes)[:2]}…): use one size")
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def _fingerprint(root: Path, entries: list[tuple[str, int]]) -> tuple[str, int]:
    """A hash of names, labels and sizes (the same for the same build), and the newest PNG's
    modification time: a PNG rewritten in place after the cache was made makes the cache stale."""
    h, newest = hashlib.sha256(), 0
    for rel, label in entries:
        st = (root / rel).stat()
        newest = max(newest, st.st_mtime_ns)
        h.update(f"{rel}\0{label}\0{st.st_size}\n".encode())
    return h.hexdigest(), newest


def cache_paths(root: Path, split: str) -> tuple[Path, Path]:
    return root / CACHE_DIR / f"{split}.npy", root / CACHE_DIR / f"{split}.json"


def write_cache(root: Path, split: str, images: np.ndarray, entries: list[tuple[str, int]]) -> None:
    npy, meta = cache_paths(root, split)
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, images)
    info = {"fingerprint": _fingerprint(root, entries)[0], "shape": list(images.shape)}
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps(info, sort_keys=True) + "\n")


def _read_cache(root: Path, split: str, entries: list[tuple[str, int]]) -> np.ndarray | None:
    npy, meta = cache_paths(root, split)
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = read_json(meta, "cache index", "")
        digest, newest = _fingerprint(root, entries)
        if info.get("fingerprint") != digest or newest > npy.stat().st_mtime_ns:
            return None
        images = np.load(npy, mmap_mode=None)
        return images if list(images.shape) == info.get("shape") else None
    except (UserError, ValueError, OSError, KeyError):
        return None  # a stale or damaged cache is rebuilt, never trusted


def read_table(path: Path, columns: dict[str, int], fix: str) -> pd.DataFrame:
    """A CSV with string `file` and integer columns in 0..`columns[name]`-1, one row per file:
    a one-line error naming the file, the row and the fix for anything else."""
    try:
        df = pd.read_csv(path, usecols=["file", *columns], dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or ["unreadable"])[0][:150]
        raise UserError(f"{path} is malformed ({first}) — {fix}") from None
    for name, bound in columns.items():
        text = df[name].str.strip()
        ok = text.str.fullmatch(r"\d+")
        values = pd.to_numeric(text.where(ok), errors="coerce")
        bad = ~ok | (values >= bound)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: row {row + 2} has {name} {df[name].iloc[row]!r}, not an integer in "
                            f"0..{bound - 1} — {fix}")
        df[name] = values.astype(np.int64)
    dup = df["file"].duplicated()
    if dup.any():
        raise UserError(f"{path}: {df['file'][dup].iloc[0]} is listed twice — one row per image; {fix}")
    return df


def read_digits(root: Path, rel_paths: list[str]) -> np.ndarray:
    meta = root / METADATA
    if not meta.is_file():
        return np.full(len(rel_paths), -1, dtype=np.int64)
    df = read_table(meta, {"digit": 10}, f"rebuild it with `shortcut-study data annotate {root} --force`")
    digit_of = dict(zip(df["file"], df["digit"]))
    return np.asarray([digit_of.get(r, -1) for r in rel_paths], dtype=np.int64)


def _labels_and_digits(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A labelled split's labels and digits from the file list and `metadata.csv` (no images read);
    None where a digit is unknown."""
    root = Path(data_dir)
    entries = list_split_files(root, split)
    digits = read_digits(root, [r for r, _ in entries])
    labels = np.asarray([lab for _, lab in entries], dtype=np.int64)
    if not len(digits) or (digits < 0).any() or (labels < 0).any():
        return None
    return labels, digits


def split_agreement(data_dir: str | Path, split: str = "train") -> float:
    """Fraction of a split's images whose digit equals the label, from `metadata.csv` (the digits
    the builder drew or the oracle read); NaN where the digits are unknown."""
    known = _labels_and_digits(data_dir, split)
    return float((known[0] == known[1]).mean()) if known else float("nan")


def cell_counts(data_dir: str | Path, split: str = "train") -> np.ndarray | None:
    """(10, 10) images of each (class, digit) cell of a split; None where digits are unknown."""
    known = _labels_and_digits(data_dir, split)
    if known is None:
        return None
    return np.bincount(known[0] * 10 + known[1], minlength=100).reshape(10, 10)


def read_test_labels(root: Path, rel_paths: list[str]) -> np.ndarray:
    path = root / TEST_LABELS
    if not path.is_file():
        return np.full(len(rel_paths), -1, dtype=np.int64)
    df = read_table(path, {"label": 10}, "fix it or rebuild the dataset")
    label_of = dict(zip(df["file"], df["label"]))
    return np.asarray([label_of.get(Path(r).name, -1) for r in rel_paths], dtype=np.int64)


def load_split(data_dir: str | Path, split: str, size: int | None = 40) -> SplitData:
    """Load `split` (train, val or test) of a course-layout dataset, using the cache when fresh."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {SPLITS}")
    root = require_dir(data_dir, "dataset folder", "build it with `shortcut-study data build` or pass --data")
    entries = list_split_files(root, split)
    rel_paths = [r for r, _ in entries]
    images = _read_cache(root, split, entries)
    if images is None:
        images = read_images(root, rel_paths, size)
        try:
            write_cache(root, split, images, entries)
        except (OSError, UserError):
            pass  # a read-only (or full) dataset folder still works, only slower next time
    elif size is not None and images.shape[-1] != size:
        side = images.shape[-1]
        raise UserError(f"{root}/{split}: {side}x{side} images, expected {size}x{size} "
                        "(set geometry.canvas for another size)")
    labels = np.asarray([lab for _, lab in entries], dtype=np.int64)
    if split == "test":
        labels = read_test_labels(root, rel_paths)
    return SplitData(torch.from_numpy(images), torch.from_numpy(labels),
                     torch.from_numpy(read_digits(root, rel_paths)), rel_paths)


def class_name(label: int) -> str:
    return CIFAR_CLASSES[label]


def write_normalization(root: Path, mean: np.ndarray, std: np.ndarray, images: int) -> None:
    """Record the training split's per-channel mean and std (of x / 255) with the dataset."""
    text = json.dumps({"split": "train", "images": images, "mean": [round(float(v), 4) for v in mean],
                       "std": [round(float(v), 4) for v in std]}, indent=2) + "\n"
    (Path(root) / NORMALIZATION).write_text(text)


def with_recorded_normalization(cfg: Config, data_dir: str | Path) -> Config:
    """`cfg` with `geometry.norm_mean` / `norm_std` = `dataset` replaced by the numbers the dataset
    recorded, so the run's saved config holds the statistics it trained with."""
    import dataclasses

    g = cfg.geometry
    if FROM_DATASET not in (g.norm_mean, g.norm_std):
        return cfg
    path = Path(data_dir) / NORMALIZATION
    if not path.is_file():
        raise UserError(f"geometry.norm_mean/norm_std={FROM_DATASET} but {path} is missing (a dataset built before it was "
                        "recorded, or not by `data build`): rebuild the dataset or give the numbers, e.g. "
                        "--set geometry.norm_mean=0.44,0.43,0.42")
    stats = read_json(path, "normalization statistics", "rebuild the dataset")
    try:
        mean, std = (",".join(str(float(v)) for v in stats[k]) for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} does not hold mean and std lists: rebuild the dataset") from None
    geometry = dataclasses.replace(g, norm_mean=mean if g.norm_mean == FROM_DATASET else g.norm_mean,
                                   norm_std=std if g.norm_std == FROM_DATASET else g.norm_std)
    return dataclasses.replace(cfg, geometry=geometry)
