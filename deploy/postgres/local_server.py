"""A real PostgreSQL server on 127.0.0.1 in a temporary directory, from Debian's `postgresql` package.

    python deploy/postgres/local_server.py run [--port 5432]   # foreground; prints the store URL; Ctrl-C stops it

`initdb` makes a fresh cluster each start (password authentication, user `tuneloop`), owned by an
unprivileged user: the caller, or Debian's `postgres` user when the caller is root (PostgreSQL refuses
to run as root). Listens on loopback only. The test suite starts one per session and a database per test.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

USER = "tuneloop"


class ServerError(RuntimeError):
    pass


def bindir() -> Path:
    """Where initdb and postgres are: pg_config's answer, else the newest /usr/lib/postgresql/<n>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent  # type: ignore[arg-type]
    raise ServerError("PostgreSQL is not installed: apt-get install postgresql")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class LocalPostgres:
    def __init__(self, port: int | None = None, workdir: Path | None = None, host: str = "127.0.0.1",
                 launcher: tuple[str, ...] = ()) -> None:
        """`host`: the address it listens on, open to its subnet's clients (with the password) when not loopback;
        `launcher`: a command prefix (`ip netns exec NAME`: another host)."""
        self.port = port or free_port()
        self.host, self.launcher = host, launcher
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tuneloop-postgres-"))
        self.password = secrets.token_hex(12)
        self.process: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # postgres refuses root: run it as Debian's postgres user
            self._as_user = ["runuser", "-u", "postgres", "--"]
            os.chmod(self.workdir, 0o755)
            shutil.chown(self.workdir, "postgres", "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@{self.host}:{self.port}/{database}"

    def _run(self, *command: str | Path) -> list[str]:
        return [*self.launcher, *self._as_user, *map(str, command)]

    def start(self, timeout: float = 60) -> LocalPostgres:
        data = self.workdir / "data"
        if not data.exists():
            secret = self.workdir / "password"
            secret.write_text(self.password)
            if self._as_user:
                shutil.chown(secret, "postgres", "postgres")
            subprocess.run(
                self._run(bindir() / "initdb", "-D", data, "-U", USER, "--pwfile", secret, "--auth", "scram-sha-256",
                          "--locale", "C", "--encoding", "UTF8"),
                check=True, capture_output=True,
            )
            secret.unlink()
            if self.host != "127.0.0.1":  # initdb lets in loopback only
                with (data / "pg_hba.conf").open("a") as hba:
                    hba.write("host all all samenet scram-sha-256\n")
        output = (self.workdir / "server.log").open("ab")
        self.process = subprocess.Popen(
            self._run(bindir() / "postgres", "-D", data, "-p", str(self.port), "-c", f"listen_addresses={self.host}",
                      "-c", f"unix_socket_directories={self.workdir}", "-c", "max_connections=200"),
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise ServerError(f"postgres exited with {self.process.returncode}; see {self.workdir}/server.log")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"postgres did not answer on {self.host}:{self.port} within {timeout} s")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        if not _answers(self.host, self.port):
            return False
        import psycopg

        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def kill(self) -> None:
        """SIGKILL, as a crash would: the data directory is kept for a restart."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30) -> None:
        """A fast shutdown (SIGINT): clients are disconnected, the data is kept."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(port: int | None = None) -> Iterator[LocalPostgres]:
    server = LocalPostgres(port).start()
    try:
        yield server
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--port", type=int, default=5432)
    args = parser.parse_args()
    with running_postgres(args.port) as server:
        url = server.create_database("tuneloop")
        print(f"PostgreSQL on 127.0.0.1:{server.port} (data in {server.workdir}); Ctrl-C stops it", flush=True)
        print(f"TUNELOOP_CONTROLLER__STORE_URL={url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
