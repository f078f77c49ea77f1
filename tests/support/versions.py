"""Versions copied between registries: a test's own registry (a directory or a bucket) starting from a shared v1."""

from __future__ import annotations

import shutil

from tuneloop.registry import MANIFEST, Registry


def copy_version(source: Registry, version: int, target: Registry, promote: bool) -> int:
    """Publish `version` of `source` (files and figures) as the next version of `target`; its number."""
    manifest, directory = source.resolve(version)
    with target.staging() as staged:
        shutil.copytree(directory, staged, dirs_exist_ok=True)
        (staged / MANIFEST).unlink()
        return target.publish(staged, base_model=manifest.base_model, labels=manifest.labels,
                              training_data=manifest.training_data, metrics=manifest.metrics, export=manifest.export,
                              gate=manifest.gate, promote=promote).version
