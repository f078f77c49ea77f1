"""A training run started in its own session (as the controller starts it) really yields the CPU to serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.data import ROOT

pytestmark = pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="kernel without autogroup scheduling")

CHILD = "from trainer.priority import yield_cpu; yield_cpu({n}); import os; print(os.nice(0)); print(open('/proc/self/autogroup').read())"


def child(niceness: int, new_session: bool) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(n=niceness)], cwd=ROOT, capture_output=True, text=True,
                         check=True, start_new_session=new_session).stdout
    nice, autogroup = out.split("\n", 1)
    return int(nice), autogroup.strip()


def test_own_session_nices_the_autogroup_too() -> None:
    # With autogroup, sessions share the CPU first: a plain nice in a session of its own changes nothing
    # against the service's session. The run's autogroup must carry the niceness.
    nice, autogroup = child(10, new_session=True)
    assert nice >= 10
    assert autogroup.endswith("nice 10"), autogroup


def test_inside_a_shell_session_leaves_the_session_alone() -> None:
    # Run by hand from a terminal, the session is the user's shell: only the process itself is niced.
    # A process in the default autogroup (a container's first session, as in CI) reads the file empty.
    before = Path("/proc/self/autogroup").read_text().strip()
    nice, autogroup = child(10, new_session=False)
    assert nice >= 10
    assert autogroup == before
