"""Re-run the 59 failing cases of ../shared/reviews/bad-inputs-2026-12.md against this checkout.

    uv run python experiments/review/rerun_bad_inputs.py [--only B27,T28] [--out results/review-rerun.md]

Each case rebuilds the review's fixture (small synthetic sources and datasets, a trained run, a
finished one-trial study, crafted files, tmpfs mounts as root, planted links, silent listeners),
runs the review's command as a subprocess and judges it by the review's promise: for bad input
exit code 2 and exactly one `error:` line naming the thing, no traceback, nothing written through a
path the user did not name, old output intact; for a valid input, success. The table gives the
review's verdict (before) beside what this checkout does (after). Needs root for the tmpfs cases
and Debian's PostgreSQL for the server cases; a case that cannot be set up says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.conftest import make_cifar_tree, make_mnist_tree, make_tar, start_health_server  # noqa: E402

REVIEW = REPO.parent / "shared" / "reviews" / "bad-inputs-2026-12.md"
SMALL = ["--set", "build.train_size=300", "--set", "build.val_size=100", "--set", "build.test_size=120"]
FAST = ["--set", "train.threads=1", "--set", "train.tta=none"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "shortcut_study.cli", *args]


@dataclass
class Outcome:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def run(argv: list[str], timeout: float = 300, cwd: Path | None = None, sigint_after: float | None = None) -> Outcome:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if sigint_after is not None:
            time.sleep(sigint_after)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Outcome(124, out, err)
    return Outcome(proc.returncode, out, err)


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


# ---- fixtures -----------------------------------------------------------------------------------------

class World:
    """The review's $T: sources, a small dataset, a trained run, a finished study."""

    def __init__(self, root: Path) -> None:
        self.T = root
        src = root / "src"
        self.cifar, self.mnist = make_cifar_tree(src / "cifar10", per_class=50, per_class_test=15), make_mnist_tree(src / "mnist", per_class=30, per_class_test=15)
        self.cifar_tgz, self.mnist_tgz = make_tar(self.cifar, src / "cifar10.tgz"), make_tar(self.mnist, src / "mnist.tgz")
        self.small = root / "small"
        self.must(cli("data", "build", "--cifar", str(self.cifar), "--mnist", str(self.mnist), "--out", str(self.small), *SMALL))
        self.run_good = root / "run_good"
        self.must(cli("train", "--data", str(self.small), "--out", str(self.run_good), "--epochs", "1", *FAST))
        self.st = root / "st"
        self.storage, self.tracking = f"sqlite:///{self.st}/optuna.db", f"sqlite:///{self.st}/mlflow.db"
        self.must(cli("sweep", "--data", str(self.small), "--study", "ok", "--n-trials", "1", "--epochs", "1",
                      "--subset", "256", *FAST, "--storage", self.storage, "--tracking-uri", self.tracking), cwd=root)
        self.mounts: list[Path] = []

    @staticmethod
    def must(argv: list[str], cwd: Path | None = None) -> None:
        done = run(argv, timeout=900, cwd=cwd)
        if done.rc != 0:
            raise SystemExit(f"fixture failed: {' '.join(argv)}\n{done.err[-2000:]}")

    def area(self, name: str) -> Path:
        path = self.T / "cases" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tmpfs(self, name: str, size: str) -> Path:
        mount = self.area(name) / "disk"
        mount.mkdir(exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
        if done.returncode != 0:
            raise Skip(f"cannot mount a tmpfs: {done.stderr.strip()[:80]}")
        self.mounts.append(mount)
        return mount

    def fill(self, disk: Path, leave: int) -> None:
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))

    def copy_data(self, name: str) -> Path:
        out = self.area(name) / "data"
        shutil.copytree(self.small, out)
        return out

    def copy_run(self, name: str) -> Path:
        out = self.area(name) / "run"
        shutil.copytree(self.run_good, out)
        return out

    def build(self, out: Path, *extra: str) -> list[str]:
        return cli("data", "build", "--cifar", str(self.cifar), "--mnist", str(self.mnist), "--out", str(out), *SMALL, *extra)

    def sweep(self, study: str, storage: str, *extra: str, tracking: str | None = None) -> list[str]:
        return cli("sweep", "--data", str(self.small), "--n-trials", "2", "--epochs", "1", "--subset", "256", *FAST,
                   "--study", study, "--storage", storage, "--tracking-uri", tracking or self.tracking, *extra)

    def compare(self, name: str, grid: str, *extra: str, tracking: str | None = None, out: Path | None = None,
                train: str = "", tables: str = "") -> list[str]:
        """`compare` on a one-cell-per-method grid: `grid` holds its top-level keys (methods, ...),
        `train` more [recipe.train] lines, `tables` more recipe tables."""
        path = self.area(name) / "grid.toml"
        path.write_text(f'name = "{name}"\nagreements = [0.64]\ndigit_sizes = [16]\nseeds = [0]\npreset = "methods"\n'
                        + grid + '[recipe.train]\nepochs = 1\nsubset = 128\nthreads = 1\ntta = "none"\n' + train
                        + '[recipe.build]\ntrain_size = 300\nval_size = 100\ntest_size = 120\n' + tables)
        return cli("compare", "--cifar", str(self.cifar), "--mnist", str(self.mnist), "--storage",
                   f"sqlite:///{self.T}/cst/optuna.db", "--tracking-uri", tracking or f"sqlite:///{self.T}/cst/mlflow.db",
                   "--data-root", str(self.T / "cdata"), "--out", str(out or self.area(name) / "out"), "--grid", str(path), *extra)

    def report(self, out: Path, *extra: str) -> list[str]:
        return cli("report", "--out", str(out), "--layers", "conv1", *extra)

    def close(self) -> None:
        for mount in self.mounts:
            subprocess.run(["umount", str(mount)], check=False)


class Skip(Exception):
    pass


def silent_listener() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- judging ------------------------------------------------------------------------------------------

def one_line(o: Outcome, *fragments: str) -> tuple[bool, str]:
    """The promise for bad input: exit 2, one `error:` line holding each fragment, no traceback."""
    problems = []
    if o.rc != 2:
        problems.append(f"rc {o.rc}")
    if len(o.error_lines) != 1:
        problems.append(f"{len(o.error_lines)} error lines")
    if "Traceback" in o.err:
        problems.append("traceback")
    line = o.error_lines[0] if o.error_lines else (o.err.strip().splitlines() or [""])[-1]
    missing = [f for f in fragments if f.lower() not in line.lower()]
    if missing:
        problems.append(f"message lacks {missing}")
    return not problems, f"rc {o.rc}: {shorten(line)}" + (f" — {'; '.join(problems)}" if problems else "")


def shorten(text: str, n: int = 150) -> str:
    return re.sub(r"/tmp/[^ :,'\"]*?/cases/", "$T/", re.sub(r"\s+", " ", text)).strip()[:n]


def both(*checks: tuple[bool, str]) -> tuple[bool, str]:
    return all(ok for ok, _ in checks), "; ".join(note for _, note in checks if note)


def fact(ok: bool, note: str) -> tuple[bool, str]:
    return ok, ("" if ok else "FAILED: ") + note


# ---- the cases ----------------------------------------------------------------------------------------

CASES: dict[str, Callable[[World], tuple[bool, str]]] = {}


def case(cid: str):
    def register(fn):
        CASES[cid] = fn
        return fn
    return register


def _full_build(w: World, name: str, size: str, leave: int | None, rebuild: bool) -> tuple[bool, str]:
    disk = w.tmpfs(name, size)
    ds = disk / "ds"
    if rebuild:
        shutil.copytree(w.small, ds)
    before = files(ds)
    if leave is not None:
        w.fill(disk, leave)
    o = run(w.build(ds, "--seed", "1"))
    left = sorted(p.name for p in disk.iterdir() if p.name not in ("ds", "filler"))
    return both(one_line(o, "disk is full", str(disk)), fact(files(ds) == before, "old dataset intact"),
                fact(not left, f"nothing left beside it {left or ''}".strip()))


@case("B27")
def _(w):
    return _full_build(w, "b27", "7m", 200_000, rebuild=True)


@case("F01")
def _(w):
    return _full_build(w, "f01", "2m", None, rebuild=False)


@case("P36")
def _(w):
    disk = w.tmpfs("p36", "1m")
    out = disk / "q1_test.txt"
    out.write_text("img_0.png,1\n")
    w.fill(disk, 100)
    o = run(cli("predict", "--checkpoint", str(w.run_good / "q1_model.pt"), "--images", str(w.small / "test_unlabeled"),
                "--out", str(out), "--tta", "none"))
    return both(one_line(o, "disk is full", str(disk)), fact(out.read_text() == "img_0.png,1\n", "earlier file intact"))


def _train_full(w: World, name: str, earlier: bool) -> tuple[bool, str]:
    disk = w.tmpfs(name, "4m" if earlier else "1m")
    out = disk / "run"
    if earlier:
        shutil.copytree(w.run_good, out)
    before = files(out)
    w.fill(disk, 300_000 if earlier else 900_000)
    o = run(cli("train", "--data", str(w.small), "--out", str(out), "--epochs", "1", "--seed", "3", *FAST))
    checks = [one_line(o, "disk is full", str(disk))]
    if earlier:
        checks.append(fact(files(out) == before, "earlier run whole, no new file beside it"))
    checks.append(fact(not list(disk.rglob("*.tmp")) and not list(disk.glob(".run.*")), "no staging left"))
    return both(*checks)


@case("T28")
def _(w):
    return _train_full(w, "t28", earlier=True)


@case("F02")
def _(w):
    return _train_full(w, "f02", earlier=False)


def _cache_variant(w: World, name: str, text: str) -> tuple[bool, str]:
    data = w.copy_data(name)
    (data / "cache" / "train.json").write_text(text)
    o = run(cli("train", "--data", str(data), "--out", str(w.area(name) / "out"), "--epochs", "1", *FAST))
    return fact(o.rc == 0 and "Traceback" not in o.err, f"rc {o.rc}: the cache is rebuilt {shorten(o.err[-200:]) if o.rc else ''}")


@case("T30")
def _(w):
    return _cache_variant(w, "t30", "[]")


@case("Q23")
def _(w):
    return _cache_variant(w, "q23", "[" * 200_000 + "]" * 200_000)


@case("Q24")
def _(w):
    return _cache_variant(w, "q24", '"abc"')


def _report_labels(w: World, name: str, edit: Callable[[Path], None]) -> tuple[bool, str]:
    data = w.copy_data(name)
    edit(data / "test_labels.csv")
    o = run(w.report(w.area(name) / "rep", "--study", "ok", "--storage", w.storage, "--tracking-uri", w.tracking,
                     "--data", str(data), "--checkpoint", str(w.run_good / "q1_model.pt")), cwd=w.T)
    return one_line(o, "test_labels.csv")


@case("T34")
def _(w):
    def garbage(p: Path):
        rows = [line.split(",") for line in p.read_text().splitlines()]
        col = rows[0].index("label")
        rows[1][col], rows[2][col] = "cat", ""
        p.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return _report_labels(w, "t34", garbage)


@case("Y06")
def _(w):
    return _report_labels(w, "y06", lambda p: p.write_text("a,b\n1,2\n"))


@case("W04")
def _(w):
    afile = w.area("w04") / "afile"
    afile.write_text("x")
    o = run(w.sweep("w04", f"sqlite:///{afile}/s.db"), cwd=w.T)
    return one_line(o, str(afile), "is a file")


def _grid(w: World, name: str, grid: str, ok_expected: bool = False, *fragments: str, train: str = "",
          tables: str = "") -> tuple[bool, str]:
    o = run(w.compare(name, grid, train=train, tables=tables), timeout=900, cwd=w.T)
    if ok_expected:
        return fact(o.rc == 0, f"rc {o.rc}: valid grid accepted {shorten(o.err[-200:]) if o.rc else ''}")
    return one_line(o, *fragments)


@case("K19")
def _(w):
    return _grid(w, "k19", 'methods = ["groupdro"]\n', False, "method.eta", tables="[recipe.method]\neta = -1\n")


@case("K30")
def _(w):
    return _grid(w, "k30", 'methods = ["groupdro"]\n', True, tables="[recipe.method]\neta = 0.05\n")


@case("K31")
def _(w):
    return _grid(w, "k31", 'methods = ["jtt", "groupdro", "jtt+shuffle"]\n', False, "groupdro", "upweight",
                 tables="[recipe.method]\nupweight = 5\nidentify_epochs = 1\n")


@case("K32")
def _(w):
    # (the review's [recipe.train] method = "groupdro" is now refused on its own: the axes decide it, K34)
    o = run(w.compare("k32", 'methods = ["groupdro", "erm", "groupdro+shuffle"]\n', tables="[recipe.method]\neta = 0.05\n"),
            cwd=w.T)
    return both(one_line(o, "erm"), fact("trials failed" not in o.err, "refused before any cell trained"))


@case("K33")
def _(w):
    return _grid(w, "k33", 'methods = ["erm"]\n', False, "geometry.digit_size", tables="[recipe.geometry]\ndigit_size = 8\n")


@case("K34")
def _(w):
    return _grid(w, "k34", 'methods = ["erm"]\n', False, "train.method", train='method = "jtt"\nseed = 7\n')


@case("M19")
def _(w):
    o = run(cli("train", "--data", str(w.small), "--out", str(w.area("m19") / "o"), "--epochs", "1", "--subset", "256", *FAST,
                "--set", "train.method=groupdro", "--set", "method.eta=1e308"))
    return one_line(o, "method.eta")


@case("M20")
def _(w):
    o = run(cli("train", "--data", str(w.small), "--out", str(w.area("m20") / "o"), "--epochs", "1", "--subset", "256", *FAST,
                "--set", "train.method=jtt", "--set", "method.upweight=1e308", "--set", "method.identify_epochs=1"))
    return one_line(o, "method.upweight")


def _server(w: World, name: str, *extra: str, pg_port: int | None = None, port: int | None = None,
            root: Path | None = None) -> Outcome:
    root = root or w.area(name) / "srv"
    return run(cli("server", "--root", str(root), "--pg-port", str(pg_port or free_port()), "--port", str(port or free_port()),
                   *extra), timeout=100)


@case("V02")
def _(w):
    s, port = silent_listener()
    try:
        return one_line(_server(w, "v02", port=port), f"port {port}", "in use")
    finally:
        s.close()


@case("V03")
def _(w):
    httpd, port = start_health_server()
    try:
        return one_line(_server(w, "v03", port=port), f"port {port}", "in use")
    finally:
        httpd.shutdown()


@case("V04")
def _(w):
    s, port = silent_listener()
    try:
        return one_line(_server(w, "v04", pg_port=port), f"port {port}", "--pg-port")
    finally:
        s.close()


@case("V08")
def _(w):
    return one_line(_server(w, "v08", port=99999), "99999", "port")


@case("V09")
def _(w):
    return one_line(_server(w, "v09", "--host", "256.1.1.1"), "256.1.1.1")


@case("V12")
def _(w):
    if os.geteuid() != 0:
        raise Skip("needs root")
    private = w.area("v12") / "priv"
    private.mkdir(mode=0o700, exist_ok=True)
    private.chmod(0o700)
    o = _server(w, "v12", root=private / "srv")
    mode = private.stat().st_mode & 0o777
    return both(one_line(o, str(private)), fact(mode == 0o700, f"{private.name} mode {mode:o} (was 700)"))


@case("U06")
def _(w):
    s, port = silent_listener()
    try:
        start = time.monotonic()
        o = run(w.sweep("u06", f"postgresql://postgres@127.0.0.1:{port}/optuna"), timeout=120, cwd=w.T)
        return both(one_line(o, f"127.0.0.1:{port}"), fact(o.rc != 124, f"answered in {time.monotonic() - start:.0f} s"))
    finally:
        s.close()


@case("U11")
def _(w):
    o = run(w.report(w.area("u11") / "rep", "--data", str(w.small), "--checkpoint", str(w.run_good / "q1_model.pt"),
                     "--study", "ok", "--storage", "postgresql://postgres@127.0.0.1:9/optuna", "--tracking-uri", w.tracking),
            timeout=120, cwd=w.T)
    return one_line(o, "127.0.0.1:9")


@case("U12")
def _(w):
    s, port = silent_listener()
    try:
        o = run(cli("best", "--data", str(w.small), "--study", "ok", "--out", str(w.area("u12") / "res"), "--storage",
                    f"postgresql://postgres@127.0.0.1:{port}/optuna", "--tracking-uri", w.tracking), timeout=90, cwd=w.T)
        return both(one_line(o, f"127.0.0.1:{port}"), fact(o.rc != 124, "no hang"))
    finally:
        s.close()


@case("U13")
def _(w):
    s, port = silent_listener()
    try:
        o = run(["make", "-s", "ui", f"UI_PORT={port}", f"TRACKING_URI={w.tracking}"], timeout=60, cwd=REPO)
        return fact(o.rc != 0 and len(o.error_lines) == 1 and f"port {port}" in o.error_lines[0],
                    f"make ui exit {o.rc}: {shorten(' '.join(o.error_lines))}")
    finally:
        s.close()


@case("U14")
def _(w):
    o = run(w.sweep("u14", "postgresql://postgres@127.0.0.1:9/optuna", "--workers", "2"), timeout=120, cwd=w.T)
    return one_line(o, "127.0.0.1:9")


@case("U15")
def _(w):
    o = run(w.compare("u15", 'methods = ["erm"]\n', "--workers", "2", tracking="http://127.0.0.1:9"), timeout=120, cwd=w.T)
    return one_line(o, "http://127.0.0.1:9")


def _predict_config(w: World, name: str, text: str, *fragments: str) -> tuple[bool, str]:
    run_dir = w.copy_run(name)
    (run_dir / "config.json").write_text(text)
    o = run(cli("predict", "--checkpoint", str(run_dir / "q1_model.pt"), "--images", str(w.small / "test_unlabeled"),
                "--out", str(w.area(name) / "p.txt")))
    return one_line(o, "config.json", *fragments)


@case("Q05")
def _(w):
    return _predict_config(w, "q05", "[" * 100_000 + "]" * 100_000)


@case("Q06")
def _(w):
    return _predict_config(w, "q06", '{"a":' * 100_000 + "1" + "}" * 100_000)


@case("Q10")
def _(w):
    run_dir = w.copy_run("q10")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["geometry"]["canvas"] = 64
    (run_dir / "config.json").write_text(json.dumps(cfg))
    o = run(cli("predict", "--checkpoint", str(run_dir / "q1_model.pt"), "--images", str(w.small / "test_unlabeled"),
                "--out", str(w.area("q10") / "p.txt")))
    return one_line(o, "config.json", "64")


@case("Q20")
def _(w):
    import torch

    data = w.copy_data("q20")
    before = (data / "metadata.csv").read_text()
    oracle = w.area("q20") / "oracle_nan.pt"
    from shortcut_study.data.oracle import DigitOracle  # the shipped oracle's architecture

    net = DigitOracle()
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in net.state_dict().items()},
               oracle)
    o = run(cli("data", "annotate", str(data), "--force", "--oracle", str(oracle)))
    return both(one_line(o, "oracle"), fact((data / "metadata.csv").read_text() == before, "metadata.csv intact"))


def _last(w: World, name: str, edit: Callable[[dict], None]) -> tuple[bool, str]:
    import torch

    out = w.area(name) / "out"
    assert run(cli("train", "--data", str(w.small), "--out", str(out), "--epochs", "2", *FAST)).rc == 0
    state = torch.load(out / "last.pt", weights_only=False)
    edit(state)
    torch.save(state, out / "last.pt")
    return one_line(run(cli("train", "--data", str(w.small), "--out", str(out), "--resume")), "last.pt")


@case("Q25")
def _(w):
    return _last(w, "q25", lambda s: s.pop("best_score", None))


@case("Q26")
def _(w):
    return _last(w, "q26", lambda s: s.__setitem__("method", "erm"))


@case("Q27")
def _(w):
    return _last(w, "q27", lambda s: s.__setitem__("config", [1, 2, 3]))


@case("Q28")
def _(w):
    return _last(w, "q28", lambda s: s.__setitem__("epoch", "one"))


@case("Q29")
def _(w):
    return _last(w, "q29", lambda s: s.__setitem__("history", "nope"))


@case("Q30")
def _(w):
    import mlflow
    import optuna

    st = w.area("q30")
    storage, tracking = f"sqlite:///{st}/optuna.db", f"sqlite:///{st}/mlflow.db"
    w.must(w.sweep("ok", storage, "--n-trials", "1", tracking=tracking), cwd=st)
    trial = optuna.load_study(study_name="ok", storage=storage).best_trial
    mlflow.set_tracking_uri(tracking)
    uri = mlflow.get_run(trial.user_attrs["mlflow_run_id"]).info.artifact_uri
    local = Path(uri.removeprefix("file://")) / "q1_model.pt"
    if not local.is_file():
        raise Skip(f"artifact not on local disk: {uri}")
    marker = w.area("q30") / "pwned_best"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch
    torch.save({"x": Payload()}, local)
    o = run(cli("best", "--data", str(w.small), "--study", "ok", "--storage", storage, "--tracking-uri", tracking,
                "--out", str(w.area("q30") / "res")), cwd=w.T)
    return both(one_line(o, trial.user_attrs["mlflow_run_id"]), fact(not marker.exists(), "no code ran"))


def _best_run_json(w: World, name: str, text: str) -> tuple[bool, str]:
    out = w.area(name) / "rep"
    out.mkdir(exist_ok=True)
    shutil.copy(w.run_good / "q1_model.pt", out / "q1_model.pt")
    (out / "best_run.json").write_text(text)
    return one_line(run(w.report(out, "--data", str(w.small), "--study", "none"), cwd=w.T), "best_run.json")


@case("Q31")
def _(w):
    return _best_run_json(w, "q31", "{bad")


@case("Q32")
def _(w):
    return _best_run_json(w, "q32", "[1, 2]")


@case("L04")
def _(w):
    outside = w.area("l04") / "outside"
    shutil.copytree(w.small, outside)
    before = files(outside)
    link = w.area("l04") / "l04"
    link.symlink_to(outside, target_is_directory=True)
    o = run(w.build(link, "--seed", "5"))
    return both(one_line(o, str(link), "symbolic link"), fact(files(outside) == before, "outside dataset untouched"))


@case("L06")
def _(w):
    res, other = w.area("l06") / "res", w.area("l06") / "other"
    res.mkdir(exist_ok=True)
    other.mkdir(exist_ok=True)
    for name in ("q1_model.pt", "q1_test.txt", "notes.txt"):
        (other / name).write_text(f"someone else's {name}")
    before = files(other)
    (res / ".export.partial").symlink_to(other, target_is_directory=True)
    o = run(cli("best", "--data", str(w.small), "--study", "ok", "--storage", w.storage, "--tracking-uri", w.tracking,
                "--out", str(res)), cwd=w.T)
    return both(fact(o.rc == 0, f"rc {o.rc}"), fact(files(other) == before, "the other folder untouched"))


@case("L08")
def _(w):
    base, other = w.area("l08"), w.area("l08") / "other"
    other.mkdir(exist_ok=True)
    (other / "mine.txt").write_text("mine")
    (base / ".l08.partial").symlink_to(other, target_is_directory=True)
    o = run(w.build(base / "l08"))
    return both(fact(o.rc == 0, f"rc {o.rc}"), fact(sorted(p.name for p in other.iterdir()) == ["mine.txt"], "nothing written through the link"),
                fact(not (base / "l08").is_symlink(), "--out a real folder"))


@case("I02")
def _(w):
    refs = w.area("i02")
    old, new = refs / "old", refs / "new"
    shutil.copytree(w.small, old)
    start = time.monotonic()
    assert run(w.build(new, "--seed", "2")).rc == 0
    took = time.monotonic() - start
    seen = []
    for k, fraction in enumerate((0.5, 0.8, 0.9, 0.95, 0.99)):
        dest = refs / f"ds{k}"
        shutil.copytree(old, dest)
        run(w.build(dest, "--seed", "2"), sigint_after=took * fraction)
        got = files(dest)
        seen.append("old" if got == files(old) else "new" if got == files(new) else "NEITHER")
    return fact("NEITHER" not in seen and not list(refs.glob(".ds*")), f"SIGINT at 50-99 %: {', '.join(seen)}")


def _disk_cmd(w: World, name: str, size: str, leave: int, argv: Callable[[Path], list[str]],
              keep: Callable[[Path], Path] | None = None) -> tuple[bool, str]:
    disk = w.tmpfs(name, size)
    kept = keep(disk) if keep else None
    before = files(kept) if kept else None
    w.fill(disk, leave)
    o = run(argv(disk), timeout=900, cwd=w.T)
    checks = [one_line(o, "disk is full", str(disk))]
    if kept:
        checks.append(fact(files(kept) == before, "earlier output whole"))
    return both(*checks)


@case("F03")
def _(w):
    return _disk_cmd(w, "f03", "2m", 1_000_000, lambda d: w.report(d / "rep", "--data", str(w.small), "--checkpoint",
                                                                      str(w.run_good / "q1_model.pt"), "--study", "none"))


@case("F04")
def _(w):
    return _disk_cmd(w, "f04", "1m", 300_000, lambda d: cli("best", "--data", str(w.small), "--study", "ok", "--storage",
                                                           w.storage, "--tracking-uri", w.tracking, "--out", str(d / "res")))


@case("F07")
def _(w):
    def keep(d: Path) -> Path:
        shutil.copytree(w.small, d / "ds")
        return d / "ds"
    return _disk_cmd(w, "f07", "8m", 0, lambda d: cli("data", "annotate", str(d / "ds"), "--force"), keep)


@case("F08")
def _(w):
    return _disk_cmd(w, "f08", "1m", 20_000, lambda d: cli("data", "oracle", "--mnist", str(w.mnist), "--out",
                                                          str(d / "oracle.pt"), "--epochs", "1"))


@case("F09")
def _(w):
    return _disk_cmd(w, "f09", "1m", 5_000, lambda d: w.compare("f09", 'methods = ["erm"]\n', out=d / "cres"))


@case("F10")
def _(w):
    assert run(w.compare("f10", 'methods = ["erm"]\n'), timeout=900, cwd=w.T).rc == 0  # the grid finished once
    disk = w.tmpfs("f10d", "1m")
    out = disk / "cres"
    shutil.copytree(w.area("f10") / "out", out)
    # Same grid, same numbers: the contents alone cannot tell old from new; the files' times can.
    stamps = lambda: {str(q.relative_to(out)): q.stat().st_mtime_ns for q in out.rglob("*") if q.is_file()}  # noqa: E731
    before = stamps()
    w.fill(disk, 20_000)
    o = run(w.compare("f10", 'methods = ["erm"]\n', out=out), timeout=900, cwd=w.T)
    return both(one_line(o, "disk is full"), fact(stamps() == before, "old tables and plots whole, none rewritten"))


@case("G02")
def _(w):
    return one_line(run(cli("train", "--data", str(w.small), "--out", str(w.area("g02") / "o"), "--epochs", "1", *FAST,
                            "--seed", "99999999999999999999")), "seed")


@case("G03")
def _(w):
    return one_line(run(w.build(w.area("g03") / "o", "--seed", "-1")), "seed=-1")


@case("G05")
def _(w):
    out = w.area("g05") / "o"
    o = run(cli("train", "--data", str(w.small), "--out", str(out), "--epochs", "1", *FAST, "--subset", "64",
                "--set", "train.batch_size=1"))
    return both(one_line(o, "batch_size"), fact(not (out / "q1_model.pt").exists(), "no NaN checkpoint left"))


@case("G08")
def _(w):
    cwd = w.area("g08")
    o = run(w.sweep("../escape", w.storage, "--n-trials", "1"), cwd=cwd)
    return both(one_line(o, "--study"), fact(not (cwd / "escape").exists(), "nothing written outside studies/"))


@case("G09")
def _(w):
    bare = w.area("g09") / "bare"
    bare.mkdir(exist_ok=True)
    shutil.copy(w.run_good / "q1_model.pt", bare / "q1_model.pt")
    auto, none = w.area("g09") / "auto.txt", w.area("g09") / "none.txt"
    a = run(cli("predict", "--checkpoint", str(bare / "q1_model.pt"), "--images", str(w.small / "test_unlabeled"), "--out", str(auto)))
    n = run(cli("predict", "--checkpoint", str(bare / "q1_model.pt"), "--images", str(w.small / "test_unlabeled"),
                "--out", str(none), "--tta", "none"))
    same = a.rc == 0 and n.rc == 0 and auto.read_text() == none.read_text()
    return fact(same, "auto on a bare checkpoint = --tta none")


@case("N10")
def _(w):
    start = time.monotonic()
    o = run(cli("bench", "--data", str(w.small), "--presets", "nosuch", "--steps", "5", "--set", "train.threads=1"))
    return both(one_line(o, "nosuch"), fact(time.monotonic() - start < 30, f"refused after {time.monotonic() - start:.0f} s"))


# ---- the table ----------------------------------------------------------------------------------------

def review_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in REVIEW.read_text().splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| ") and re.fullmatch(r"[A-Z]\d\d", cells[0].lstrip("| ")):
            rows[cells[0].lstrip("| ")] = (cells[1], cells[-1].rstrip(" |"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case ids")
    ap.add_argument("--out", default=str(REPO / "results" / "review-bad-inputs-rerun.md"))
    args = ap.parse_args()
    review = review_rows()
    ids = args.only.split(",") if args.only else list(review)
    root = Path(tempfile.mkdtemp(prefix="review-rerun-"))
    root.chmod(0o755)
    world = World(root)
    results = []
    try:
        for cid in ids:
            t0 = time.monotonic()
            try:
                ok, note = CASES[cid](world) if cid in CASES else (False, "no re-run written for this case")
                verdict = "pass" if ok else "FAIL"
            except Skip as exc:
                verdict, note = "skipped", str(exc)
            except Exception as exc:  # a fixture that broke: reported, not hidden
                verdict, note = "ERROR", f"{type(exc).__name__}: {shorten(str(exc))}"
            results.append((cid, review[cid][0], review[cid][1], verdict, note))
            print(f"{cid} {verdict:7} {time.monotonic() - t0:5.1f} s  {note}", flush=True)
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)
    passed = sum(r[3] == "pass" for r in results)
    from shortcut_study.bench import machine_line

    lines = ["# The review's 59 failing cases, re-run", "",
             f"`uv run python experiments/review/rerun_bad_inputs.py` on commit {git_commit()}, "
             f"{time.strftime('%Y-%m-%d')}, {machine_line()}: **{passed} of {len(results)} pass**.", "",
             "| id | case | before (review of 2026-12-01, commit f074bd9) | after | what this checkout did |",
             "|---|---|---|---|---|"]
    lines += [f"| {cid} | {case_text} | {before} | {verdict} | {note.replace('|', '/')} |"
              for cid, case_text, before, verdict, note in results]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{passed}/{len(results)} pass; wrote {args.out}")


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
