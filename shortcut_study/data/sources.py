"""Source datasets: CIFAR-10 and MNIST as uint8 arrays, from any of three places.

* a torchvision root (CIFAR-10 python batches / MNIST idx files), fetched with torchvision's own
  checksums when `download=True`;
* a class-folder tree ``<split>/<class>/*.{png,jpg}`` (split train/test or training/testing);
* a ``.tar.gz`` of such a tree, read member by member without unpacking.
"""

from __future__ import annotations

import io
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import CIFAR_CLASSES
from ..errors import UserError

SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "testing": "test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class SourceSpec:
    """What one source dataset looks like: its name, class folder names, image size and mode."""

    name: str
    class_names: tuple[str, ...]
    size: int
    mode: str  # PIL mode of one image: RGB for CIFAR-10, L for MNIST


CIFAR = SourceSpec("CIFAR-10", CIFAR_CLASSES, 32, "RGB")
MNIST = SourceSpec("MNIST", tuple(str(d) for d in range(10)), 28, "L")


@dataclass
class SourceSplit:
    images: np.ndarray  # uint8, (N, H, W, 3) for RGB, (N, H, W) for L
    labels: np.ndarray  # int64 (N,)


def class_index(spec: SourceSpec, folder: str, where: str) -> int:
    """CIFAR folders may be named by class or by index 0-9; MNIST folders by digit."""
    if folder in spec.class_names:
        return spec.class_names.index(folder)
    if folder.isdigit() and int(folder) < len(spec.class_names):
        return int(folder)
    raise UserError(f"unknown {spec.name} class folder {folder!r} in {where}: "
                    f"expected one of {', '.join(spec.class_names)} (or 0-9)")


def _sort_key(name: str) -> tuple[int, int | str]:
    stem = PurePosixPath(name).stem
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def _decode(data: bytes, spec: SourceSpec, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.size != (spec.size, spec.size) or img.mode != spec.mode:
                raise UserError(f"{where}: a {img.size[0]}x{img.size[1]} {img.mode} image, but "
                                f"{spec.name} images are {spec.size}x{spec.size} {spec.mode}")
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"{where}: not a readable image ({exc}) — replace or remove the file") from None


def _stack(items: dict[str, dict[int, list[tuple[str, np.ndarray]]]], spec: SourceSpec,
           where: str) -> dict[str, SourceSplit]:
    splits = {}
    for split, by_class in items.items():
        missing = [spec.class_names[c] for c in range(len(spec.class_names)) if not by_class.get(c)]
        if missing:
            raise UserError(f"{where}: {split} split has no images for class(es) {', '.join(missing)} "
                            "— every class folder must hold images")
        images, labels = [], []
        for c in sorted(by_class):
            for _, arr in sorted(by_class[c], key=lambda t: _sort_key(t[0])):
                images.append(arr)
                labels.append(c)
        splits[split] = SourceSplit(np.stack(images), np.asarray(labels, dtype=np.int64))
    for split in ("train", "test"):
        if split not in splits:
            raise UserError(f"{where}: no {split} split found — expected {split}/<class>/*.png folders")
    return splits


def _member_parts(name: str) -> tuple[str, str, str] | None:
    """(split, class, file) when `name` ends in <split>/<class>/<file.png|jpg>."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    split = SPLIT_ALIASES.get(parts[-3].lower())
    return (split, parts[-2], parts[-1]) if split else None


def read_archive(path: Path, spec: SourceSpec) -> dict[str, SourceSplit]:
    items: dict[str, dict[int, list]] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = _member_parts(member.name) if member.isfile() else None
                if parts is None:
                    continue
                split, folder, fname = parts
                where = f"{path}:{member.name}"
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj else b""
                items.setdefault(split, {}).setdefault(class_index(spec, folder, where), []).append(
                    (fname, _decode(data, spec, where)))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise UserError(f"archive {path} is truncated or corrupt ({exc}) — fetch it again") from None
    if not items:
        raise UserError(f"archive {path} holds no <split>/<class>/*.png|jpg images for {spec.name}")
    return _stack(items, spec, str(path))


def _find_tree_root(root: Path) -> Path | None:
    for cand in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if any((cand / s).is_dir() for s in SPLIT_ALIASES):
            return cand
    return None


def read_tree(root: Path, spec: SourceSpec) -> dict[str, SourceSplit]:
    base = _find_tree_root(root)
    if base is None:
        raise UserError(f"{root} is neither a torchvision root nor a class-folder tree "
                        "(<split>/<class>/*.png) for " + spec.name)
    items: dict[str, dict[int, list]] = {}
    for split_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        split = SPLIT_ALIASES.get(split_dir.name.lower())
        if split is None:
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            c = class_index(spec, class_dir.name, str(class_dir))
            files = [f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
            items.setdefault(split, {}).setdefault(c, []).extend(
                (f.name, _decode(f.read_bytes(), spec, str(f))) for f in files)
    return _stack(items, spec, str(root))


def read_torchvision(root: Path, spec: SourceSpec, download: bool) -> dict[str, SourceSplit]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if spec is CIFAR else datasets.MNIST
    splits = {}
    for split in ("train", "test"):
        try:
            ds = cls(str(root), train=(split == "train"), download=download)
        except RuntimeError as exc:
            if download:
                raise UserError(f"{spec.name} download into {root} failed its integrity check ({exc}) — "
                                "delete that folder and retry, or use a local source") from None
            raise UserError(f"{spec.name} at {root}: {exc} — pass --download (online) or point "
                            "to a class-folder tree or .tar.gz") from None
        except OSError as exc:  # no network, refused connection, ...
            raise UserError(f"{spec.name} download into {root} failed ({exc}) — go online or point "
                            "to a local class-folder tree or .tar.gz") from None
        images = np.asarray(ds.data, dtype=np.uint8)
        splits[split] = SourceSplit(images, np.asarray(ds.targets, dtype=np.int64))
    return splits


def _is_torchvision_root(root: Path, spec: SourceSpec) -> bool:
    if spec is CIFAR:
        return (root / "cifar-10-batches-py").is_dir()
    return (root / "MNIST" / "raw").is_dir()


def load_source(src: str | Path, spec: SourceSpec, download: bool = False) -> dict[str, SourceSplit]:
    """Train and test splits of CIFAR-10 or MNIST from `src` (see module docstring)."""
    path = Path(src)
    if path.is_file():
        if re.search(r"\.(tar\.gz|tgz|tar)$", path.name):
            return read_archive(path, spec)
        raise UserError(f"{spec.name} source {path} is a file but not a .tar.gz archive")
    if path.is_dir() and not download:
        if _is_torchvision_root(path, spec):
            return read_torchvision(path, spec, download=False)
        return read_tree(path, spec)
    if download:
        path.mkdir(parents=True, exist_ok=True)
        return read_torchvision(path, spec, download=True)
    raise UserError(f"{spec.name} source not found: {path} — give a torchvision root, a class-folder "
                    "tree or a .tar.gz, or add --download to fetch it")
