"""The registry killed for real (SIGKILL) at each step of publishing and promoting: nothing partial is ever visible,
nothing is promoted twice, and the next operation succeeds.

A signal sent from outside cannot be aimed at an instant between two file operations, so the process kills itself
there (`tuneloop.faults`, `TUNELOOP_FAULT=<point>`): a real SIGKILL, no cleanup runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.data import ROOT
from tuneloop.faults import ENV
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
