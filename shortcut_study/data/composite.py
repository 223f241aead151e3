"""The composite builder: CIFAR-10 image + MNIST digit on a gray canvas, written in the course layout.

Recipe (the course's geometry by default, see `GeometryConfig`): canvas filled with gray, the CIFAR
image resized (bilinear, antialiased) into its patch, the MNIST digit resized the same way, white on
black, copied to all three channels, into its patch. In train a digit equal to the label is drawn
with probability p = (agreement - 0.1) / 0.9, else a uniform digit, so the expected agreement is
`build.train_agreement`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from ..config import CIFAR_CLASSES, NORM_MEAN, NORM_STD, BuildConfig, GeometryConfig
from ..errors import UserError, require_writable, write_error
from ..outputs import replace_folder
from .layout import METADATA, NORMALIZATION, TEST_LABELS, write_cache, write_normalization
from .sources import CIFAR, MNIST, SourceSplit, load_source

METADATA_COLUMNS = ["split", "file", "label", "digit", "aligned", "cifar_index", "mnist_index"]


def _resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-1] == size:
        return batch
    from torchvision.transforms.v2 import functional as TF  # here: seconds of imports, for building only

    return TF.resize(batch, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def compose(cifar: np.ndarray, digits: np.ndarray, geom: GeometryConfig, chunk: int = 4096) -> np.ndarray:
    """uint8 composites (N, 3, canvas, canvas) from CIFAR images (N, 32, 32, 3) and MNIST digits (N, 28, 28)."""
    n = len(cifar)
    out = np.full((n, 3, geom.canvas, geom.canvas), geom.gray, dtype=np.uint8)
    cy, cx = geom.cifar_box
    dy, dx = geom.digit_box
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        c = _resize(torch.from_numpy(cifar[sl]).permute(0, 3, 1, 2).contiguous(), geom.cifar_size)
        d = _resize(torch.from_numpy(digits[sl])[:, None].contiguous(), geom.digit_size)
        out[sl, :, cy, cx] = c.numpy()
        out[sl, :, dy, dx] = d.expand(-1, 3, -1, -1).numpy()  # later patch wins where they overlap
    return out


def draw_digits(labels: np.ndarray, agreement: float, rng: np.random.Generator) -> np.ndarray:
    """Digit classes: equal to the label with probability (agreement-0.1)/0.9, else uniform."""
    p_equal = (agreement - 0.1) / 0.9
    equal = rng.random(len(labels)) < p_equal
    return np.where(equal, labels, rng.integers(0, 10, len(labels))).astype(np.int64)


def pick_mnist(digit_classes: np.ndarray, mnist_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An MNIST index of the wanted class for each composite, cycling through a shuffled pool."""
    out = np.empty(len(digit_classes), dtype=np.int64)
    for d in range(10):
        want = np.flatnonzero(digit_classes == d)
        pool = rng.permutation(np.flatnonzero(mnist_labels == d))
        if len(want) and not len(pool):
            raise UserError(f"MNIST source has no images of digit {d}")
        out[want] = np.resize(pool, len(want))
    return out


@dataclass
class BuiltSplit:
    name: str
    images: np.ndarray  # (N, 3, H, W) uint8
    labels: np.ndarray
    digits: np.ndarray
    cifar_index: np.ndarray
    mnist_index: np.ndarray
    files: list[str]


def _split_indices(cifar: dict[str, SourceSplit], build: BuildConfig) -> dict[str, np.ndarray]:
    train_labels = cifar["train"].labels
    n_train, n_test = len(train_labels), len(cifar["test"].labels)
    if build.train_size + build.val_size > n_train:
        raise UserError(f"build.train_size + build.val_size = {build.train_size + build.val_size} "
                        f"exceeds the {n_train} CIFAR-10 training images — lower them")
    if build.test_size > n_test:
        raise UserError(f"build.test_size={build.test_size} exceeds the {n_test} CIFAR-10 test images")
    try:
        from sklearn.model_selection import train_test_split

        train_idx, val_idx = train_test_split(
            np.arange(n_train), train_size=build.train_size, test_size=build.val_size,
            stratify=train_labels, random_state=build.seed)
    except ValueError as exc:
        raise UserError(f"cannot split {n_train} CIFAR images stratified into "
                        f"{build.train_size}/{build.val_size}: {exc}") from None
    rng = np.random.default_rng([build.seed, 3])
    test_idx = rng.permutation(n_test)[: build.test_size]
    return {"train": np.sort(train_idx), "val": np.sort(val_idx), "test": test_idx}


def build_splits(cifar: dict[str, SourceSplit], mnist: dict[str, SourceSplit], build: BuildConfig,
                 geom: GeometryConfig) -> list[BuiltSplit]:
    out = []
    for k, (name, idx) in enumerate(_split_indices(cifar, build).items()):
        source = "test" if name == "test" else "train"
        rng = np.random.default_rng([build.seed, k])
        labels = cifar[source].labels[idx]
        agreement = build.train_agreement if name == "train" else build.eval_agreement
        digits = draw_digits(labels, agreement, rng)
        mnist_idx = pick_mnist(digits, mnist[source].labels, rng)
        images = compose(cifar[source].images[idx], mnist[source].images[mnist_idx], geom)
        if name == "test":
            files = [f"test_unlabeled/img_{i}.png" for i in range(len(idx))]
        else:
            files = [f"{name}/{CIFAR_CLASSES[lab]}/{i:05d}.png" for i, lab in enumerate(labels)]
        out.append(BuiltSplit(name, images, labels, digits, idx, mnist_idx, files))
    return out


def _write_pngs(root: Path, split: BuiltSplit, progress: tqdm) -> None:
    for d in {str(Path(f).parent) for f in split.files}:
        (root / d).mkdir(parents=True, exist_ok=True)

    def save(i: int) -> None:
        Image.fromarray(split.images[i].transpose(1, 2, 0)).save(root / split.files[i], optimize=False)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(save, range(len(split.files)), chunksize=256):
            progress.update(1)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(images).float().div_(255)
    return x.mean(dim=(0, 2, 3)).numpy(), x.std(dim=(0, 2, 3)).numpy()


def summary_table(splits: list[BuiltSplit], stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    rows = ["split   images  agreement  mean (R,G,B)           std (R,G,B)"]
    for s in splits:
        mean, std = stats[s.name]
        rows.append(f"{s.name:<6} {len(s.labels):>7}  {np.mean(s.digits == s.labels):>8.1%}  "
                    f"{mean[0]:.3f} {mean[1]:.3f} {mean[2]:.3f}    {std[0]:.3f} {std[1]:.3f} {std[2]:.3f}")
    m, sd = NORM_MEAN, NORM_STD
    rows.append(f"handout constants               {m[0]:.3f} {m[1]:.3f} {m[2]:.3f}    "
                f"{sd[0]:.3f} {sd[1]:.3f} {sd[2]:.3f}   (geometry.norm_*; `dataset` uses train's, "
                f"recorded in {NORMALIZATION})")
    return "\n".join(rows)


def _looks_built(path: Path) -> bool:
    meta = path / METADATA
    return meta.is_file() and meta.open().readline().strip() == ",".join(METADATA_COLUMNS)


def _write_dataset(root: Path, splits: list, stats: dict[str, tuple[np.ndarray, np.ndarray]], quiet: bool) -> None:
    """Every file of a dataset into the (empty) folder `root`."""
    total = sum(len(s.files) for s in splits)
    with tqdm(total=total, desc="writing composites", unit="img", disable=quiet) as progress:
        for s in splits:
            _write_pngs(root, s, progress)
    rows = []
    for s in splits:
        rows.append(pd.DataFrame({
            "split": s.name, "file": s.files, "label": s.labels, "digit": s.digits,
            "aligned": (s.labels == s.digits).astype(int), "cifar_index": s.cifar_index,
            "mnist_index": s.mnist_index}))
    meta = pd.concat(rows, ignore_index=True)[METADATA_COLUMNS]
    meta.to_csv(root / METADATA, index=False, lineterminator="\n")
    test = meta[meta["split"] == "test"]
    pd.DataFrame({"file": test["file"].map(lambda f: Path(f).name), "label": test["label"],
                  "digit": test["digit"], "aligned": test["aligned"]}).to_csv(
        root / TEST_LABELS, index=False, lineterminator="\n")
    for s in splits:
        labels = s.labels if s.name != "test" else np.full(len(s.labels), -1)
        write_cache(root, s.name, s.images, list(zip(s.files, labels.tolist())))
        if s.name == "train":
            write_normalization(root, *stats["train"], images=len(s.labels))


def build_dataset(cifar_src: str | Path, mnist_src: str | Path, out: str | Path, build: BuildConfig,
                  geom: GeometryConfig, download: bool = False, quiet: bool = False) -> str:
    """Build the composite dataset into `out` (atomically) and return the summary table."""
    build.validate()
    geom.validate()
    out = require_writable(out, "folder")
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link: a dataset is never written through one — remove it or give "
                        "another --out")
    if out.exists() and not _looks_built(out):
        raise UserError(f"{out} exists and is not a shortcut-study dataset — choose another --out")
    cifar = load_source(cifar_src, CIFAR, download)
    mnist = load_source(mnist_src, MNIST, download)
    splits = build_splits(cifar, mnist, build, geom)
    # Measured once per split: the summary prints them, and train's are recorded with the dataset.
    stats = {s.name: channel_stats(s.images) for s in splits}

    # Staged whole beside `out` and swapped in (outputs.replace_folder): a Ctrl-C or a full disk leaves
    # the old dataset or the new one, never neither and never a mixture; no path is followed.
    try:
        with replace_folder(out) as partial:
            _write_dataset(partial, splits, stats, quiet)
    except OSError as exc:
        raise write_error(out, exc) from None
    return summary_table(splits, stats)
