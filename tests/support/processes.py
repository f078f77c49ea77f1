"""The processes the tests start (the CLI, `bentoml serve`, the controller, Prometheus) and the one way they wait.

The launchers are the CLI package's (`cli/processes.py`, shared with the demo and the benchmarks); this module
adds what is the tests' own: v1 trained for TEST_EPOCHS, logs in the test's tmp_path, `wait_for`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from cli import processes
from cli.processes import BIN, ROOT, Server, bus_env, free_port, stop_process_group, tree_usage, wait_http
from tests.support.data import TEST_EPOCHS

__all__ = [
    "BIN", "NO_RUNS", "ROOT", "Prometheus", "Server", "bus_env", "free_port", "local_broker", "local_postgres",
    "local_s3", "run_cli", "running_controller", "running_prometheus", "running_service", "stop_process_group",
    "tree_usage", "tuneloop_env", "wait_for", "wait_http",
]

# For controllers that run on the session's shared v1 (registry_path) and store feedback for it: a run their drift
# started would publish into it and every later test would serve that version (CI, 2026-12-05: v2 from the
# outage test's repeated review broke 25 tests). Where ingestion is what a test checks, no run may start.
NO_RUNS = {"TUNELOOP_TRIGGER__MIN_NEW_ROWS": str(10**9)}

local_broker = processes.local_broker()
local_postgres = processes.local_postgres()
local_s3 = processes.local_s3()


def tuneloop_env(registry: Path, **extra: str) -> dict[str, str]:
    """A clean environment on `registry` that trains for at most TEST_EPOCHS, unless `extra` sets the epochs."""
    return processes.tuneloop_env(registry, **({"TUNELOOP_TRAIN__MAX_EPOCHS": TEST_EPOCHS} | extra))


def wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str], interval: float = 0.2) -> None:
    """Until `condition()` holds; fails the test naming `what` after `timeout` seconds (a callable `what` is asked
    then: a log's tail, the state that did not come)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def run_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "tuneloop"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(f"tuneloop {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@contextlib.contextmanager
def running_service(
    registry: Path, tmp_path: Path, wait_ready: bool = True, port: int | None = None, launcher: tuple[str, ...] = (),
    **env: str,
) -> Iterator[Server]:
    """Start `bentoml serve` on a loopback port (a free one by default) and stop it afterwards."""
    with processes.running_service(
        tuneloop_env(registry, **env), tmp_path, port, wait_ready, launcher=launcher
    ) as server:
        yield server


@contextlib.contextmanager
def running_controller(registry: Path, tmp_path: Path, env: dict[str, str], wait: bool = True) -> Iterator[subprocess.Popen]:
    """`tuneloop controller` on `registry` with `env` (bus_env's); its log is `process.log`."""
    log = tmp_path / f"controller-{time.monotonic_ns()}.log"
    with processes.running_controller(tuneloop_env(registry, **env), log, wait) as process:
        yield process


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
    args = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}"]
    with processes.running(args, dict(os.environ), tmp_path / "prometheus.log") as process:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", process, process.log, timeout=60)
        yield Prometheus(url, process.log)
