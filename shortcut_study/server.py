"""For a team: a PostgreSQL database for the Optuna storage and an MLflow tracking server with
proxied artifacts, started (and stopped) together; the URL rules live in storage.py.

PostgreSQL comes from Debian's `postgresql` package (`/usr/lib/postgresql/N/bin`); the cluster is
`initdb`-ed into a folder (default `studies/postgres`) and listens on loopback unless told
otherwise. The URLs it prints are what workers pass as `--storage` and `--tracking-uri`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .storage import normalize_db_url

INSTALL_HINT = "install Debian's PostgreSQL (`apt-get install -y postgresql`) or point at an existing server"


def pg_bin() -> Path:
    """The newest installed PostgreSQL's binaries folder."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        env = shutil.which("initdb")
        if env:
            return Path(env).parent
        raise UserError(f"PostgreSQL binaries not found: {INSTALL_HINT}")
    return found[-1].parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_listen(host: str, port: int, what: str) -> None:
    """Refuse, before anything starts, a port that is not one or that another program holds (a foreign
    server answering there would otherwise pass for ours), and a host this machine cannot listen on."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise UserError(f"--host {host} is not an IP address — give one of this machine's addresses "
                            "(127.0.0.1, or 0.0.0.0 for every interface)") from None
    if not 1 <= port <= 65535:
        raise UserError(f"{what} {port} is not a TCP port — give one from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} ({what}) is already in use by another program — stop it "
                                f"or choose another {what}") from None
            raise UserError(f"cannot listen on {host}:{port} ({what}): {exc.strerror} — give an address of this "
                            "machine with --host") from None


def _check_reachable_by_postgres(datadir: Path) -> None:
    """As root PostgreSQL runs as `postgres`, which must enter every folder above its cluster. The tool
    never changes permissions of folders it did not create: a closed parent is the user's to open."""
    pw = pwd.getpwnam("postgres")
    for parent in datadir.resolve().parents:
        st = parent.stat()
        if st.st_uid == pw.pw_uid or st.st_mode & 0o001 or (st.st_gid == pw.pw_gid and st.st_mode & 0o010):
            continue
        raise UserError(f"the postgres user cannot enter {parent} (mode {st.st_mode & 0o777:o}) to reach {datadir} — "
                        f"give a --root others may enter (e.g. under /srv or /var/tmp), or open it yourself "
                        f"(`chmod o+x {parent}`)")


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise UserError("running as root and there is no `postgres` user to run PostgreSQL as — "
                        f"{INSTALL_HINT}") from None
    # runuser lives in /usr/sbin, which a root shell's PATH usually has but a minimal one may not.
    runuser = shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)), None)
    if runuser is None:
        raise UserError("running as root and `runuser` (util-linux) is not found to run PostgreSQL as the "
                        "`postgres` user — install util-linux or run as another user")
    return [runuser, "-u", "postgres", "--", *cmd]


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in `datadir`, on `host:port`, trust-authenticated user `postgres`."""

    datadir: Path
    port: int
    host: str = "127.0.0.1"

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(_as_postgres([str(pg_bin() / cmd[0]), *cmd[1:]]), capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["failed"])[-1]
            log = self.datadir / "server.log"
            if log.is_file():  # pg_ctl says only "Examine the log output": the cause is the log's last error
                errors = [line for line in log.read_text(errors="replace").splitlines() if "FATAL" in line or "ERROR" in line]
                last = f"{errors[-1].strip() if errors else last} (log: {log})"
            raise UserError(f"PostgreSQL {cmd[0]} in {self.datadir} failed: {last}")
        return proc

    def init(self) -> None:
        if (self.datadir / "PG_VERSION").is_file():
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _as_postgres([])  # the postgres user exists
            _check_reachable_by_postgres(self.datadir)
            pw = pwd.getpwnam("postgres")
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)  # the cluster's own folder, created here
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self, timeout: float = 30) -> None:
        opts = f"-p {self.port} -c listen_addresses={self.host} -k {self.datadir}"
        self._run("pg_ctl", "-D", str(self.datadir), "-o", opts, "-l", str(self.datadir / "server.log"),
                  "-w", "-t", str(int(timeout)), "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        import sqlalchemy

        engine = sqlalchemy.create_engine(normalize_db_url(self.url()), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            exists = conn.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
            if not exists:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)


def wait_for_http(url: str, timeout: float = 60, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"the MLflow server exited with code {proc.returncode} before answering at {url}"
                            + (f" — see {log}" if log else ""))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise UserError(f"the MLflow server did not answer at {url} within {timeout:.0f} s"
                    + (f" — see {log}" if log else ""))


def start_mlflow_server(backend_url: str, artifacts: Path, host: str, port: int,
                        log: Path | None = None) -> subprocess.Popen:
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", normalize_db_url(backend_url),
           "--artifacts-destination", str(artifacts.resolve()), "--serve-artifacts", "--host", host,
           "--port", str(port), "--workers", "1"]
    out = open(log, "a") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def serve(root: Path = Path("studies"), host: str = "127.0.0.1", pg_port: int = 55432,
          mlflow_port: int = 5000) -> None:
    """Start PostgreSQL and the MLflow server, print the two URLs, stop both on Ctrl-C (or SIGTERM)."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    check_listen(host, pg_port, "--pg-port")
    check_listen(host, mlflow_port, "--port")
    if pg_port == mlflow_port:
        raise UserError(f"--pg-port and --port are both {pg_port} — give the two servers different ports")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background, where SIGINT is ignored
    pg = LocalPostgres(root / "postgres", pg_port, host)
    pg.init()
    pg.start()
    server = None
    try:
        storage = pg.create_db("optuna")
        backend = pg.create_db("mlflow")
        server = start_mlflow_server(backend, root / "mlflow-artifacts", host, mlflow_port, log=root / "mlflow-server.log")
        tracking = f"http://{host}:{mlflow_port}"
        wait_for_http(tracking, proc=server, log=root / "mlflow-server.log")
        print(f"Optuna storage:  --storage {storage}")
        print(f"MLflow tracking: --tracking-uri {tracking}   (UI: {tracking})")
        print("workers: make sweep STORAGE=<storage> TRACKING_URI=<tracking> [WORKERS=N]; Ctrl-C stops both",
              flush=True)
        while server.poll() is None:
            time.sleep(1)
        raise UserError(f"the MLflow server stopped (code {server.returncode}); see {root / 'mlflow-server.log'}")
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        pg.stop()


def ui(tracking_uri: str, artifacts: Path, port: int, host: str = "127.0.0.1") -> None:
    """MLflow's UI on the study's store; a busy port is one error line (mlflow ui itself exits 0)."""
    check_listen(host, port, "UI_PORT")
    print(f"MLflow UI: http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", normalize_db_url(tracking_uri),
           "--default-artifact-root", str(artifacts.resolve()), "--host", host, "--port", str(port)]
    try:
        code = subprocess.run(cmd).returncode
    except KeyboardInterrupt:
        return
    if code not in (0, -signal.SIGINT, 130):
        raise UserError(f"mlflow ui exited with code {code} (its output is above)")
