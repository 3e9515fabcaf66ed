"""A throwaway PostgreSQL cluster on loopback, for the tests of the PostgreSQL store.

Debian's ``postgresql`` package provides the server (``/usr/lib/postgresql/<version>/bin``); when
it is missing and we are root, it is installed with ``apt-get``, so a fresh machine (and CI) needs
nothing by hand. The cluster lives in a temporary directory owned by the ``postgres`` user (initdb
refuses to run as root), listens on 127.0.0.1 at a free port and on a Unix socket in that
directory only, and is stopped and deleted at the end of the test session. Each test gets a fresh
schema of its own in one database (``new_store_url``: the URL's ``search_path`` names it), which
takes milliseconds where a new database takes a large fraction of a second.

Durability settings are off (``fsync``, ``full_page_writes``): the cluster is deleted anyway, and
they change nothing a test can see about visibility or locking.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")

ADMIN = "postgres"
DATABASE = "broker_tests"


class Unusable(RuntimeError):
    """PostgreSQL cannot be installed or started here; the message says why and what to do."""


def server_bin_dir(*, install: bool = True) -> pathlib.Path:
    """The newest installed server's ``bin`` directory, installing Debian's package when missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return pathlib.Path(found[-1]).parent
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unusable(
            "the PostgreSQL server is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "install Debian's package, `apt-get install -y postgresql`, or run ./dev.sh test as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise Unusable(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return server_bin_dir(install=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Cluster:
    """A running throwaway cluster: ``url(database)`` connects as its superuser over TCP."""

    bin_dir: pathlib.Path
    root: pathlib.Path
    port: int
    password: str
    _schemas: int = 0
    _admin: _Admin | None = None

    @property
    def data_dir(self) -> pathlib.Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> pathlib.Path:
        return self.root / "run"

    def url(self, database: str = ADMIN) -> str:
        return f"postgresql://{ADMIN}:{self.password}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls) -> Cluster:
        """initdb in a fresh temporary directory, then start the server and wait until it accepts."""
        bin_dir = server_bin_dir()
        root = pathlib.Path(tempfile.mkdtemp(prefix="broker-pg-"))
        cluster = cls(bin_dir=bin_dir, root=root, port=0, password=secrets.token_hex(16))
        try:
            cluster.socket_dir.mkdir()
            password_file = root / "password"
            password_file.write_text(cluster.password + "\n")
            password_file.chmod(0o600)
            cluster._own()
            cluster._run(
                "initdb",
                "--pgdata",
                str(cluster.data_dir),
                "--username",
                ADMIN,
                "--pwfile",
                str(password_file),
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                # A linguistic default collation, as databases made with en_US.UTF-8 have: the
                # store must sort names in byte order (as SQLite does) whatever the database's.
                "--locale-provider=icu",
                "--icu-locale=en-US",
                "--no-sync",
            )
            password_file.unlink()
            cluster._listen()
            cluster._run(
                "psql",
                "--no-psqlrc",
                "--quiet",
                "--set=ON_ERROR_STOP=1",
                "--dbname",
                cluster.url(),
                "--command",
                f'CREATE DATABASE "{DATABASE}"',
            )
            cluster._admin = _Admin(cluster.url(DATABASE))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _own(self) -> None:
        """Give the directory to the ``postgres`` user when we are root (initdb refuses root)."""
        if os.geteuid() == 0:
            for path in (self.root, *self.root.rglob("*")):
                shutil.chown(path, user="postgres", group="postgres")

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, cwd=self.root)
        if check and done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise Unusable(
                f"{program} failed ({done.returncode}): {done.stdout.strip()} {done.stderr.strip()}\n{tail}"
            )
        return done

    def _listen(self) -> None:
        """Start the server on a free loopback port; another process may take the port first, so
        a failed start is retried on a new one."""
        last: Unusable | None = None
        for _ in range(5):
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} "
                "-c fsync=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB"
            )
            try:
                # -w: pg_ctl returns once the server accepts connections (or fails after -t seconds).
                self._run(
                    "pg_ctl",
                    "--pgdata",
                    str(self.data_dir),
                    "--log",
                    str(self.root / "server.log"),
                    "--options",
                    options,
                    "--wait",
                    "--timeout=60",
                    "start",
                )
                return
            except Unusable as e:
                last = e
                if "could not bind" not in str(e) and "already in use" not in str(e):
                    raise
        assert last is not None
        raise last

    def new_store_url(self) -> str:
        """The URL of a new, empty schema of the test database."""
        assert self._admin is not None, "the cluster is not running"
        self._schemas += 1
        schema = f"test_{self._schemas}_{secrets.token_hex(3)}"
        self._admin.execute(f'CREATE SCHEMA "{schema}"')
        return f"{self.url(DATABASE)}?search_path={schema}"

    def stop(self) -> None:
        """Stop the server at once and delete its directory; safe when it never started."""
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(Unusable, subprocess.TimeoutExpired):
                self._run("pg_ctl", "--pgdata", str(self.data_dir), "--mode=immediate", "--wait", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class _Admin:
    """One superuser connection, kept on a loop of its own thread, so that synchronous fixtures can
    use it from inside (or outside) a test's running event loop."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="throwaway-postgres", daemon=True)
        self._thread.start()
        self._conn: asyncpg.Connection[asyncpg.Record] = self._call(asyncpg.connect(url))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def execute(self, sql: str) -> None:
        self._call(self._conn.execute(sql))

    def close(self) -> None:
        try:
            self._call(self._conn.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
