"""tuneloop/registry.py: publishing, verification, pointers, rollouts and rollbacks, on a directory and on a
real S3-compatible server (the `registry_url` fixture); what only a directory has (its files, the previous
release's names, torn history lines) on a directory."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.data import ROOT
from tuneloop.errors import RegistryUnavailable
from tuneloop.events import ModelEvent
from tuneloop.faults import ENV
from tuneloop.registry import IntegrityError, Registry, RegistryError, sha256_file


def stage_files(stage: Path, payload: bytes = b"onnx-bytes") -> None:
    (stage / "model.onnx").write_bytes(payload)
    (stage / "labels.json").write_text(json.dumps(["neg", "pos"]))
    (stage / "adapter").mkdir()
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"adapter")


def publish(registry: Registry, payload: bytes = b"onnx-bytes", promote: bool = True, parent: int | None = None) -> int:
    with registry.staging() as stage:
        stage_files(stage, payload)
        return registry.publish(
            stage, base_model="base@sha256:0", labels=["neg", "pos"], parent_version=parent, promote=promote
        ).version


def test_publish_writes_a_complete_verified_version(tmp_path: Path, registry_url: str) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    version = publish(registry)
    assert version == 1
    assert registry.live_version() == 1
    manifest = registry.verify(1)
    assert set(manifest.files) == {"model.onnx", "labels.json", "adapter/adapter_model.safetensors"}
    model = registry.version_dir(1) / "model.onnx"
    assert manifest.files["model.onnx"].sha256 == sha256_file(model)
    assert manifest.files["model.onnx"].bytes == len(b"onnx-bytes")
    assert list(registry.staging_dir.iterdir()) == []  # staging cleaned up


def test_versions_increase_and_history_records_every_promotion(tmp_path: Path, registry_url: str) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    assert publish(registry) == 1
    assert publish(registry, b"v2", parent=1) == 2
    assert publish(registry, b"v3", promote=False) == 3
    assert registry.live_version() == 2  # an unpromoted version is stored, not served
    registry.promote(1, action="rollback", reason="test")
    assert registry.live_version() == 1
    assert [(h.action, h.version, h.previous) for h in registry.history()] == [
        ("promote", 1, None),
        ("promote", 2, 1),
        ("rollback", 1, 2),
    ]
    assert registry.manifest(2).parent_version == 1


def test_tampered_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    (registry.version_dir(1) / "adapter" / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="adapter/adapter_model.safetensors has sha256"):
        registry.resolve()


def test_missing_file_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    (registry.version_dir(1) / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="model.onnx is missing"):
        registry.verify(1)


def test_a_tampered_version_cannot_be_promoted(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", promote=False)
    (registry.version_dir(2) / "model.onnx").write_bytes(b"evil")
    with pytest.raises(IntegrityError):
        registry.promote(2)
    assert registry.live_version() == 1


def test_a_crash_while_staging_publishes_nothing(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(RuntimeError, match="killed"), registry.staging() as stage:
        stage_files(stage)
        raise RuntimeError("killed mid-export")
    assert registry.list_versions() == []
    assert registry.live_version() is None
    assert list((tmp_path / ".staging").iterdir()) == []


def test_leftover_staging_dirs_are_never_versions(tmp_path: Path) -> None:
    """A SIGKILL during export leaves a staging dir behind; it must stay invisible."""
    registry = Registry(tmp_path)
    (tmp_path / ".staging" / "staged-crashed").mkdir(parents=True)
    (tmp_path / ".staging" / "staged-crashed" / "model.onnx").write_bytes(b"half")
    assert publish(registry) == 1
    assert registry.list_versions() == [1]


def test_empty_registry_says_what_to_do(tmp_path: Path, registry_url: str) -> None:
    with pytest.raises(RegistryError, match="tuneloop bootstrap"):
        Registry(registry_url, tmp_path / "cache").resolve()


def test_publish_refuses_empty_stage_and_foreign_manifest(tmp_path: Path, registry_url: str) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    with registry.staging() as stage, pytest.raises(RegistryError, match="empty"):
        registry.publish(stage, base_model="b", labels=["a"])
    with registry.staging() as stage:
        (stage / "manifest.json").write_text("{}")
        with pytest.raises(RegistryError, match="manifest.json"):
            registry.publish(stage, base_model="b", labels=["a"])


def test_corrupt_live_pointer_is_reported(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    (tmp_path / "live").write_text("garbage")
    with pytest.raises(RegistryError, match="not a version number"):
        registry.live_version()


def test_a_registry_from_the_previous_release_is_read_through_its_current_pointer_until_a_promotion(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", promote=False, parent=1)
    (tmp_path / "live").rename(tmp_path / "current")  # the pointer's name until this release
    with pytest.warns(FutureWarning, match="current"):
        assert Registry(tmp_path).live_version() == 1
    registry = Registry(tmp_path)
    with pytest.warns(FutureWarning):
        registry.promote(2)
    assert (tmp_path / "live").read_text() == "2\n" and not (tmp_path / "current").exists()
    assert registry.live_version() == 2


def test_a_rollout_file_from_the_previous_release_names_the_live_version_stable(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", promote=False, parent=1)
    written = json.loads(registry.start_rollout(2, "shadow", 0.0, "manual").model_dump_json())
    assert written["live"] == 1 and "stable" not in written
    written["stable"] = written.pop("live")
    (tmp_path / "rollout.json").write_text(json.dumps(written))
    with pytest.warns(FutureWarning, match="stable"):
        rollout = registry.rollout()
    assert rollout is not None and (rollout.version, rollout.live) == (2, 1)


def test_the_previous_release_s_abort_is_read_as_withdraw(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", promote=False, parent=1)
    registry.start_rollout(2, "shadow", 0.0, "manual")
    registry.end_rollout(promote=False, reason="worse")
    lines = registry.storage.history_file.read_text().replace('"action":"withdraw"', '"action":"abort"')
    assert '"action":"abort"' in lines  # a history line as the previous release wrote it
    registry.storage.history_file.write_text(lines)
    assert [h.action for h in registry.history()] == ["promote", "shadow", "withdraw"]
    with pytest.warns(FutureWarning, match="withdraw"):
        event = ModelEvent.model_validate_json('{"action": "abort", "version": 2}')
    assert event.action == "withdraw"


def test_rollout_stages_are_recorded_and_promotion_ends_the_rollout(tmp_path: Path, registry_url: str) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    publish(registry)
    publish(registry, b"v2", promote=False, parent=1)
    shadow = registry.start_rollout(2, "shadow", 0.3, "passed the gate")
    assert (shadow.stage, shadow.share, shadow.live) == ("shadow", 0.0, 1)  # shadow answers nothing
    canary = registry.start_rollout(2, "canary", 0.3, "shadow good")
    assert (canary.stage, canary.share, canary.started_at) == ("canary", 0.3, shadow.started_at)
    assert registry.live_version() == 1  # a candidate is not the live version
    registry.end_rollout(promote=True, reason="canary good")
    assert registry.live_version() == 2 and registry.rollout() is None
    assert [(h.action, h.version, h.previous) for h in registry.history()] == [
        ("promote", 1, None), ("shadow", 2, 1), ("canary", 2, 1), ("promote", 2, 1),
    ]
    # Rolling back skips the rollout stages and returns to the version v2 replaced.
    assert registry.rollback(reason="test") == (2, 1)


def test_a_withdrawn_candidate_leaves_the_live_version_serving(tmp_path: Path, registry_url: str) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    publish(registry)
    publish(registry, b"v2", promote=False)
    registry.start_rollout(2, "canary", 0.1, "manual")
    with pytest.raises(RegistryError, match="v2 is in canary already"):
        publish(registry, b"v3", promote=False)
        registry.start_rollout(3, "shadow", 0.1, "manual")
    registry.end_rollout(promote=False, reason="worse")
    assert registry.live_version() == 1 and registry.rollout() is None
    assert registry.history()[-1].action == "withdraw" and registry.history()[-1].reason == "worse"
    with pytest.raises(RegistryError, match="no rollout"):
        registry.end_rollout(promote=True, reason="again")


def test_a_rollout_refuses_the_live_and_rejected_versions(tmp_path: Path, registry_url: str) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    publish(registry)
    with pytest.raises(RegistryError, match="already the live"):
        registry.start_rollout(1, "shadow", 0.1, "manual")
    with registry.staging() as stage:
        stage_files(stage, b"bad")
        registry.publish(stage, base_model="b", labels=["neg", "pos"], status="rejected",
                         gate={"checks": {"forgetting": {"passed": False}}})
    with pytest.raises(RegistryError, match="rejected by the validation gate \\(forgetting\\)"):
        registry.start_rollout(2, "canary", 0.1, "manual")


def test_promoting_another_version_ends_the_rollout_it_was_judged_against(tmp_path: Path, registry_url: str) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    publish(registry)
    publish(registry, b"v2", parent=1)
    publish(registry, b"v3", promote=False)
    registry.start_rollout(3, "shadow", 0.1, "manual")
    registry.rollback(reason="incident")  # back to v1: v3 was compared with v2
    assert registry.live_version() == 1 and registry.rollout() is None
    assert [h.action for h in registry.history()[-2:]] == ["withdraw", "rollback"]


def test_a_second_rollback_goes_further_back_not_to_the_version_just_left(tmp_path: Path, registry_url: str) -> None:
    # The default target matched the first rollback's own entry, so a second rollback served the bad version again.
    registry = Registry(registry_url, tmp_path / "cache")
    publish(registry)
    publish(registry, b"v2", parent=1)
    publish(registry, b"v3", parent=2)
    assert registry.rollback() == (3, 2)
    assert registry.rollback() == (2, 1)
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback()


def test_a_candidate_is_promoted_only_over_its_parent(tmp_path: Path, registry_url: str) -> None:
    # An operator rolled v2 back to v1 while a run from v2 exported: the run's v3 replaced v1, undoing the rollback.
    registry = Registry(registry_url, tmp_path / "cache")
    publish(registry)
    publish(registry, b"v2", parent=1)
    registry.rollback(reason="v2 misbehaves")
    assert publish(registry, b"v3", parent=2) == 3
    assert registry.live_version() == 1
    assert registry.history()[-1].action == "rollback"
    with pytest.raises(RegistryError, match=r"v1 is live, not v2, the version v3 was trained from"):
        registry.start_rollout(3, "shadow", 0.0, "passed the gate", parent=2)
    assert registry.rollout() is None
    assert publish(registry, b"v4", parent=1) == 4 and registry.live_version() == 4


def test_versions_are_readable_by_other_users(tmp_path: Path) -> None:
    # mkdtemp made version directories 0700: a replica under another uid (BentoML images run as 1034) never got ready.
    registry = Registry(tmp_path)
    publish(registry)
    for path in [registry.version_dir(1), *registry.version_dir(1).rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o444 == 0o444, (path, oct(mode))
        assert not path.is_dir() or mode & 0o111 == 0o111, (path, oct(mode))


def test_a_rejected_version_is_never_resolved_for_serving_even_when_a_pointer_names_it(tmp_path: Path) -> None:
    # Replicas checked hashes only: a hand-edited pointer served a version the gate had rejected.
    registry = Registry(tmp_path)
    publish(registry)
    with registry.staging() as stage:
        stage_files(stage, b"bad")
        registry.publish(stage, base_model="b", labels=["neg", "pos"], parent_version=1, status="rejected")
    registry.storage.live_file.write_text("2\n")
    with pytest.raises(RegistryError, match="rejected by the validation gate"):
        registry.resolve(servable=True)
    assert registry.resolve(2)[0].status == "rejected"  # still readable for analysis


@pytest.mark.parametrize(("edit", "message"), [
    (lambda files: files.pop("model.onnx"), "lists no model.onnx"),
    (lambda files: files.update({"../outside.onnx": files["model.onnx"]}), r"names ../outside.onnx, outside"),
    (lambda files: files.update({"/etc/passwd": files["model.onnx"]}), r"names /etc/passwd, outside"),
])
def test_verify_refuses_a_manifest_without_the_model_or_naming_files_outside_its_version(
    tmp_path: Path, edit: object, message: str
) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    path = registry.version_dir(1) / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["files"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=message):
        registry.verify(1)


def test_a_torn_last_history_line_is_skipped_and_the_next_entry_starts_on_its_own_line(tmp_path: Path) -> None:
    # A crash in the middle of an append left half a line: history() raised, and /admin/rollback answered 500.
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", parent=1)
    with registry.storage.history_file.open("a") as handle:
        handle.write('{"time": "2026-11-29T00:00:00+00:00", "action": "prom')
    with pytest.warns(RuntimeWarning, match="torn"):
        assert [(h.action, h.version) for h in registry.history()] == [("promote", 1), ("promote", 2)]
    with pytest.warns(RuntimeWarning, match="torn"):
        assert registry.rollback() == (2, 1)
    with pytest.warns(RuntimeWarning, match="torn"):
        assert [(h.action, h.version) for h in registry.history()][-1] == ("rollback", 1)


def test_a_rollout_file_that_outlived_its_promotion_is_not_a_rollout(tmp_path: Path) -> None:
    # The pointer was written before rollout.json was removed: a crash in between kept a finished rollout alive,
    # training stayed suppressed, and a later timeout withdrew the version that was serving.
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", parent=1, promote=False)
    registry.start_rollout(2, "canary", 0.2, "test")
    left = registry.storage.rollout_file.read_bytes()
    registry.end_rollout(promote=True, reason="good")
    registry.storage.rollout_file.write_bytes(left)  # the state such a crash left
    assert registry.live_version() == 2 and registry.rollout() is None
    with pytest.raises(RegistryError, match="no rollout is in progress"):
        registry.end_rollout(promote=False, reason="timeout")


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_a_canary_share_outside_0_to_1_is_refused(tmp_path: Path, registry_url: str, share: float) -> None:
    registry = Registry(registry_url, tmp_path / "cache")
    publish(registry)
    publish(registry, b"v2", parent=1, promote=False)
    with pytest.raises(RegistryError, match="share"):
        registry.start_rollout(2, "canary", share, "test")
    assert registry.rollout() is None


def test_a_pointer_change_decided_on_stale_pointers_is_refused(tmp_path: Path, registry_url: str) -> None:
    # Two hosts: each reads the pointers, decides, writes; the one whose read is no longer current must not win.
    here, there = Registry(registry_url, tmp_path / "here"), Registry(registry_url, tmp_path / "there")
    publish(here)
    publish(here, b"v2", promote=False)
    stale = here.storage.pointers()
    there.promote(2, reason="another host")
    assert here.storage.change(stale, 1, None, []) is False
    assert (here.live_version(), [e.version for e in here.history()]) == (2, [1, 2])


def test_publishers_racing_for_a_number_get_one_each(tmp_path: Path, registry_url: str) -> None:
    hosts = [Registry(registry_url, tmp_path / f"host{i}") for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda h: publish(h[1], f"model of host {h[0]}".encode(), promote=False),
                                 enumerate(hosts)))
    assert sorted(versions) == [1, 2, 3, 4]
    reader = Registry(registry_url, tmp_path / "reader")
    for host, version in enumerate(versions):
        assert (reader.version_dir(version) / "model.onnx").read_bytes() == f"model of host {host}".encode()
        reader.verify(version)


def test_an_s3_object_changed_after_publishing_is_refused_before_it_is_cached(tmp_path: Path, s3: object) -> None:
    url = s3.create_bucket(f"test-{uuid.uuid4().hex[:16]}") + "/registry"
    publish(Registry(url, tmp_path / "publisher"), b"the real model")
    replica = Registry(url, tmp_path / "replica")
    blob = replica.storage._blob(replica.manifest(1).files["model.onnx"].sha256)
    replica.storage._call("put_object", Key=blob, Body=b"evil")
    with pytest.raises(IntegrityError, match="model.onnx has sha256 .*, manifest says"):
        replica.resolve(servable=True)
    assert not replica.storage.cache_dir.exists() or list(replica.storage.cache_dir.iterdir()) == []


def test_an_s3_replica_replaces_a_cached_copy_that_changed(tmp_path: Path, s3: object) -> None:
    url = s3.create_bucket(f"test-{uuid.uuid4().hex[:16]}") + "/registry"
    publish(Registry(url, tmp_path / "publisher"), b"the real model")
    replica = Registry(url, tmp_path / "replica")
    _, directory = replica.resolve(servable=True)
    (directory / "model.onnx").write_bytes(b"changed on this host's disk")
    _, directory = replica.resolve(servable=True)
    assert (directory / "model.onnx").read_bytes() == b"the real model"


def test_an_unreachable_s3_registry_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(RegistryUnavailable, match="cannot reach the registry s3://nowhere/registry"):
        Registry("s3://nowhere/registry", tmp_path / "cache").live_version()


def test_an_s3_manifest_naming_a_file_outside_its_version_writes_nothing(tmp_path: Path, s3: object) -> None:
    # The names were checked only after every file was downloaded to download/<name>: whoever could write the
    # bucket could write any path on every replica.
    url = s3.create_bucket(f"test-{uuid.uuid4().hex[:16]}") + "/registry"
    publisher = Registry(url, tmp_path / "publisher")
    publish(publisher)
    manifest = publisher.manifest(1)
    entry = manifest.files["model.onnx"]
    bad = manifest.model_copy(update={"version": 2, "files": {**manifest.files, "../../../escaped.txt": entry}})
    publisher.storage._call("put_object", Key=publisher.storage._key("versions", "v2", "manifest.json"),
                            Body=bad.model_dump_json().encode())
    replica = Registry(url, tmp_path / "cache" / "replica")
    with pytest.raises(IntegrityError, match="outside its directory"):
        replica.verify(2)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_the_live_version_is_read_without_the_rollout(tmp_path: Path) -> None:
    # live_version() parsed rollout.json too: a damaged rollout file stopped training, bootstrap and rollback.
    registry = Registry(tmp_path)
    publish(registry)
    registry.storage.rollout_file.write_text("{not json")
    assert registry.live_version() == 1


def test_promoting_the_version_current_names_writes_live_and_removes_current(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    registry.storage.live_file.rename(registry.storage.legacy_live_file)  # a registry of the previous release
    with pytest.warns(FutureWarning):
        registry.promote(1, reason="again")
    assert registry.storage.live_file.read_text().strip() == "1"
    assert not registry.storage.legacy_live_file.exists()


def test_a_crash_after_a_promotion_ended_a_rollout_leaves_the_withdrawal_in_the_history(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", promote=False)
    publish(registry, b"v3", promote=False)
    registry.start_rollout(2, "shadow", 0.0, "test")
    crash = subprocess.run(
        [sys.executable, "-c", f"from tuneloop.registry import Registry; Registry({str(tmp_path)!r}).promote(3)"],
        env=os.environ | {ENV: "promote:rollout-ended"}, capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    assert registry.live_version() == 1 and registry.rollout() is None
    assert [(e.action, e.version) for e in registry.history()][-1] == ("withdraw", 2)


def test_an_s3_registry_reads_the_credentials_in_the_environment_when_it_is_opened(
    tmp_path: Path, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # boto3's default session kept the first credentials it read for the whole process: after the multi-host
    # test's own S3 server, every later registry in the test process was refused (CI, 2026-12-06).
    url = s3.create_bucket(f"creds-{uuid.uuid4().hex[:12]}") + "/registry"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(RegistryError):
        Registry(url, tmp_path / "wrong").list_versions()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    assert Registry(url, tmp_path / "right").list_versions() == []
