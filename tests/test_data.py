"""The composite dataset: building from every kind of source, the layout, and bad input."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from shortcut_study.cli import main
from shortcut_study.config import NORM_MEAN, BuildConfig, GeometryConfig
from shortcut_study.data import load_split
from shortcut_study.data.composite import build_dataset, channel_stats, draw_digits
from shortcut_study.errors import UserError

from .conftest import TINY_BUILD, make_cifar_tree, make_mnist_tree

TINY = BuildConfig(train_size=120, val_size=40, test_size=30)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_build_writes_course_layout(dataset):
    assert {p.name for p in dataset.iterdir()} >= {"train", "val", "test_unlabeled", "metadata.csv", "test_labels.csv", "cache"}
    assert sorted(p.name for p in (dataset / "train").iterdir()) == sorted(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    tests = sorted(p.name for p in (dataset / "test_unlabeled").iterdir())
    assert len(tests) == 30 and "img_0.png" in tests and "img_29.png" in tests
    img = Image.open(next((dataset / "val" / "cat").iterdir()))
    assert img.size == (40, 40) and img.mode == "RGB"
    meta = pd.read_csv(dataset / "metadata.csv")
    assert meta.groupby("split").size().to_dict() == {"train": 120, "val": 40, "test": 30}
    assert (meta["aligned"] == (meta["label"] == meta["digit"]).astype(int)).all()


def test_composite_geometry_and_gray(dataset):
    train = load_split(dataset, "train")
    x = train.images
    assert x.shape == (120, 3, 40, 40) and x.dtype == torch.uint8
    assert (x[:, :, 0:24, 24:40] == 127).all() and (x[:, :, 24:40, 0:24] == 127).all()
    digit = x[:, :, 24:40, 24:40]
    assert (digit[:, 0] == digit[:, 1]).all() and (digit[:, 1] == digit[:, 2]).all()  # gray digit on 3 channels


def test_channel_mean_matches_handout(dataset):
    mean, _ = channel_stats(load_split(dataset, "train").images.numpy())
    assert np.allclose(mean, NORM_MEAN, atol=0.01), mean


def test_same_seed_is_byte_identical_and_archive_equals_tree(sources, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_dataset(sources["cifar"], sources["mnist"], a, TINY, GeometryConfig(), quiet=True)
    build_dataset(sources["cifar_tgz"], sources["mnist_tgz"], b, TINY, GeometryConfig(), quiet=True)
    assert _tree_digest(a) == _tree_digest(b)
    c = tmp_path / "c"
    build_dataset(sources["cifar"], sources["mnist"], c, BuildConfig(**{**TINY.__dict__, "seed": 1}),
                  GeometryConfig(), quiet=True)
    assert _tree_digest(a) != _tree_digest(c)


def test_agreement_rate_is_the_knob():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200_000)
    for agreement in (0.1, 0.64, 0.9, 1.0):
        assert abs(np.mean(draw_digits(labels, agreement, rng) == labels) - agreement) < 0.01


def test_geometry_is_configuration(sources, tmp_path):
    out = tmp_path / "big"
    assert main(["data", "build", "--cifar", str(sources["cifar"]), "--mnist", str(sources["mnist"]),
                 "--out", str(out), *TINY_BUILD, "--set", "geometry.canvas=64", "--set", "geometry.cifar_size=32",
                 "--set", "geometry.digit_size=28", "--set", "geometry.digit_top=36",
                 "--set", "geometry.digit_left=36"]) == 0
    assert Image.open(out / "test_unlabeled" / "img_0.png").size == (64, 64)
    assert load_split(out, "val", size=64).images.shape[-1] == 64
    with pytest.raises(UserError, match="expected 40x40"):
        load_split(out, "val", size=40)


def test_cache_is_used_and_refreshed(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    first = load_split(copy, "val")
    victim = copy / first.files[0]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(victim)  # changes the file size
    again = load_split(copy, "val")
    assert again.images[0].sum() == 0 and not torch.equal(first.images[0], again.images[0])


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_bad_sources_give_one_line_errors(sources, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["data", "build", "--cifar", str(tmp_path / "nope"), "--mnist", str(sources["mnist"]), "--out", out]) == 2
    err = _err(capsys)
    assert "not found" in err and "--download" in err and len(err.splitlines()) == 1

    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(sources["cifar_tgz"].read_bytes()[:3000])
    assert main(["data", "build", "--cifar", str(truncated), "--mnist", str(sources["mnist"]), "--out", out]) == 2
    assert "truncated or corrupt" in _err(capsys)

    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tarball at all")
    assert main(["data", "build", "--cifar", str(garbage), "--mnist", str(sources["mnist"]), "--out", out]) == 2
    assert "corrupt" in _err(capsys)
    assert not Path(out).exists()


@pytest.mark.parametrize("damage, message", [
    ("wrong_size", "32x32 RGB"), ("unknown_class", "unknown CIFAR-10 class folder"),
    ("empty_class", "no images for class"), ("corrupt_image", "not a readable image"),
])
def test_bad_source_images(tmp_path, capsys, damage, message):
    cifar = make_cifar_tree(tmp_path / "cifar", per_class=3, per_class_test=2)
    mnist = make_mnist_tree(tmp_path / "mnist", per_class=2, per_class_test=2)
    target = cifar / "train" / "cat"
    if damage == "wrong_size":
        Image.new("RGB", (31, 32)).save(target / "0000.png")
    elif damage == "unknown_class":
        (cifar / "train" / "zebra").mkdir()
    elif damage == "empty_class":
        shutil.rmtree(target)
        target.mkdir()
    else:
        (target / "0000.png").write_bytes(b"\x89PNG garbage")
    assert main(["data", "build", "--cifar", str(cifar), "--mnist", str(mnist), "--out", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert message in err and len(err.splitlines()) == 1


def test_bad_layout_inputs(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("cache"))
    for p in (copy / "val" / "dog").iterdir():
        p.unlink()
    with pytest.raises(UserError, match="empty class folder"):
        load_split(copy, "val")
    with pytest.raises(UserError, match="dataset folder not found"):
        load_split(tmp_path / "missing", "train")
    Image.new("L", (40, 40)).save(copy / "test_unlabeled" / "img_0.png")
    with pytest.raises(UserError, match="expected RGB"):
        load_split(copy, "test")


def test_out_must_be_a_dataset_or_new(sources, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    assert main(["data", "build", "--cifar", str(sources["cifar"]), "--mnist", str(sources["mnist"]),
                 "--out", str(precious), *TINY_BUILD]) == 2
    assert "not a shortcut-study dataset" in _err(capsys)
    assert (precious / "thesis.tex").exists()


def test_course_folder_with_index_names_and_test_dir(dataset, tmp_path):
    """The course's own data: class folders named 0-9, a `test` folder, no metadata."""
    course = tmp_path / "custom_image_dataset"
    for split in ("train", "val"):
        for i, d in enumerate(sorted((dataset / split).iterdir())):
            shutil.copytree(d, course / split / str(i))
    shutil.copytree(dataset / "test_unlabeled", course / "test")
    val = load_split(course, "val")
    ours = load_split(dataset, "val")
    assert torch.equal(torch.sort(val.labels).values, torch.sort(ours.labels).values)
    assert not val.has_digits and (load_split(course, "test").labels == -1).all()
