"""Fault points for crash tests: a real SIGKILL at an instant no signal sent from outside can be aimed at.

With `TUNELOOP_FAULT=<point>` in its environment, a process kills itself with SIGKILL (no cleanup, no
`finally`) when it reaches that point; without it, as everywhere outside the crash tests, a point costs one
environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "TUNELOOP_FAULT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
