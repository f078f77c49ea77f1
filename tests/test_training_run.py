"""`tuneloop train` when there is nothing to train, in process: the exit code the controller reads and the reason.

The full run (train, export, gate, publish) is tests/test_loop.py's; these need no model, only a registry."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tuneloop.config import load_settings
from tuneloop.errors import RUN_STATUS, ExitCode
from tuneloop.registry import Registry
from tuneloop.runs import RunQueue


def publish(registry: Registry, payload: bytes, promote: bool) -> int:
    with registry.staging() as stage:
        (stage / "model.onnx").write_bytes(payload)
        (stage / "labels.json").write_text(json.dumps(["neg", "pos"]))
        return registry.publish(stage, base_model="base@sha256:0", labels=["neg", "pos"], promote=promote).version


def said(output: str) -> str:
    return " ".join(output.split())  # rich wraps lines at the terminal width


@pytest.fixture
def registry(tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """An empty registry; the run reads its feedback from a store on each backend."""
    for key, value in {"REGISTRY__URL": tmp_path / "registry", "CONTROLLER__STORE_URL": store_url,
                       "TRAIN__NICENESS": 0}.items():
        monkeypatch.setenv(f"TUNELOOP_{key}", str(value))
    load_settings.cache_clear()
    yield Registry(tmp_path / "registry")
    load_settings.cache_clear()


def test_too_little_feedback_is_nothing_to_train(registry: Registry) -> None:
    publish(registry, b"v1", promote=True)
    result = CliRunner().invoke(app, ["train", "--no-progress"])
    assert result.exit_code == ExitCode.NOTHING_TO_DO == 2, result.output
    assert RUN_STATUS[result.exit_code] == "skipped"
    assert "nothing to train: 0 labelled rows arrived since v1 was published" in said(result.output)
    assert registry.list_versions() == [1]


def test_a_rollout_in_progress_is_nothing_to_train(registry: Registry) -> None:
    publish(registry, b"v1", promote=True)
    candidate = publish(registry, b"v2", promote=False)
    registry.start_rollout(candidate, "shadow", 0.1, "test")
    result = CliRunner().invoke(app, ["train", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "nothing to train: v2 is in shadow; let it finish or `tuneloop rollout withdraw` it first" in said(result.output)


def test_a_standby_waits_for_its_run_on_stdin_and_ends_with_stdin(registry: Registry, store_url: str) -> None:
    publish(registry, b"v1", promote=True)
    queue = RunQueue(store_url)
    run_id = queue.request("manual", "test", 0, time.time() - 12)
    assert queue.claim("test-worker") is not None  # as a worker does before handing it over
    result = CliRunner().invoke(app, ["train", "--no-progress", "--standby"], input=f"{run_id} {time.time() - 12}\n")
    assert result.exit_code == 2, result.output  # the run it was handed had nothing to train
    row = queue.get(run_id)
    assert row is not None and (row["status"], row["exit_code"]) == ("skipped", 2)  # it recorded its own end
    output = said(result.output)
    handed = re.search(rf"run {run_id}: handed to this standby ([\d.]+) s after it started", output)
    assert "standby: ready in" in output and handed, output
    assert float(handed.group(1)) >= 12  # more when importing took longer than the 12 s the run is old
    assert "nothing to train: 0 labelled rows arrived since v1 was published" in output
    ended = CliRunner().invoke(app, ["train", "--no-progress", "--standby"], input="")  # the controller went away
    assert ended.exit_code == 0 and "nothing to train" not in ended.output, ended.output


def test_a_run_no_worker_claimed_is_refused_before_training(registry: Registry, store_url: str) -> None:
    publish(registry, b"v1", promote=True)
    run_id = RunQueue(store_url).request("manual", "test", 0, time.time())
    result = CliRunner().invoke(app, ["train", "--no-progress", "--run-id", str(run_id)])
    assert result.exit_code == ExitCode.FAILED, result.output
    assert f"training run {run_id} is requested, not running" in said(result.output)
    assert RunQueue(store_url).get(run_id)["status"] == "requested"  # type: ignore[index]  # left for a worker
