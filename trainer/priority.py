"""A training run yields the CPU to serving on the same host."""

from __future__ import annotations

import os
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")


def yield_cpu(niceness: int) -> None:
    """Lower this process's CPU priority by `niceness`.

    Linux with autogroup scheduling (on by default in most distributions) first shares the CPU
    between sessions, and nice only ranks processes within one session: a run that the controller
    starts in a session of its own would compete with the service as an equal. So when this process
    leads its own session, the session's autogroup is niced too (an unprivileged process may lower it)."""
    if niceness <= 0:
        return
    os.nice(niceness)
    if os.getsid(0) == os.getpid() and AUTOGROUP.exists():
        try:
            AUTOGROUP.write_text(str(niceness))
        except OSError:  # a kernel that refuses it leaves the plain nice, which is all it honours
            pass
