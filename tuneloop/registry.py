"""Filesystem model registry: one directory per version, atomic publish, verified load.

Layout under the root::

    versions/v1/manifest.json     sha256 of every other file, lineage, metrics
    versions/v1/model.onnx ...    the files a server or trainer needs
    live                          the live version's number (the one that serves everyone), replaced by rename;
                                  the previous release named it `current`: read while `live` is absent
    rollout.json                  a candidate in shadow or canary, when one is; replaced by rename
    history.jsonl                 one line per promotion, rollback, rollout stage and withdrawal
    .staging/                     half-written versions; never read by a loader

A version becomes visible only by renaming a complete, fsynced staging directory
into ``versions/``, so a crash leaves either nothing or a whole version behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator, model_validator

from tuneloop import faults
from tuneloop.clock import utc_now
from tuneloop.errors import IntegrityError, RegistryError
from tuneloop.rollout_stage import CANARY, RolloutStage

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"  # every servable version holds it
_CHUNK = 1 << 20


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class Manifest(BaseModel):
    version: int
    created_at: str
    parent_version: int | None = None
    base_model: str
    labels: list[str]
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    status: Literal["accepted", "rejected"] = "accepted"
    gate: dict[str, Any] = Field(default_factory=dict, description="Every validation check with its figures.")
    files: dict[str, FileEntry]

    @property
    def temperature(self) -> float:
        """What the scores' logits are divided by before the softmax (tuneloop/confidence.py); 1 for a version
        published before calibration."""
        return float(self.export.get("confidence", {}).get("temperature", 1.0))

    @property
    def abstain_below(self) -> float | None:
        """The abstain threshold chosen at export (`serve.abstain_below: version`); None: the version has none."""
        value = self.export.get("confidence", {}).get("abstain_below")
        return None if value is None else float(value)


class HistoryEntry(BaseModel):
    time: str
    action: str  # promote, rollback (an older version again), shadow, canary, withdraw (a candidate taken away)
    version: int
    previous: int | None
    reason: str = ""

    @field_validator("action")
    @classmethod
    def _withdraw_was_abort(cls, action: str) -> str:
        return "withdraw" if action == "abort" else action  # the previous release's word, in older history lines


class Rollout(BaseModel):
    """A gated candidate on its way to serving everyone, next to the live version."""

    version: int
    # Written as `live`; a rollout.json from the previous release names it `stable` (read for one release).
    live: int | None = Field(validation_alias=AliasChoices("live", "stable"))
    stage: RolloutStage
    share: float = Field(0.0, description="Share of texts the candidate answers (canary only).")
    started_at: str
    stage_started_at: str

    @model_validator(mode="before")
    @classmethod
    def _deprecated_stable(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stable" in data and "live" not in data:
            warnings.warn(
                "rollout.json names the live version `stable`; it is `live` since this release, and `stable` "
                "is read only until the next one (the next rollout change rewrites the file)",
                FutureWarning, stacklevel=2,
            )
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


class Registry:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / ".staging"
        self.live_file = self.root / "live"
        self.legacy_live_file = self.root / "current"  # the previous release's name; read while `live` is absent
        self.history_file = self.root / "history.jsonl"
        self.rollout_file = self.root / "rollout.json"
        self._warned_legacy = False

    # -- writing ---------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory to assemble a version in; removed unless published."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="staged-", dir=self.staging_dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(
        self,
        staged: Path,
        *,
        base_model: str,
        labels: list[str],
        parent_version: int | None = None,
        training_data: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        export: dict[str, Any] | None = None,
        promote: bool = True,
        reason: str = "published",
        status: Literal["accepted", "rejected"] = "accepted",
        gate: dict[str, Any] | None = None,
    ) -> Manifest:
        """Hash, fsync and rename a staged directory into the next version."""
        if (staged / MANIFEST).exists():
            raise RegistryError(f"{staged} already holds a {MANIFEST}; the registry writes it.")
        files = {
            path.relative_to(staged).as_posix(): FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
            for path in sorted(staged.rglob("*"))
            if path.is_file()
        }
        if not files:
            raise RegistryError(f"nothing to publish: {staged} is empty")
        with self._lock():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            version = max(self.list_versions(), default=0) + 1
            manifest = Manifest(
                version=version,
                created_at=utc_now(),
                parent_version=parent_version,
                base_model=base_model,
                labels=labels,
                training_data=training_data or {},
                metrics=metrics or {},
                export=export or {},
                status=status,
                gate=gate or {},
                files=files,
            )
            (staged / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
            _readable_by_all(staged)
            _fsync_tree(staged)
            faults.point("publish:staged")
            os.rename(staged, self.version_dir(version))
            _fsync_dir(self.versions_dir)
            faults.point("publish:renamed")
            # Only over its parent: if the live version changed meanwhile (an operator's rollback during the run),
            # promoting a child of the version that left would undo that decision. The caller sees it is not live.
            if promote and status == "accepted" and parent_version in (None, self.live_version()):
                self._promote_locked(version, "promote", reason)
        return manifest

    def promote(self, version: int, *, action: str = "promote", reason: str = "") -> None:
        with self._lock():
            self._promote_locked(version, action, reason)

    def _promote_locked(self, version: int, action: str, reason: str) -> None:
        self._servable(version)
        previous = self.live_version()
        rollout = self.rollout()
        if rollout is not None and rollout.version != version:
            # The candidate was being compared with the version that stops serving now; that comparison ends.
            self._end_rollout_locked(rollout, f"ended by {action} to v{version}")
        # The rollout ends before the pointer moves: a crash in between leaves the old version serving and no
        # rollout, never a finished rollout that holds off training (rollout() also ignores one naming the live version).
        if self.rollout_file.exists():
            self.rollout_file.unlink()
            _fsync_dir(self.root)
        faults.point("promote:rollout-ended")
        _write_atomic(self.live_file, f"{version}\n".encode())
        faults.point("promote:live-written")
        if self.legacy_live_file.exists():  # `live` replaces it: one pointer, never two that disagree
            self.legacy_live_file.unlink()
            _fsync_dir(self.root)
        self._log(HistoryEntry(time=utc_now(), action=action, version=version, previous=previous, reason=reason))

    def _servable(self, version: int) -> Manifest:
        manifest = self.verify(version)
        if manifest.status != "accepted":
            failed = [name for name, check in manifest.gate.get("checks", {}).items() if not check.get("passed")]
            raise RegistryError(f"version {version} was rejected by the validation gate ({', '.join(failed)}); it is never served")
        return manifest

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

    def rollback(self, to: int | None = None, reason: str = "rollback") -> tuple[int | None, int]:
        """Serve an earlier version again: `to`, or the one the live version replaced. Returns (from, to)."""
        with self._lock():
            live = self.live_version()
            target = to
            if target is None:
                # The promotion that made the live version live; a rollback's own entry would point back
                # at the version just left.
                entry = next(
                    (e for e in reversed(self.history()) if e.action == "promote" and e.version == live and e.previous),
                    None,
                )
                if entry is None:
                    raise RegistryError(f"v{live} has no earlier version to return to; name one (--to VERSION)")
                target = entry.previous
            if target != live:
                self._promote_locked(target, "rollback", reason)
        return live, target

    # -- rollout: shadow and canary ----------------------------------------------------------

    def rollout(self) -> Rollout | None:
        """The rollout in progress; not one whose candidate is live already (left by a crash mid-promotion)."""
        try:
            rollout = Rollout.model_validate_json(self.rollout_file.read_bytes())
        except FileNotFoundError:
            return None
        return None if rollout.version == self.live_version() else rollout

    def start_rollout(self, version: int, stage: RolloutStage, share: float, reason: str,
                      parent: int | None = None) -> Rollout:
        """Put an accepted version next to the live one, in shadow or as canary; the replicas follow.
        With `parent`, only while that version is live (a candidate is judged against what it was trained from)."""
        with self._lock():
            self._servable(version)
            live = self.live_version()
            if version == live:
                raise RegistryError(f"v{version} is already the live version")
            if stage == CANARY and not 0 < share <= 1:
                raise RegistryError(f"a canary share must be above 0 and at most 1, not {share}")
            if live is None:
                raise RegistryError(f"no version is live to compare v{version} with; promote it (`tuneloop rollback --to {version}`)")
            if parent is not None and parent != live:
                raise RegistryError(
                    f"v{live} is live, not v{parent}, the version v{version} was trained from (a rollback or promotion "
                    f"happened meanwhile); v{version} is kept unpromoted: train again, or `tuneloop rollout start` it"
                )
            previous = self.rollout()
            if previous is not None and previous.version != version:
                raise RegistryError(
                    f"v{previous.version} is in {previous.stage} already; withdraw it first (`tuneloop rollout withdraw`)"
                )
            now = utc_now()
            rollout = Rollout(
                version=version, live=live, stage=stage, share=share if stage == CANARY else 0.0,
                started_at=previous.started_at if previous else now, stage_started_at=now,
            )
            _write_atomic(self.rollout_file, rollout.model_dump_json(indent=2).encode() + b"\n")
            self._log(HistoryEntry(time=now, action=stage, version=version, previous=live, reason=reason))
        return rollout

    def end_rollout(self, promote: bool, reason: str) -> Rollout:
        """Promote the candidate to live, or withdraw it; the live version keeps serving."""
        with self._lock():
            rollout = self.rollout()
            if rollout is None:
                raise RegistryError("no rollout is in progress")
            if promote:
                self._promote_locked(rollout.version, "promote", reason)
            else:
                self._end_rollout_locked(rollout, reason)
        return rollout

    def _end_rollout_locked(self, rollout: Rollout, reason: str) -> None:
        self.rollout_file.unlink(missing_ok=True)
        _fsync_dir(self.root)
        self._log(HistoryEntry(time=utc_now(), action="withdraw", version=rollout.version, previous=rollout.live, reason=reason))

    # -- reading ---------------------------------------------------------------

    def version_dir(self, version: int) -> Path:
        return self.versions_dir / f"v{version}"

    def list_versions(self) -> list[int]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in self.versions_dir.iterdir() if p.name[1:].isdigit())

    def live_version(self) -> int | None:
        """The version that serves everyone (None before the first promotion)."""
        path = self.live_file
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            path = self.legacy_live_file
            try:
                text = path.read_text().strip()
            except FileNotFoundError:
                return None
            if not self._warned_legacy:
                self._warned_legacy = True
                warnings.warn(
                    f"{path} is the previous release's name for the live version pointer; it is read until the "
                    f"next promotion writes {self.live_file.name} (support ends in the next release)",
                    FutureWarning, stacklevel=2,
                )
        if not text.isdigit():
            raise RegistryError(f"{path} holds {text!r}, not a version number; fix or remove it.")
        return int(text)

    def manifest(self, version: int) -> Manifest:
        path = self.version_dir(version) / MANIFEST
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise RegistryError(f"version {version} does not exist in {self.root}") from None

    def verify(self, version: int) -> Manifest:
        """Check every file against its manifest sha256; raise IntegrityError naming the first bad one."""
        manifest = self.manifest(version)
        directory = self.version_dir(version)
        if MODEL_FILE not in manifest.files:
            raise IntegrityError(f"version {version}: its manifest lists no {MODEL_FILE}; it cannot be served")
        for name, entry in manifest.files.items():
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise IntegrityError(f"version {version}: its manifest names {name}, outside its directory")
            path = directory / name
            if not path.is_file():
                raise IntegrityError(f"version {version}: {name} is missing from {directory}")
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise IntegrityError(
                    f"version {version}: {name} has sha256 {actual}, manifest says {entry.sha256}; "
                    "the file was changed after publishing. Republish or roll back to another version."
                )
        return manifest

    def resolve(self, version: int | None = None, servable: bool = False) -> tuple[Manifest, Path]:
        """The verified manifest and directory of a version (default: the live one); with `servable`, only an
        accepted one (whatever a pointer says, a version the gate rejected is never served)."""
        if version is None:
            version = self.live_version()
            if version is None:
                raise RegistryError(f"no model is promoted in {self.root}; run `tuneloop bootstrap` first.")
        manifest = self._servable(version) if servable else self.verify(version)
        return manifest, self.version_dir(version)

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
