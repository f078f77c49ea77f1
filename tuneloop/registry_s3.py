"""A registry on S3-compatible object storage (`registry.url = s3://bucket/prefix`), shared by hosts with no disk
in common. boto3 reads the endpoint and credentials from the usual variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).

Keys under the prefix::

    blobs/sha256/<hex>            every file of every version, by content (a file two versions share is stored once)
    versions/v1/manifest.json     written last, only if absent (If-None-Match: *): the version exists whole or not
    state.json                    the live version, the rollout and the history, replaced only if unchanged since
                                  it was read (If-Match: its ETag): writers on different hosts never undo each other

A process keeps the versions it uses under `registry.cache_dir`: downloaded into a private directory, every
file checked against the manifest's sha256, then renamed into place; the registry checks them again before
every load, as it does on a local disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuneloop.errors import RegistryError, RegistryUnavailable
from tuneloop.manifest import MANIFEST, HistoryEntry, Manifest, Rollout, check_files, check_names
from tuneloop.registry_storage import Pointers, RegistryStorage

log = logging.getLogger("tuneloop.registry")

STATE = "state.json"
_REFUSED = {"PreconditionFailed", "ConditionalRequestConflict"}  # a conditional write that lost (412, 409)
_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403"}  # the credentials, not the request


class S3Storage(RegistryStorage):
    def __init__(self, url: str, cache_dir: Path) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise RegistryError(f"{url} is not an s3://bucket/prefix URL")
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
        except ImportError:
            raise RegistryError(
                f"{url} is an S3 registry, and boto3 is not installed: pip install 'tuneloop[serve]' (or [gpu])"
            ) from None
        self.location = url
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.cache_dir = Path(cache_dir) / self.bucket / (self.prefix or "_")
        self.staging_dir = Path(cache_dir) / ".staging"
        self._client_error = ClientError
        self._unreachable = (ConnectionError, HTTPClientError)  # botocore's: no answer, or the connection broke
        # Path-style addresses: S3-compatible servers on a plain host:port have no per-bucket host names.
        # A session of its own reads the AWS_* variables now: boto3's default one keeps the first credentials it
        # read for the life of the process.
        self._s3 = boto3.session.Session().client("s3", config=Config(
            s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=60,
            retries={"max_attempts": 4, "mode": "standard"},
        ))

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _code(self, exc: Exception) -> str:
        return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, self._client_error) else ""

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """An S3 call; an endpoint that does not answer is RegistryUnavailable, credentials it refuses a
        RegistryError saying so, other errors (a refusal with its code, a request botocore cannot make) pass
        through."""
        try:
            return getattr(self._s3, operation)(Bucket=self.bucket, **kwargs)
        except self._unreachable as exc:
            raise RegistryUnavailable(f"cannot reach the registry {self.location}: {exc}") from exc
        except self._client_error as exc:
            if self._code(exc) in _DENIED:
                raise RegistryError(
                    f"the registry {self.location} refused these credentials ({self._code(exc)}): check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may read and write the bucket"
                ) from exc
            raise

    def _get(self, key: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag; None when there is no such key."""
        try:
            answer = self._call("get_object", Key=key)
        except self._client_error as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise RegistryUnavailable(f"cannot read {key} from {self.location}: {exc}") from exc
        return answer["Body"].read(), answer["ETag"]

    # -- pointers ----------------------------------------------------------------

    def _state(self) -> tuple[dict[str, Any], str | None]:
        found = self._get(self._key(STATE))
        if found is None:
            return {"live": None, "rollout": None, "history": []}, None
        body, etag = found
        return json.loads(body), etag

    def pointers(self) -> Pointers:
        state, etag = self._state()
        rollout = Rollout.model_validate(state["rollout"]) if state.get("rollout") else None
        return Pointers(state.get("live"), rollout, (etag, state.get("history", [])))

    def change(self, before: Pointers, live: int | None, rollout: Rollout | None, entries: list[HistoryEntry]) -> bool:
        etag, history = before.token
        state = {"live": live, "rollout": rollout.model_dump() if rollout else None,
                 "history": [*history, *(e.model_dump() for e in entries)]}
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            self._call("put_object", Key=self._key(STATE), Body=json.dumps(state, indent=1).encode(),
                       ContentType="application/json", **condition)
        except self._client_error as exc:
            if self._code(exc) in _REFUSED:
                return False
            raise RegistryUnavailable(f"cannot write {STATE} to {self.location}: {exc}") from exc
        return True

    def history(self) -> list[HistoryEntry]:
        return [HistoryEntry.model_validate(e) for e in self._state()[0].get("history", [])]

    # -- versions ----------------------------------------------------------------

    def list_versions(self) -> list[int]:
        versions, token = [], None
        while True:
            page = self._call("list_objects_v2", Prefix=self._key("versions") + "/", Delimiter="/",
                              **({"ContinuationToken": token} if token else {}))
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if name[1:].isdigit():
                    versions.append(int(name[1:]))
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(versions)

    def manifest(self, version: int) -> Manifest | None:
        found = self._get(self._key("versions", f"v{version}", MANIFEST))
        return None if found is None else Manifest.model_validate_json(found[0])

    def _blob(self, sha256: str) -> str:
        return self._key("blobs", "sha256", sha256)

    def _has(self, key: str) -> bool:
        try:
            self._call("head_object", Key=key)
        except self._client_error as exc:
            if self._code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def add(self, staged: Path, manifest: Manifest) -> bool:
        for name, entry in manifest.files.items():
            if not self._has(self._blob(entry.sha256)):
                with (staged / name).open("rb") as handle:
                    self._call("put_object", Key=self._blob(entry.sha256), Body=handle)
        try:
            self._call("put_object", Key=self._key("versions", f"v{manifest.version}", MANIFEST),
                       Body=(staged / MANIFEST).read_bytes(), ContentType="application/json", IfNoneMatch="*")
        except self._client_error as exc:
            if self._code(exc) in _REFUSED:
                return False
            raise RegistryUnavailable(f"cannot publish v{manifest.version} to {self.location}: {exc}") from exc
        self._into_cache(staged, manifest.version)  # this host has the files already
        return True

    def local_dir(self, manifest: Manifest) -> Path:
        cached = self.cache_dir / f"v{manifest.version}"
        if self._cached(cached, manifest):
            return cached
        check_names(manifest)  # before a single file is written: a name may point anywhere
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix=f"download-v{manifest.version}-", dir=self.staging_dir))
        try:
            for name, entry in manifest.files.items():
                path = download / name
                path.parent.mkdir(parents=True, exist_ok=True)
                found = self._get(self._blob(entry.sha256))
                if found is None:
                    raise RegistryError(f"version {manifest.version}: {name} ({entry.sha256}) is missing from "
                                        f"{self.location}")
                path.write_bytes(found[0])
            check_files(manifest, download)  # before any process can load it
            (download / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
            self._into_cache(download, manifest.version)
        finally:
            shutil.rmtree(download, ignore_errors=True)
        return cached

    @staticmethod
    def _cached(cached: Path, manifest: Manifest) -> bool:
        """Whether `cached` holds the version whole, every file its size; a copy that does not is removed (the
        registry checks every sha256 before a load: a changed file of the same size is refused there)."""
        if not cached.exists():
            return False
        try:
            if Manifest.model_validate_json((cached / MANIFEST).read_bytes()) == manifest and all(
                    (cached / name).stat().st_size == entry.bytes for name, entry in manifest.files.items()):
                return True
        except (OSError, ValueError) as exc:
            log.warning("the cached copy %s is damaged (%s); downloading it again", cached, exc)
        shutil.rmtree(cached, ignore_errors=True)
        return False

    def _into_cache(self, directory: Path, version: int) -> None:
        """Rename a complete directory into the cache; another process that got there first keeps its copy."""
        cached = self.cache_dir / f"v{version}"
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(directory, cached)
        except OSError:
            if not (cached / MANIFEST).is_file():
                raise
