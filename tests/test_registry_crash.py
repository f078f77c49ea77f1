"""The registry killed for real (SIGKILL) at each step of publishing and promoting: nothing partial is ever visible,
nothing is promoted twice, and the next operation succeeds.

A signal sent from outside cannot be aimed at an instant between two file operations, so the process kills itself
there (`tuneloop.faults`, `TUNELOOP_FAULT=<point>`): a real SIGKILL, no cleanup runs.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.data import ROOT, imdb_parts
from tests.support.processes import BIN, running_service, tuneloop_env, wait_for
from tuneloop.events import FeedbackEvent
from tuneloop.faults import ENV
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry

STAGE = """
import json, sys
from tuneloop.registry import Registry
registry = Registry(sys.argv[1])

def publish(payload, parent, promote):
    with registry.staging() as staged:
        (staged / "model.onnx").write_bytes(payload)
        (staged / "labels.json").write_text(json.dumps(["neg", "pos"]))
        return registry.publish(staged, base_model="b", labels=["neg", "pos"], parent_version=parent, promote=promote)
"""
PUBLISH_V2 = STAGE + "publish(b'v2', 1, True)"
PROMOTE_CANARY = STAGE + "registry.end_rollout(promote=True, reason='good')"


def crash(script: str, root: Path, point: str) -> None:
    env = os.environ | {ENV: point}
    result = subprocess.run([sys.executable, "-c", script, str(root)], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]


def registry_with_v1(root: Path) -> Registry:
    subprocess.run([sys.executable, "-c", STAGE + "publish(b'v1', None, True)", str(root)], cwd=ROOT, check=True)
    return Registry(root)


@pytest.mark.parametrize(("point", "live", "versions"), [
    ("publish:staged", 1, [1]),  # the staged directory is no version
    ("publish:renamed", 1, [1, 2]),  # v2 is whole, and not live
    ("promote:rollout-ended", 1, [1, 2]),
    ("promote:live-written", 2, [1, 2]),  # live moved; its history line was not written
])
def test_killed_while_publishing_leaves_a_whole_registry_and_the_next_publish_succeeds(
    tmp_path: Path, point: str, live: int, versions: list[int]
) -> None:
    registry = registry_with_v1(tmp_path)
    crash(PUBLISH_V2, tmp_path, point)
    assert registry.live_version() == live and registry.list_versions() == versions
    for version in versions:
        registry.verify(version)  # every visible version is whole
    assert registry.rollout() is None
    subprocess.run([sys.executable, "-c", STAGE + f"publish(b'next', {live}, True)", str(tmp_path)], cwd=ROOT, check=True)
    assert registry.live_version() == max(versions) + 1
    promoted = [h.version for h in registry.history() if h.action == "promote"]
    assert len(promoted) == len(set(promoted))  # nothing promoted twice


@pytest.mark.parametrize(("point", "live"), [("promote:rollout-ended", 1), ("promote:live-written", 2)])
def test_killed_while_promoting_a_canary_leaves_no_finished_rollout_behind(tmp_path: Path, point: str, live: int) -> None:
    registry = registry_with_v1(tmp_path)
    subprocess.run([sys.executable, "-c", STAGE + "publish(b'v2', 1, False)", str(tmp_path)], cwd=ROOT, check=True)
    registry.start_rollout(2, "canary", 0.2, "test")
    crash(PROMOTE_CANARY, tmp_path, point)
    assert registry.live_version() == live
    assert registry.rollout() is None  # nothing holds training off, nothing will time out and withdraw the live one
    other = 1 if live == 2 else 2
    registry.promote(other, action="rollback" if other == 1 else "promote")  # the next operation works
    assert registry.live_version() == other


FEEDBACK_PER_RUN = 60  # new labelled rows before each run, as traffic would bring them


@pytest.mark.slow
def test_tuneloop_train_killed_while_publishing_never_breaks_serving_and_the_next_run_succeeds(
    registry_path: Path, tmp_path: Path
) -> None:
    """Whole `tuneloop train` runs beside a serving replica, killed after their version became visible and after it
    became live (before either was logged). The other two points (before the rename, between ending a rollout and
    moving `live`) lie on the same code paths and are killed above in a process of their own: a run costs 40 s."""
    registry_dir = Path(shutil.copytree(registry_path, tmp_path / "registry"))
    registry, store = Registry(registry_dir), FeedbackStore(tmp_path / "store.db")
    env = tuneloop_env(registry_dir, TUNELOOP_CONTROLLER__STORE_URL=store.url, TUNELOOP_TRAIN__MAX_EPOCHS="1")
    traffic = imdb_parts()[1]
    rows = iter(zip(traffic.texts, traffic.labels, strict=True))

    def train(point: str | None) -> subprocess.CompletedProcess[str]:
        store.write([], [FeedbackEvent(text=text, label=label) for text, label in itertools.islice(rows, FEEDBACK_PER_RUN)])
        return subprocess.run([str(BIN / "tuneloop"), "train", "--no-progress"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=env | ({ENV: point} if point else {}))

    with running_service(registry_dir, tmp_path) as server, server.client() as client:
        for point in ("publish:renamed", "promote:live-written"):
            result = train(point)
            assert result.returncode == -signal.SIGKILL, (point, result.stdout[-3000:], result.stderr[-3000:])
            for version in registry.list_versions():
                registry.verify(version)  # every visible version is whole
            live = registry.live_version()
            wait_for(lambda: client.get("/model").json()["version"] == live, 60, f"the replica to serve v{live} ({point})")
            answer = client.post("/predict", json={"texts": ["A warm, funny film."]})
            assert answer.status_code == 200 and answer.json()[0]["model_version"] == live, (point, answer.text)
        killed_versions = registry.list_versions()
        result = train(None)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert registry.live_version() == max(killed_versions) + 1  # the next run published and promoted
        wait_for(lambda: client.get("/model").json()["version"] == registry.live_version(), 60, "the replica to swap")
    promoted = [h.version for h in registry.history() if h.action == "promote"]
    assert len(promoted) == len(set(promoted))  # nothing promoted twice
