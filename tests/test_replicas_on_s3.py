"""Two `bentoml serve` replicas on one registry on a real S3-compatible server, each with its own cache directory
and no file in common: both load v1 from the bucket, and both swap to v2, promoted by another process, under load
and without a failed request."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.processes import running_service, wait_for
from tests.support.versions import copy_version
from tuneloop.registry import Registry

pytestmark = pytest.mark.slow


def test_replicas_with_no_shared_files_load_and_swap_versions_from_s3(
    s3: object, registry_path: Path, tmp_path: Path
) -> None:
    url = s3.create_bucket(f"replicas-{uuid.uuid4().hex[:12]}") + "/registry"
    publisher = Registry(url, tmp_path / "publisher-cache")
    local = Registry(registry_path)
    assert copy_version(local, 1, publisher, promote=True) == 1
    assert copy_version(local, 1, publisher, promote=False) == 2
    outcomes: list[tuple[str, int | str]] = []
    stop = threading.Event()

    def load(base: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/predict", json={"texts": ["A gem of a film.", "Painfully boring."]})
                    outcomes.append((base, response.json()[0]["model_version"] if response.status_code == 200
                                     else f"HTTP {response.status_code}"))
                except (httpx.HTTPError, ValueError) as exc:
                    outcomes.append((base, f"{type(exc).__name__}: {exc}"))
                time.sleep(0.05)

    caches = {name: tmp_path / name / "cache" for name in ("a", "b")}
    with running_service(url, tmp_path / "a", TUNELOOP_REGISTRY__CACHE_DIR=str(caches["a"])) as a, \
            running_service(url, tmp_path / "b", TUNELOOP_REGISTRY__CACHE_DIR=str(caches["b"])) as b:
        loaders = [threading.Thread(target=load, args=(r.url,), daemon=True) for r in (a, b)]
        for thread in loaders:
            thread.start()
        wait_for(lambda: {v for _, v in outcomes} >= {1}, 30, "both replicas answering with v1")
        publisher.promote(2, reason="promoted from another host")
        wait_for(lambda: all(any(u == r.url and v == 2 for u, v in outcomes[-20:]) for r in (a, b)), 60,
                 "both replicas serving v2")
        time.sleep(1)
        stop.set()
        for thread in loaders:
            thread.join()
    assert [o for o in outcomes if not isinstance(o[1], int)] == []
    for replica in (a, b):  # v1 first, then v2, never v1 again after v2
        versions = [v for u, v in outcomes if u == replica.url]
        assert versions[0] == 1 and versions[-1] == 2 and 1 not in versions[versions.index(2):]
    for cache in caches.values():  # each replica downloaded both versions into its own directory
        assert sorted(p.name for p in next(cache.glob("*/registry")).iterdir()) == ["v1", "v2"]
