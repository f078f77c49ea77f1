"""A real S3-compatible server (versitygw, serving a directory) on 127.0.0.1, built from the Go module proxy.

    python deploy/s3/local_server.py run [--port 7070]   # foreground; prints the AWS_* variables; Ctrl-C stops it

The binary is built once with `go install` into ``.s3/bin`` (needs Go; the module proxy must be reachable);
objects live in a fresh temporary directory each start. The test suite starts one per session.
"""

from __future__ import annotations

import argparse
import contextlib
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

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = ROOT / ".s3" / "bin"
MODULE = "github.com/versity/versitygw/cmd/versitygw@v1.8.0"


class ServerError(RuntimeError):
    pass


def binary() -> Path:
    """versitygw, built first when missing."""
    built = BIN / "versitygw"
    if built.is_file():
        return built
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None)
    if go is None:
        raise ServerError("Go is needed to build the S3 server (versitygw): install Go 1.24 or newer")
    BIN.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([go, "install", MODULE], env=os.environ | {"GOBIN": str(BIN)}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise ServerError(f"go install {MODULE} failed:\n{done.stderr[-2000:]}")
    return built


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class LocalS3:
    def __init__(self, port: int | None = None, workdir: Path | None = None, host: str = "127.0.0.1",
                 launcher: tuple[str, ...] = ()) -> None:
        """`host`: the address it listens on; `launcher`: a command prefix (`ip netns exec NAME`: another host)."""
        self.port = port or free_port()
        self.host, self.launcher = host, launcher
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tuneloop-s3-"))
        self.access_key = "tuneloop"
        self.secret_key = secrets.token_hex(16)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables boto3 (and so tuneloop) reads to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 30) -> LocalS3:
        (self.workdir / "objects").mkdir(parents=True, exist_ok=True)
        output = (self.workdir / "server.log").open("ab")
        self.process = subprocess.Popen(
            [*self.launcher, str(binary()), "--port", f"{self.host}:{self.port}", "posix", str(self.workdir / "objects")],
            env=os.environ | {"ROOT_ACCESS_KEY": self.access_key, "ROOT_SECRET_KEY": self.secret_key},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not _answers(self.host, self.port):
            if self.process.poll() is not None:
                raise ServerError(f"versitygw exited with {self.process.returncode}; see {self.workdir}/server.log")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"versitygw did not answer on {self.endpoint} within {timeout} s")
            time.sleep(0.1)
        return self

    def create_bucket(self, name: str) -> str:
        """A new empty bucket; its s3:// URL."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1",
                              config=Config(s3={"addressing_style": "path"}))
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def kill(self) -> None:
        """SIGKILL, as a crash would: the objects are kept for a restart."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 10) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_s3(port: int | None = None) -> Iterator[LocalS3]:
    server = LocalS3(port).start()
    try:
        yield server
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("--port", type=int, default=7070)
    args = parser.parse_args()
    if args.command == "build":
        print(binary())
        return
    with running_s3(args.port) as server:
        url = server.create_bucket("tuneloop")
        print(f"versitygw on {server.endpoint} (objects in {server.workdir}); Ctrl-C stops it", flush=True)
        for name, value in server.env().items():
            print(f"{name}={value}")
        print(f"TUNELOOP_REGISTRY__URL={url}/registry", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
