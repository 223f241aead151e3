"""Tiny synthetic CIFAR-10 / MNIST sources and a dataset built from them, shared by the tests."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

# `make test` runs two test processes (pytest-xdist) on these two-core machines: each gets its share
# of the cores as torch threads (`runtime.default_threads` reads OMP_NUM_THREADS), and so do the
# commands a test starts — two processes of two threads each would oversubscribe the cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np
import pytest
from PIL import Image

from shortcut_study.cli import main
from shortcut_study.config import CIFAR_CLASSES

# Per-channel pixel means of the real datasets, so composites of synthetic images have realistic means.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
MNIST_MEAN = 0.1307
TINY_BUILD = ["--set", "build.train_size=120", "--set", "build.val_size=40", "--set", "build.test_size=30"]


def make_cifar_tree(root: Path, per_class: int = 16, per_class_test: int = 4, seed: int = 0) -> Path:
    """CIFAR-like class folders: class-coloured blocks plus noise around the real channel means."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class_test)):
        for c, name in enumerate(CIFAR_CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.normal(np.array(CIFAR_MEAN) * 255, 50, size=(32, 32, 3))
                img[c * 3:c * 3 + 3, :, :] = 255  # a class-dependent stripe, learnable
                img = img.clip(0, 255)
                img *= np.array(CIFAR_MEAN) * 255 / img.mean(axis=(0, 1))  # keep the real means
                Image.fromarray(img.clip(0, 255).round().astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


def make_mnist_tree(root: Path, per_class: int = 12, per_class_test: int = 4, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class_test)):
        for digit in range(10):
            d = root / split / str(digit)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.zeros((28, 28), dtype=np.float64)
                img[2 + digit * 2:10 + digit * 2, 6:22] = 200  # a digit-dependent bar
                img = (img + rng.normal(0, 10, size=img.shape)).clip(0, 255)
                img *= MNIST_MEAN * 255 / img.mean()
                Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L").save(d / f"{digit * 1000 + i}.png")
    return root


def start_health_server():
    """Another program's HTTP server on a free loopback port, answering every GET with 200 OK (as a
    colleague's MLflow server answers /health); returns (server, port). Stop it with .shutdown()."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


def make_tar(tree: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
    return out


@pytest.fixture(autouse=True)
def _in_own_folder(tmp_path_factory, monkeypatch):
    """Every test runs in a folder of its own, beside its tmp_path (which tests inspect whole): the
    commands write `./studies` (run folders, locks) relative to the working directory, and two test
    processes run side by side (`make test`)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    cifar = make_cifar_tree(base / "cifar10")
    mnist = make_mnist_tree(base / "mnist")
    return {"cifar": cifar, "mnist": mnist,
            "cifar_tgz": make_tar(cifar, base / "cifar10-images.tar.gz"),
            "mnist_tgz": make_tar(mnist, base / "mnist-images.tar.gz")}


@pytest.fixture(scope="session")
def dataset(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "course"
    assert main(["data", "build", "--cifar", str(sources["cifar_tgz"]), "--mnist", str(sources["mnist_tgz"]),
                 "--out", str(out), *TINY_BUILD]) == 0
    return out


@pytest.fixture(scope="session")
def wide_dataset(sources, tmp_path_factory) -> Path:
    """A tiny dataset whose val shows every digit (the crossed val needs a donor of each), and each
    half of it too (DFR refits on one half and scores on the other)."""
    out = tmp_path_factory.mktemp("wide") / "course"
    assert main(["data", "build", "--cifar", str(sources["cifar_tgz"]), "--mnist", str(sources["mnist_tgz"]),
                 "--out", str(out), "--set", "build.train_size=60", "--set", "build.val_size=100",
                 "--set", "build.test_size=40"]) == 0
    return out


TINY_TRAIN = ["--set", "train.batch_size=32", "--set", "train.eval_batch_size=64", "--epochs", "2"]


@pytest.fixture(scope="session")
def trained_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--data", str(dataset), "--out", str(out), *TINY_TRAIN]) == 0
    return out


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL cluster (Debian's package, installed by .ci/run) in a temporary folder on a
    free loopback port, stopped at the end."""
    from shortcut_study.errors import UserError
    from shortcut_study.server import LocalPostgres, free_port, pg_bin

    try:
        pg_bin()
    except UserError as exc:
        if os.environ.get("CI"):  # .ci/run installs PostgreSQL: its absence there is a failure
            pytest.fail(f"PostgreSQL missing in CI: {exc}")
        pytest.skip(f"PostgreSQL tests skipped: {exc}")
    # Not under pytest's 700 temp root: as root the cluster runs as `postgres`, which must enter every
    # folder above it, and the tool never opens folders it did not create; this one is the test's own.
    base = Path(tempfile.mkdtemp(prefix="shortcut-study-pg-"))
    base.chmod(0o711)
    pg = LocalPostgres(base / "data", free_port())
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_db(postgres, request):
    """A fresh database per test."""
    import re

    return postgres.create_db(re.sub(r"\W", "_", request.node.name.lower())[:60])


def kill_once_training(cmd: list[str], storage: str, cwd: Path, timeout: float = 180, study: str = "t") -> None:
    """Start the sweep `cmd`, wait until its first trial is RUNNING with its MLflow run open, then
    kill it with SIGKILL (its whole process group), as a crashed machine would."""
    import os
    import signal
    import subprocess
    import time

    import optuna
    from optuna.trial import TrialState

    from shortcut_study.storage import open_storage

    log = Path(cwd) / "killed-sweep.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, opened = time.time() + timeout, None
    try:
        while time.time() < deadline:
            time.sleep(1)
            if proc.poll() is not None:  # it ended before a look found a trial training: say why
                pytest.fail(f"the sweep ended (exit {proc.returncode}) before it could be killed:\n{log.read_text()[-3000:]}")
            try:
                opened = opened or open_storage(storage)  # once: one connection pool
                trials = optuna.load_study(study_name=study, storage=opened).trials
            except Exception:
                continue
            if any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):
                return
        pytest.fail("the sweep never started a trial")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
