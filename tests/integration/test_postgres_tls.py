"""Every PostgreSQL connection the project opens uses Django's options (issue 13, point 2).

A private PostgreSQL with TLS on (a self-signed server certificate, and client certificates
asked for) made in the test: with ``?sslmode=verify-full&sslrootcert=…&sslcert=…&sslkey=…``
in ``DATABASE_URL``, every backend a relay and an edge hold shows ``ssl = true`` and the
client certificate in ``pg_stat_ssl`` — the relay's lease session, which carries every
payload, included. And ``sslmode=require`` against a server without TLS fails loudly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from faults.services import PrivatePostgres, _pg_bin

from harness.env import child_env
from harness.procs import PYTHON, ROOT, Proc, daphne_args, manage, relay_args
from harness.waits import free_port, wait_for, wait_port

pytestmark = [pytest.mark.integration]

CLIENT_CN = "tyrum-tls-client"


def self_signed(directory: Path, name: str, cn: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key (for ``cn``, and 127.0.0.1 as a name)."""
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={cn}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    key.chmod(0o600)
    return crt, key


class TlsPostgres(PrivatePostgres):
    """A private PostgreSQL with TLS on: its certificate, and the client certificate it trusts."""

    def __init__(self, client_ca: Path) -> None:
        super().__init__()
        self.crt, self.key = self_signed(self.root, "server", "127.0.0.1")
        shutil.copy(client_ca, self.root / "client-ca.crt")
        for path in (self.crt, self.key, self.root / "client-ca.crt"):
            shutil.chown(path, "postgres", "postgres")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on "
            f"-c ssl_cert_file={self.crt} -c ssl_key_file={self.key} -c ssl_ca_file={self.root / 'client-ca.crt'}"
        )
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", opts, "start"
        )
        self.running = True


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("client-certs")
    crt, key = self_signed(directory, "client", CLIENT_CN)
    return {"crt": crt, "key": key}


@pytest.fixture(scope="module")
def tls_pg(certs: dict[str, Path]) -> Iterator[TlsPostgres]:
    pg = TlsPostgres(certs["crt"])
    try:
        pg.init()
        pg.createdb("tyrum")
        yield pg
    finally:
        pg.destroy()


def url(pg: PrivatePostgres, **options: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"postgres://postgres@127.0.0.1:{pg.port}/tyrum" + (f"?{query}" if query else "")


def backends(pg: PrivatePostgres) -> list[tuple[str, bool, str | None]]:
    """(application name, ssl, client DN) of every client backend on database tyrum but ours."""
    with psycopg.connect(host=str(pg.root), port=pg.port, user="postgres", dbname="postgres") as conn:
        return conn.execute(
            "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.datname = 'tyrum' AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()"
        ).fetchall()


def test_relay_and_edge__every_backend_uses_tls_with_the_configured_options(
    tls_pg: TlsPostgres, certs: dict[str, Path], services: None, log_dir: Path
) -> None:
    dsn = url(tls_pg, sslmode="verify-full", sslrootcert=tls_pg.crt, sslcert=certs["crt"], sslkey=certs["key"])
    env = child_env(DATABASE_URL=dsn, CONN_MAX_AGE="600")
    manage("migrate", "--no-input", "-v", "0", env=env, timeout=180)
    port = free_port()
    edge = Proc("edge-tls", daphne_args(port), {**env, "EDGE_ID": "edge-tls"}, log_dir)
    wait_port(port)
    relay = Proc("relay-tls", relay_args(), env, log_dir)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
        # The lease session, the relay's Django connection and the edge's: the relay opens its Django
        # connection on its first pass after the lease, so wait for all three, not just the lease.
        wait_for(
            lambda: any(name == "tyrum-relay-lease" for name, _, _ in backends(tls_pg)) and len(backends(tls_pg)) >= 3,
            timeout=30,
            what="the relay's lease session and Django connection, and the edge's",
        )
        held = backends(tls_pg)
        assert len(held) >= 3, held
        assert all(ssl and dn == f"/CN={CLIENT_CN}" for _, ssl, dn in held), held
        assert relay.alive(), relay.log()
    finally:
        relay.stop()
        edge.stop()


def test_lease_session__sslmode_require_against_a_server_without_tls_fails_loudly(services: None) -> None:
    plain = PrivatePostgres()
    try:
        plain.init()
        plain.createdb("tyrum")
        env = child_env(DATABASE_URL=url(plain, sslmode="require"))
        script = "import asyncio\nfrom backplane.store import get_store\nasyncio.run(get_store().aopen_session())\n"
        out = subprocess.run(
            [PYTHON, "manage.py", "shell", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0, out.stdout
        assert "SSL" in out.stderr, out.stderr[-2000:]
    finally:
        plain.destroy()
        assert not os.path.exists(plain.root)
