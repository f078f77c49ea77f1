"""Shared fixtures: a real bootstrapped model v1 and real `bentoml serve` processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
IMDB = ROOT / "data" / "sentiment" / "imdb.csv"
BIN = Path(sys.executable).parent
# CI trains v1 for at most 3 epochs (about 100 s on 2 cores); `make up` uses the full default.
TEST_EPOCHS = "3"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tuneloop_env(registry: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")}
    env |= {"HF_HUB_OFFLINE": "1", "TUNELOOP_REGISTRY__PATH": str(registry), "TUNELOOP_TRAIN__MAX_EPOCHS": TEST_EPOCHS}
    return env | extra


def run_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "tuneloop"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tuneloop {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding model v1, bootstrapped on the shipped imdb data by the real CLI."""
    path = tmp_path_factory.mktemp("registry")
    run_cli("bootstrap", "--data", str(IMDB), "--no-progress", env=tuneloop_env(path))
    return path


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_service(registry: Path, tmp_path: Path, wait_ready: bool = True, **env: str) -> Iterator[Server]:
    """Start `bentoml serve` on a free loopback port and stop it afterwards."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    process_env = tuneloop_env(registry, BENTOML_HOME=str(tmp_path / "bentoml"), **env)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", "services.service:Classifier", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=process_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until_up(server, need_ready=wait_ready)
        yield server
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group (children too, even when the leader already exited); SIGKILL after the timeout."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until_up(server: Server, need_ready: bool, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    probe = "/readyz" if need_ready else "/livez"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"bentoml serve exited with {server.process.returncode}:\n{server.log_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + probe, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"service not up on {probe} after {timeout} s:\n{server.log_text()}")


@pytest.fixture(scope="module")
def service(registry_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_service(registry_path, tmp_path_factory.mktemp("serve")) as server:
        yield server


def _load_local_broker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_broker", ROOT / "deploy" / "kafka" / "local_broker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_broker = _load_local_broker()


@pytest.fixture(scope="session")
def kafka() -> Iterator[object]:
    """One real Kafka broker (KRaft) on loopback for the whole session."""
    with local_broker.running_kafka() as broker:
        yield broker


def bus_env(kind: str, tmp_path: Path, bootstrap_servers: str = "", **extra: str) -> dict[str, str]:
    """Settings for a service and a controller sharing one bus, store and (with Kafka) fresh topics."""
    env = {
        "TUNELOOP_CONTROLLER__STORE_PATH": str(tmp_path / "store.db"),
        "TUNELOOP_CONTROLLER__PORT": str(free_port()),
        "TUNELOOP_EVENTS__SPOOL_DIR": str(tmp_path / "spool"),
        "TUNELOOP_EVENTS__ACK_TIMEOUT_S": "2",
    }
    if kind == "kafka":
        suffix = tmp_path.name.replace("_", "-")
        env |= {
            "TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
            "TUNELOOP_CONTROLLER__GROUP_ID": f"controller-{suffix}",
        }
        for topic in ("predictions", "feedback", "dead_letter", "model"):
            env[f"TUNELOOP_EVENTS__TOPICS__{topic.upper()}"] = f"{topic}-{suffix}"
    else:
        env["TUNELOOP_EVENTS__EMBEDDED_PATH"] = str(tmp_path / "events.db")
    return env | extra


@contextlib.contextmanager
def running_controller(registry: Path, tmp_path: Path, env: dict[str, str], wait: bool = True) -> Iterator[subprocess.Popen]:
    log = tmp_path / f"controller-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "tuneloop"), "controller"], cwd=ROOT, env=tuneloop_env(registry, **env),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    process.log = log  # type: ignore[attr-defined]
    try:
        if wait:
            url = f"http://127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}/metrics"
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, log.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield process
    finally:
        stop_process_group(process)
