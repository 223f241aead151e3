"""`server` and `ui` refuse, before starting anything, what they cannot serve: a port another program
holds (a plain listener, or another HTTP server that would pass our health check), a value that is
not a port or an address, and a --root the postgres user cannot reach; they never change the
permissions of folders they did not create (review cases V02–V04, V08, V09, V12, U13)."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest

from shortcut_study.cli import main
from shortcut_study.server import free_port

from .conftest import start_health_server


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def foreign_http():
    httpd, port = start_health_server()
    yield port
    httpd.shutdown()
    httpd.server_close()


def _server(root: Path, pg_port: int, port: int, *extra: str) -> list[str]:
    return ["server", "--root", str(root), "--pg-port", str(pg_port), "--port", str(port), *extra]


def test_a_busy_mlflow_port_is_named_before_anything_starts(tmp_path, listener, capsys):
    err = _one_line(capsys, main(_server(tmp_path / "srv", free_port(), listener)))
    assert f"port {listener}" in err and "--port" in err and "in use" in err
    assert not (tmp_path / "srv").exists()


def test_a_foreign_http_server_on_the_port_is_not_taken_for_ours(tmp_path, foreign_http, capsys):
    err = _one_line(capsys, main(_server(tmp_path / "srv", free_port(), foreign_http)))
    assert f"port {foreign_http}" in err and "in use" in err


def test_a_busy_postgres_port_is_named(tmp_path, listener, capsys):
    err = _one_line(capsys, main(_server(tmp_path / "srv", listener, free_port())))
    assert f"port {listener}" in err and "--pg-port" in err


@pytest.mark.parametrize("extra, fragment", [(("--port", "99999"), "99999 is not a TCP port"),
                                             (("--host", "256.1.1.1"), "--host 256.1.1.1 is not an IP address")])
def test_a_value_that_is_no_port_or_address_is_refused_at_once(tmp_path, extra, fragment, capsys):
    argv = _server(tmp_path / "srv", free_port(), free_port()) + list(extra)
    assert fragment in _one_line(capsys, main(argv))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_a_private_parent_is_named_and_left_as_it_was(tmp_path, capsys):
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user")
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    err = _one_line(capsys, main(_server(private / "srv", free_port(), free_port())))
    assert "cannot enter" in err and "chmod o+x" in err
    assert private.stat().st_mode & 0o777 == 0o700  # never opened on the user's behalf


def test_ui_on_a_busy_port_is_one_line(tmp_path, listener, capsys):
    err = _one_line(capsys, main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--port", str(listener)]))
    assert f"port {listener}" in err and "UI_PORT" in err
