"""A registry in a directory (the embedded default): every process that uses it shares the disk.

Layout under the root::

    versions/v1/manifest.json     sha256 of every other file, lineage, metrics
    versions/v1/model.onnx ...    the files a server or trainer needs
    live                          the live version's number (the one that serves everyone), replaced by rename;
                                  the previous release named it `current`: read while `live` is absent
    rollout.json                  a candidate in shadow or canary, when one is; replaced by rename
    history.jsonl                 one line per promotion, rollback, rollout stage and withdrawal
    .staging/                     half-written versions; never read by a loader

A version becomes visible only by renaming a complete, fsynced staging directory into ``versions/``,
so a crash leaves either nothing or a whole version behind. Pointer changes hold an flock on `.lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from tuneloop import faults
from tuneloop.errors import RegistryError
from tuneloop.manifest import MANIFEST, HistoryEntry, Manifest, Rollout
from tuneloop.registry_storage import Pointers, RegistryStorage


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _readable_by_all(root: Path) -> None:
    """Directories 0755 and files at least 0644: replicas may run under another uid (BentoML images use 1034),
    and mkdtemp makes a staging directory 0700."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, os.stat(path).st_mode & 0o777 | 0o444)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class DirectoryStorage(RegistryStorage):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / ".staging"
        self.live_file = self.root / "live"
        self.legacy_live_file = self.root / "current"  # the previous release's name; read while `live` is absent
        self.history_file = self.root / "history.jsonl"
        self.rollout_file = self.root / "rollout.json"
        self._warned_legacy = False

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- pointers ----------------------------------------------------------------

    def live(self) -> int | None:
        return self._live_number(self._live_text())

    def pointers(self) -> Pointers:
        live_text = self._live_text()
        try:
            rollout_bytes: bytes | None = self.rollout_file.read_bytes()
        except FileNotFoundError:
            rollout_bytes = None
        live = self._live_number(live_text)
        rollout = Rollout.model_validate_json(rollout_bytes) if rollout_bytes is not None else None
        return Pointers(live, rollout, (live_text, rollout_bytes))

    def _live_text(self) -> tuple[Path, str] | None:
        for path in (self.live_file, self.legacy_live_file):
            try:
                text = path.read_text().strip()
            except FileNotFoundError:
                continue
            if path == self.legacy_live_file and not self._warned_legacy:
                self._warned_legacy = True
                warnings.warn(
                    f"{path} is the previous release's name for the live version pointer; it is read until the "
                    f"next promotion writes {self.live_file.name} (support ends in the next release)",
                    FutureWarning, stacklevel=4,
                )
            return path, text
        return None

    @staticmethod
    def _live_number(live_text: tuple[Path, str] | None) -> int | None:
        if live_text is None:
            return None
        path, text = live_text
        if not text.isdigit():
            raise RegistryError(f"{path} holds {text!r}, not a version number; fix or remove it.")
        return int(text)

    def change(self, before: Pointers, live: int | None, rollout: Rollout | None, entries: list[HistoryEntry]) -> bool:
        with self._lock():
            now = self.pointers()
            if now.token != before.token:
                return False
            # The rollout ends before the pointer moves: a crash in between leaves the old version serving and no
            # rollout, never a finished rollout that holds off training (a rollout naming the live version is
            # ignored too).
            if rollout is None and now.rollout is not None:
                self.rollout_file.unlink()
                _fsync_dir(self.root)
            elif rollout is not None and rollout != now.rollout:
                _write_atomic(self.rollout_file, rollout.model_dump_json(indent=2).encode() + b"\n")
            withdrawals = [e for e in entries if e.action == "withdraw"]
            for entry in withdrawals:  # a rollout that ended is in the history before the pointer moves
                self._log(entry)
            if live != now.live or not self.live_file.exists():
                faults.point("promote:rollout-ended")
                _write_atomic(self.live_file, f"{live}\n".encode())
                faults.point("promote:live-written")
                if self.legacy_live_file.exists():  # `live` replaces it: one pointer, never two that disagree
                    self.legacy_live_file.unlink()
                    _fsync_dir(self.root)
            for entry in entries:
                if entry not in withdrawals:
                    self._log(entry)
        return True

    def _log(self, entry: HistoryEntry) -> None:
        with self.history_file.open("a+b") as handle:
            torn = False
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                torn = handle.read(1) != b"\n"
            # After a line torn by a crash, start on a new one, so that only the torn line is lost.
            handle.write(b"\n" * torn + entry.model_dump_json().encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def history(self) -> list[HistoryEntry]:
        if not self.history_file.exists():
            return []
        entries = []
        for number, line in enumerate(self.history_file.read_text().split("\n"), start=1):
            if not line:
                continue
            try:
                entries.append(HistoryEntry.model_validate_json(line))
            except ValidationError:  # torn by a crash mid-append; the pointer files, not the log, hold the state
                warnings.warn(f"{self.history_file}:{number}: a torn line, skipped", RuntimeWarning, stacklevel=2)
        return entries

    # -- versions ----------------------------------------------------------------

    def version_dir(self, version: int) -> Path:
        return self.versions_dir / f"v{version}"

    def list_versions(self) -> list[int]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in self.versions_dir.iterdir() if p.name[1:].isdigit())

    def manifest(self, version: int) -> Manifest | None:
        try:
            return Manifest.model_validate_json((self.version_dir(version) / MANIFEST).read_bytes())
        except FileNotFoundError:
            return None

    def add(self, staged: Path, manifest: Manifest) -> bool:
        with self._lock():
            target = self.version_dir(manifest.version)
            if target.exists():
                return False
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            _readable_by_all(staged)
            _fsync_tree(staged)
            faults.point("publish:staged")
            os.rename(staged, target)
            _fsync_dir(self.versions_dir)
            faults.point("publish:renamed")
        return True

    def local_dir(self, manifest: Manifest) -> Path:
        return self.version_dir(manifest.version)
