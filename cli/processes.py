"""The processes a demo, a benchmark or a test runs beside itself (a service, a controller, Prometheus):
a free port, start in a process group, wait for an HTTP probe, stop the whole group."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx

from tuneloop.processes import stop_process_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the environment's console scripts: tuneloop, bentoml


def tree_usage(pid: int) -> dict[str, float]:
    """Memory, threads and open file descriptors of a process and all its descendants (a server and its workers)."""
    import psutil  # the benchmarks' and tests' (the `dev` extra): the demo runs without it

    root = psutil.Process(pid)
    rss = threads = fds = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            rss += process.memory_info().rss
            threads += process.num_threads()
            fds += process.num_fds()
        except psutil.NoSuchProcess:  # it exited meanwhile
            continue
    return {"rss_mb": round(rss / 2**20, 1), "threads": threads, "fds": fds}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tuneloop_env(registry: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any TUNELOOP_ setting, offline, on `registry`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")}
    return env | {"HF_HUB_OFFLINE": "1", "TUNELOOP_REGISTRY__URL": str(registry)} | extra


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run a command in its own process group, output to `log`; stop the group on the way out."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    process.log = log  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        stop_process_group(process)


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `url` answers 200; raises with the process's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{url} not up after {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else f"(no log at {log})"


class Server:
    """A running `bentoml serve`: its process, base URL and log."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_service(
    env: dict[str, str], workdir: Path, port: int | None = None, wait_ready: bool = True, log: Path | None = None,
    cwd: Path | None = ROOT, launcher: tuple[str, ...] = (), host: str = "127.0.0.1",
) -> Iterator[Server]:
    """`bentoml serve` on `host` (loopback) and a port (a free one by default), BentoML's home in `workdir`; stopped
    afterwards. Waits for /readyz (a verified model loaded), or only for /livez without `wait_ready`. `launcher` is a
    command the server runs under (`setpriv ...`, `taskset ...`, `ip netns exec ...`)."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = log or workdir / f"serve-{port}.log"
    args = [*launcher, str(BIN / "bentoml"), "serve", "services.service:Classifier",
            "--host", host, "--port", str(port)]
    with running(args, env | {"BENTOML_HOME": str(workdir / "bentoml")}, log, cwd) as process:
        server = Server(process, f"http://{host}:{port}", log)
        wait_http(server.url + ("/readyz" if wait_ready else "/livez"), process, log)
        yield server


@contextlib.contextmanager
def running_controller(
    env: dict[str, str], log: Path, wait: bool = True, timeout: float = 60, cwd: Path | None = ROOT,
    launcher: tuple[str, ...] = (),
) -> Iterator[subprocess.Popen]:
    """`tuneloop controller` with `env` (its address from TUNELOOP_CONTROLLER__HOST and __PORT); waits for /healthz."""
    with running([*launcher, str(BIN / "tuneloop"), "controller"], env, log, cwd) as process:
        if wait:
            host = env.get("TUNELOOP_CONTROLLER__HOST", "127.0.0.1")
            port = env.get("TUNELOOP_CONTROLLER__PORT", "3100")
            wait_http(f"http://{host}:{port}/healthz", process, log, timeout)
        yield process


def bus_env(kind: str, workdir: Path, bootstrap_servers: str = "", **extra: str) -> dict[str, str]:
    """Settings for a service and a controller sharing one bus, store and (with Kafka) fresh topics."""
    env = {
        "TUNELOOP_CONTROLLER__STORE_URL": str(workdir / "store.db"),
        "TUNELOOP_CONTROLLER__PORT": str(free_port()),
        "TUNELOOP_EVENTS__SPOOL_DIR": str(workdir / "spool"),
        "TUNELOOP_EVENTS__ACK_TIMEOUT_S": "2",
    }
    if kind == "kafka":
        suffix = workdir.name.replace("_", "-")
        env |= {
            "TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
            "TUNELOOP_CONTROLLER__GROUP_ID": f"controller-{suffix}",
        }
        for topic in ("predictions", "feedback", "dead_letter", "model"):
            env[f"TUNELOOP_EVENTS__TOPICS__{topic.upper()}"] = f"{topic}-{suffix}"
    else:
        env["TUNELOOP_EVENTS__EMBEDDED_PATH"] = str(workdir / "events.db")
    return env | extra


def _deploy_module(name: str, path: str) -> ModuleType:
    """A script under deploy/ (runnable on its own, so not a package module), loaded by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def local_postgres() -> ModuleType:
    """deploy/postgres/local_server.py: a real PostgreSQL server from Debian's package."""
    return _deploy_module("local_postgres", "postgres/local_server.py")


@functools.cache
def local_s3() -> ModuleType:
    """deploy/s3/local_server.py: a real S3-compatible server, versitygw."""
    return _deploy_module("local_s3", "s3/local_server.py")


@functools.cache
def local_broker() -> ModuleType:
    """deploy/kafka/local_broker.py: a real single-node Kafka from Maven Central jars."""
    return _deploy_module("local_broker", "kafka/local_broker.py")
