"""The real download path (torchvision's CIFAR10 / MNIST with checksums), on small archives the test
makes and serves over HTTP on 127.0.0.1 with their true MD5s."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from torchvision import datasets

from shortcut_study.cli import main
from shortcut_study.data import load_split

from .conftest import TINY_BUILD


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_cifar(server: Path, base: str, rng) -> dict:
    files = {}
    for name, n in [*[(f"data_batch_{i}", 32) for i in range(1, 6)], ("test_batch", 40)]:
        labels = np.arange(n) % 10
        files[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": labels.tolist()}
    files["batches.meta"] = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                             "horse", "ship", "truck"]}
    tgz = server / "cifar-10-python.tar.gz"
    md5s = {}
    with tarfile.open(tgz, "w:gz") as tar:
        for name, obj in files.items():
            blob = pickle.dumps(obj)
            md5s[name] = hashlib.md5(blob).hexdigest()
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {"url": f"{base}/{tgz.name}", "tgz_md5": _md5(tgz),
            "train_list": [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)],
            "test_list": [["test_batch", md5s["test_batch"]]],
            "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5s["batches.meta"]}}


def fake_mnist(server: Path, base: str, rng) -> dict:
    resources = []
    for prefix, n in (("train", 100), ("t10k", 40)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, payload in (("images-idx3-ubyte", struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()),
                              ("labels-idx1-ubyte", struct.pack(">II", 2049, n) + labels.tobytes())):
            path = server / f"{prefix}-{kind}.gz"
            path.write_bytes(gzip.compress(payload, mtime=0))
            resources.append((path.name, _md5(path)))
    return {"mirrors": [base + "/"], "resources": resources}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_servers(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "server"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    for attr, value in fake_cifar(root, base, rng).items():
        monkeypatch.setattr(datasets.CIFAR10, attr, value)
    for attr, value in fake_mnist(root, base, rng).items():
        monkeypatch.setattr(datasets.MNIST, attr, value)
    yield base
    httpd.shutdown()
    httpd.server_close()


def test_download_then_offline_rebuild(fake_servers, tmp_path):
    cifar_root, mnist_root = tmp_path / "src" / "cifar", tmp_path / "src" / "mnist"
    sets = ["--set", "build.train_size=120", "--set", "build.val_size=40", "--set", "build.test_size=30"]
    assert main(["data", "build", "--cifar", str(cifar_root), "--mnist", str(mnist_root), "--out",
                 str(tmp_path / "a"), "--download", *sets]) == 0
    assert (cifar_root / "cifar-10-batches-py").is_dir() and (mnist_root / "MNIST" / "raw").is_dir()
    assert len(load_split(tmp_path / "a", "val")) == 40
    # the downloaded torchvision roots now work offline, checksums verified again
    assert main(["data", "build", "--cifar", str(cifar_root), "--mnist", str(mnist_root), "--out",
                 str(tmp_path / "b"), *sets]) == 0


def test_checksum_mismatch_and_unreachable_download(fake_servers, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", "0" * 32)
    assert main(["data", "build", "--cifar", str(tmp_path / "c"), "--mnist", str(tmp_path / "m"),
                 "--out", str(tmp_path / "o"), "--download", *TINY_BUILD]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after torchvision's download bar
    assert err.startswith("error: CIFAR-10 download") and "integrity check" in err
    monkeypatch.setattr(datasets.CIFAR10, "url", f"{fake_servers}/nowhere.tar.gz")
    assert main(["data", "build", "--cifar", str(tmp_path / "c2"), "--mnist", str(tmp_path / "m"),
                 "--out", str(tmp_path / "o"), "--download", *TINY_BUILD]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: CIFAR-10 download") and "Traceback" not in err
