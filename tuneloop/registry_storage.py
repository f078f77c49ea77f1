"""Where a registry keeps its versions and pointers: the interface its backends implement.

`tuneloop.registry.Registry` holds the rules (what may be promoted, rolled out, rolled back) and asks its
storage for five things: the pointers (the live version and the rollout) with a token, a compare-and-set
change of them that appends history, the versions' manifests, a version added whole or not at all under a
number nobody took, and a local directory holding a version's files. Backends: a directory on a disk every
process shares (`tuneloop.registry_fs`) and S3-compatible object storage (`tuneloop.registry_s3`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.manifest import HistoryEntry, Manifest, Rollout


@dataclass(frozen=True)
class Pointers:
    """The live version and the rollout as read, with the token a change must present (compare-and-set)."""

    live: int | None
    rollout: Rollout | None  # as stored: one naming the live version is a crash's leftover, not a rollout
    token: Any


class RegistryStorage(ABC):
    location: str  # for messages: a directory or an s3:// URL
    staging_dir: Path  # a local directory where versions are assembled before they are added

    @abstractmethod
    def pointers(self) -> Pointers: ...

    def live(self) -> int | None:
        """The live version alone (a damaged rollout record must not hide it)."""
        return self.pointers().live

    @abstractmethod
    def change(self, before: Pointers, live: int | None, rollout: Rollout | None, entries: list[HistoryEntry]) -> bool:
        """Set the pointers and append `entries` to the history, if they are still `before`; False when another
        writer changed them first (nothing written)."""

    @abstractmethod
    def history(self) -> list[HistoryEntry]: ...

    @abstractmethod
    def list_versions(self) -> list[int]: ...

    @abstractmethod
    def manifest(self, version: int) -> Manifest | None:
        """The version's manifest; None when there is no such version."""

    @abstractmethod
    def add(self, staged: Path, manifest: Manifest) -> bool:
        """Make `staged` (its files, `manifest.json` last) version `manifest.version`, visible whole or not at all;
        False when that number is taken (nothing added)."""

    @abstractmethod
    def local_dir(self, manifest: Manifest) -> Path:
        """A local directory with the version's files (downloaded and checked first where they are remote)."""

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory to assemble a version in; removed unless added."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="staged-", dir=self.staging_dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def remove_abandoned(self, older_than_s: float) -> list[Path]:
        """Remove what exports killed mid-way left in the staging directory (a live one is younger). Returns them."""
        if not self.staging_dir.is_dir():
            return []
        cutoff = time.time() - older_than_s
        abandoned = [path for path in self.staging_dir.iterdir() if path.stat().st_mtime < cutoff]
        for path in abandoned:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return abandoned
