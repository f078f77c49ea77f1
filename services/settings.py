"""The settings a service process runs with, read once, when the service is imported.

The request schemas take their limits from them at import, so they are read before any class
that BentoML inspects is defined.
"""

from __future__ import annotations

from tuneloop.config import load_settings

settings = load_settings()
limits = settings.serve
