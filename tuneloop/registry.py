"""The model registry: numbered versions, a live pointer, a rollout, and the rules for changing them.

A version is published whole or not at all, verified (every file against its manifest's sha256) before it
is loaded or promoted, and never served when the validation gate rejected it. The pointers change only
by compare-and-set against what was read, so writers on different hosts cannot undo each other: a change
that lost the race is decided again on the new state. Where the versions and pointers live is the
storage's concern: a directory (`tuneloop.registry_fs`, the embedded default) or S3-compatible object
storage (`tuneloop.registry_s3`, for `s3://bucket/prefix`), chosen by the URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tuneloop.clock import utc_now
from tuneloop.config import RegistryConfig
from tuneloop.errors import IntegrityError, RegistryError
from tuneloop.manifest import MANIFEST, MODEL_FILE, FileEntry, HistoryEntry, Manifest, Rollout, check_files, sha256_file
from tuneloop.registry_fs import DirectoryStorage
from tuneloop.registry_storage import Pointers, RegistryStorage
from tuneloop.rollout_stage import CANARY, RolloutStage

__all__ = ["MANIFEST", "MODEL_FILE", "IntegrityError", "Manifest", "Registry", "RegistryError", "Rollout",
           "sha256_file"]

CHANGE_TRIES = 20  # pointer changes that lost a race, decided again before giving up

# What a pointer change decides from the pointers it read: (live, rollout, history entries), or None for no change.
Change = tuple[int | None, Rollout | None, list[HistoryEntry]] | None


def open_storage(url: str | Path, cache_dir: Path | None = None) -> RegistryStorage:
    """The storage a registry URL names: S3 for s3://bucket/prefix, a directory otherwise."""
    if str(url).startswith("s3://"):
        from tuneloop.registry_s3 import S3Storage  # boto3 only where an S3 registry is used

        return S3Storage(str(url), cache_dir or Path("var/registry-cache"))
    return DirectoryStorage(url)


class Registry:
    def __init__(self, url: str | Path | RegistryStorage, cache_dir: Path | None = None) -> None:
        """`url`: a directory or s3://bucket/prefix (registry.url); `cache_dir`: where an S3 registry's versions
        are downloaded and assembled (registry.cache_dir)."""
        self.storage = url if isinstance(url, RegistryStorage) else open_storage(url, cache_dir)
        self.location = self.storage.location

    @classmethod
    def from_config(cls, config: RegistryConfig) -> Registry:
        return cls(config.url, config.cache_dir)

    # -- pointers: read, and changed by compare-and-set ------------------------------

    def _change(self, decide: Callable[[Pointers], Change]) -> None:
        for _ in range(CHANGE_TRIES):
            before = self.storage.pointers()
            change = decide(before)
            if change is None or self.storage.change(before, *change):
                return
        raise RegistryError(f"the pointers of {self.location} changed {CHANGE_TRIES} times while this change was "
                            "decided; try again")

    @staticmethod
    def _effective(pointers: Pointers) -> Rollout | None:
        """The rollout in progress; not one whose candidate is live already (left by a crash mid-promotion)."""
        rollout = pointers.rollout
        return None if rollout is None or rollout.version == pointers.live else rollout

    def live_version(self) -> int | None:
        """The version that serves everyone (None before the first promotion)."""
        return self.storage.live()

    def rollout(self) -> Rollout | None:
        return self._effective(self.storage.pointers())

    def history(self) -> list[HistoryEntry]:
        return self.storage.history()

    def _promotion(self, pointers: Pointers, version: int, action: str, reason: str) -> Change:
        self._servable(version)
        entries = []
        rollout = self._effective(pointers)
        if rollout is not None and rollout.version != version:
            # The candidate was being compared with the version that stops serving now; that comparison ends.
            entries.append(HistoryEntry(time=utc_now(), action="withdraw", version=rollout.version,
                                        previous=rollout.live, reason=f"ended by {action} to v{version}"))
        entries.append(HistoryEntry(time=utc_now(), action=action, version=version, previous=pointers.live,
                                    reason=reason))
        return version, None, entries

    def promote(self, version: int, *, action: str = "promote", reason: str = "") -> None:
        self._change(lambda pointers: self._promotion(pointers, version, action, reason))

    def rollback(self, to: int | None = None, reason: str = "rollback") -> tuple[int | None, int]:
        """Serve an earlier version again: `to`, or the one the live version replaced. Returns (from, to)."""
        moved: list[tuple[int | None, int]] = []

        def decide(pointers: Pointers) -> Change:
            live, target = pointers.live, to
            if target is None:
                # The promotion that made the live version live; a rollback's own entry would point back
                # at the version just left.
                entry = next((e for e in reversed(self.history())
                              if e.action == "promote" and e.version == live and e.previous), None)
                if entry is None:
                    raise RegistryError(f"v{live} has no earlier version to return to; name one (--to VERSION)")
                target = entry.previous
            moved[:] = [(live, target)]
            return None if target == live else self._promotion(pointers, target, "rollback", reason)

        self._change(decide)
        return moved[0]

    def start_rollout(self, version: int, stage: RolloutStage, share: float, reason: str,
                      parent: int | None = None) -> Rollout:
        """Put an accepted version next to the live one, in shadow or as canary; the replicas follow.
        With `parent`, only while that version is live (a candidate is judged against what it was trained from)."""
        started: list[Rollout] = []

        def decide(pointers: Pointers) -> Change:
            self._servable(version)
            live = pointers.live
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
            previous = self._effective(pointers)
            if previous is not None and previous.version != version:
                raise RegistryError(
                    f"v{previous.version} is in {previous.stage} already; withdraw it first (`tuneloop rollout withdraw`)"
                )
            now = utc_now()
            rollout = Rollout(
                version=version, live=live, stage=stage, share=share if stage == CANARY else 0.0,
                started_at=previous.started_at if previous else now, stage_started_at=now,
            )
            started[:] = [rollout]
            return live, rollout, [HistoryEntry(time=now, action=stage, version=version, previous=live, reason=reason)]

        self._change(decide)
        return started[0]

    def end_rollout(self, promote: bool, reason: str) -> Rollout:
        """Promote the candidate to live, or withdraw it; the live version keeps serving."""
        ended: list[Rollout] = []

        def decide(pointers: Pointers) -> Change:
            rollout = self._effective(pointers)
            if rollout is None:
                raise RegistryError("no rollout is in progress")
            ended[:] = [rollout]
            if promote:
                return self._promotion(pointers, rollout.version, "promote", reason)
            return pointers.live, None, [HistoryEntry(time=utc_now(), action="withdraw", version=rollout.version,
                                                      previous=rollout.live, reason=reason)]

        self._change(decide)
        return ended[0]

    # -- versions ----------------------------------------------------------------------

    @property
    def staging_dir(self) -> Path:
        return self.storage.staging_dir

    def staging(self) -> contextlib.AbstractContextManager[Path]:
        """A private local directory to assemble a version in; removed unless published."""
        return self.storage.staging()

    def remove_abandoned(self, older_than_s: float) -> list[Path]:
        """Remove what exports killed mid-way left in the staging directory. Returns them."""
        return self.storage.remove_abandoned(older_than_s)

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
        """Hash a staged directory and add it as the next version, promoted when asked and accepted."""
        if (staged / MANIFEST).exists():
            raise RegistryError(f"{staged} already holds a {MANIFEST}; the registry writes it.")
        files = {
            path.relative_to(staged).as_posix(): FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
            for path in sorted(staged.rglob("*"))
            if path.is_file()
        }
        if not files:
            raise RegistryError(f"nothing to publish: {staged} is empty")
        for _ in range(CHANGE_TRIES):  # another publisher may take the number first: take the next one
            manifest = Manifest(
                version=max(self.storage.list_versions(), default=0) + 1, created_at=utc_now(),
                parent_version=parent_version, base_model=base_model, labels=labels,
                training_data=training_data or {}, metrics=metrics or {}, export=export or {}, status=status,
                gate=gate or {}, files=files,
            )
            (staged / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
            if self.storage.add(staged, manifest):
                break
        else:
            raise RegistryError(f"{CHANGE_TRIES} version numbers were taken by other publishers meanwhile; try again")
        if promote and status == "accepted":
            # Only over its parent: if the live version changed meanwhile (an operator's rollback during the run),
            # promoting a child of the version that left would undo that decision. The caller sees it is not live.
            self._change(lambda pointers: self._promotion(pointers, manifest.version, "promote", reason)
                         if parent_version in (None, pointers.live) else None)
        return manifest

    def list_versions(self) -> list[int]:
        return self.storage.list_versions()

    def manifest(self, version: int) -> Manifest:
        manifest = self.storage.manifest(version)
        if manifest is None:
            raise RegistryError(f"version {version} does not exist in {self.location}")
        return manifest

    def version_dir(self, version: int) -> Path:
        """A local directory with the version's files (an S3 registry downloads them first)."""
        return self.storage.local_dir(self.manifest(version))

    def _checked(self, version: int) -> tuple[Manifest, Path]:
        manifest = self.manifest(version)
        directory = self.storage.local_dir(manifest)
        check_files(manifest, directory)
        return manifest, directory

    def verify(self, version: int) -> Manifest:
        """Check every local file against its manifest sha256; raise IntegrityError naming the first bad one."""
        return self._checked(version)[0]

    def _servable(self, version: int) -> tuple[Manifest, Path]:
        manifest, directory = self._checked(version)
        if manifest.status != "accepted":
            failed = [name for name, check in manifest.gate.get("checks", {}).items() if not check.get("passed")]
            raise RegistryError(f"version {version} was rejected by the validation gate ({', '.join(failed)}); it is never served")
        return manifest, directory

    def resolve(self, version: int | None = None, servable: bool = False) -> tuple[Manifest, Path]:
        """The verified manifest and local directory of a version (default: the live one); with `servable`, only an
        accepted one (whatever a pointer says, a version the gate rejected is never served)."""
        if version is None:
            version = self.live_version()
            if version is None:
                raise RegistryError(f"no model is promoted in {self.location}; run `tuneloop bootstrap` first.")
        return self._servable(version) if servable else self._checked(version)
