"""Shared fixtures: a real bootstrapped model v1 and real `bentoml serve` processes on loopback."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from trainer.data import LabelledTexts, concat, load_csv, split, split3, write_csv
from tuneloop.processes import free_port, stop_process_group, wait_http

ROOT = Path(__file__).resolve().parent.parent
IMDB = ROOT / "data" / "sentiment" / "imdb.csv"
BIN = Path(sys.executable).parent
AMAZON = IMDB.with_name("amazon.csv")
# CI trains v1 for at most 3 epochs (about 100 s on 2 cores); `make up` uses the full default.
TEST_EPOCHS = "3"


@functools.cache
def imdb_parts() -> tuple[Path, LabelledTexts]:
    """Model v1 bootstraps on 70 % of imdb (this CSV); the other 30 % is traffic it has never seen."""
    bootstrap, traffic = split(load_csv(IMDB), 0.3, seed=13)
    return write_csv(Path(tempfile.mkdtemp(prefix="tuneloop-data-")) / "imdb-bootstrap.csv", bootstrap), traffic


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


@functools.cache
def validation_split() -> LabelledTexts:
    """The rows bootstrap checks int8 parity on: its validation and holdout rows of imdb_parts()[0]."""
    from tuneloop.config import Settings

    settings = Settings()
    _, val, holdout = split3(load_csv(imdb_parts()[0]), settings.train.val_fraction, settings.train.holdout_fraction,
                             settings.train.seed)
    return concat([val, holdout])


@pytest.fixture(scope="session")
def torch_reference(registry_path: Path) -> np.ndarray:
    """Logits of the PyTorch model (base + v1's published adapter, unmerged) on validation_split()."""
    from trainer.model import load_adapted, load_tokenizer, predict, resolve_base
    from tuneloop.config import Settings
    from tuneloop.registry import Registry

    manifest, directory = Registry(registry_path).resolve()
    settings = Settings()
    base = resolve_base(settings.model)
    model = load_adapted(base, directory / "adapter", len(manifest.labels), settings.model)
    logits, _ = predict(model, load_tokenizer(base), validation_split().texts, settings.model.max_seq_length)
    return logits


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry holding model v1, bootstrapped on 70 % of the shipped imdb data by the real CLI."""
    path = tmp_path_factory.mktemp("registry")
    run_cli("bootstrap", "--data", str(imdb_parts()[0]), "--no-progress", env=tuneloop_env(path))
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
def running_service(
    registry: Path, tmp_path: Path, wait_ready: bool = True, port: int | None = None, **env: str
) -> Iterator[Server]:
    """Start `bentoml serve` on a loopback port (a free one by default) and stop it afterwards."""
    port = port or free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
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


def wait_until_up(server: Server, need_ready: bool, timeout: float = 180) -> None:
    wait_http(server.url + ("/readyz" if need_ready else "/livez"), server.process, server.log, timeout)


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
            wait_http(f"http://127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}/metrics", process, log, timeout=60)
        yield process
    finally:
        stop_process_group(process)


@pytest.fixture(scope="session")
def clinc_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference scenario's v1: three CLINC150 domains (30 rows per intent), all six domains' intents declared."""
    from trainer import scenario

    path = tmp_path_factory.mktemp("clinc-registry")
    data = write_csv(path.parent / f"{path.name}-bootstrap.csv", scenario.sample(scenario.OLD_DOMAINS, "train", 30, seed=0))
    labels = ",".join(scenario.label_set())
    run_cli("bootstrap", "--data", str(data), "--labels", labels, "--no-progress", env=tuneloop_env(path))
    return path


class Prometheus:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]


@contextlib.contextmanager
def running_prometheus(targets: dict[str, str], tmp_path: Path) -> Iterator[Prometheus]:
    """A real Prometheus (Debian's package) with the shipped config and rules, scraping `targets` every second."""
    import shutil

    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        raise AssertionError("prometheus is not installed: `apt-get install prometheus` (.ci/run does it)")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / rule) for rule in config["rule_files"]]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/-/ready", process, log, timeout=60)
        yield Prometheus(url, log)
    finally:
        stop_process_group(process)
