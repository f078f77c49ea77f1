"""What a registry holds, whatever holds it: a version's manifest, the history of pointer changes, a rollout.

A manifest names every file of a version with its sha256 and size; whoever loads a version checks the files
against it first (`tuneloop.registry.Registry.verify`).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator

from tuneloop.errors import IntegrityError
from tuneloop.rollout_stage import RolloutStage

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


def check_names(manifest: Manifest) -> None:
    """The manifest lists the model and names no file outside its version; raise IntegrityError otherwise."""
    if MODEL_FILE not in manifest.files:
        raise IntegrityError(f"version {manifest.version}: its manifest lists no {MODEL_FILE}; it cannot be served")
    for name in manifest.files:
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise IntegrityError(f"version {manifest.version}: its manifest names {name}, outside its directory")


def check_files(manifest: Manifest, directory: Path) -> None:
    """Every file of `manifest` in `directory` with its sha256; raise IntegrityError naming the first that is not."""
    version = manifest.version
    check_names(manifest)
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"version {version}: {name} is missing from {directory}")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise IntegrityError(
                f"version {version}: {name} has sha256 {actual}, manifest says {entry.sha256}; "
                "the file was changed after publishing. Republish or roll back to another version."
            )
