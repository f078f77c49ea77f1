"""Training runs as requests in the store (tuneloop/runs.py): one claimant each, heartbeats, ends, expiry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tuneloop.errors import RunWithdrawn
from tuneloop.runs import RunQueue, heartbeats
from tuneloop.store_backends import open_database


def test_a_request_is_claimed_once_and_ends_once(store_url: str) -> None:
    queue = RunQueue(store_url)
    first, second = (queue.request("drift", f"test {i}", new_rows=5, now=time.time()) for i in range(2))
    assert [r["status"] for r in queue.active()] == ["requested", "requested"]
    claimed = queue.claim("host-a:1")
    assert claimed is not None and claimed.run_id == first  # oldest first
    row = queue.get(first)
    assert row is not None and (row["status"], row["worker"]) == ("running", "host-a:1")
    assert queue.heartbeat(first) and not queue.heartbeat(second)  # only a running run beats
    queue.started(first, 4242, Path("/var/runs/run-1.log"))
    assert queue.finish_by_exit_code(first, 3)
    assert not queue.finish_by_exit_code(first, 0)  # its end is recorded once: the worker's late word changes nothing
    row = queue.get(first)
    assert row is not None and (row["status"], row["exit_code"], row["pid"]) == ("rejected", 3, 4242)
    assert not queue.heartbeat(first)
    assert [r["id"] for r in queue.active()] == [second]


def test_concurrent_workers_never_claim_one_request_twice(store_url: str) -> None:
    queue = RunQueue(store_url)
    requested = {queue.request("manual", "test", 0, time.time()) for _ in range(24)}
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        own = RunQueue(store_url)  # a connection of its own, as a worker on another host has
        try:
            while (run := own.claim(name)) is not None:
                claims.setdefault(name, []).append(run.run_id)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the thread's name
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    claimed = [run_id for ids in claims.values() for run_id in ids]
    assert sorted(claimed) == sorted(requested)  # each exactly once
    assert {r["worker"] for r in queue.all()} == set(claims)


def test_a_silent_run_is_failed_by_its_missing_heartbeat_and_a_beating_one_is_not(store_url: str) -> None:
    queue = RunQueue(store_url)
    silent, beating = (queue.request("drift", "test", 0, time.time()) for _ in range(2))
    queue.claim("gone:1"), queue.claim("here:1")
    time.sleep(0.3)
    assert queue.heartbeat(beating)
    assert queue.expire(timeout_s=0.2) == [silent]
    row = queue.get(silent)
    assert row is not None and row["status"] == "failed" and "no heartbeat for 0.2 s" in row["detail"]
    assert not queue.heartbeat(silent)  # the process, if it lives, learns it was withdrawn
    assert not queue.finish_by_exit_code(silent, 0)  # and cannot turn it into a success afterwards
    assert [r["id"] for r in queue.active()] == [beating]


def test_heartbeats_beat_from_a_thread_and_report_a_withdrawn_run(store_url: str) -> None:
    queue = RunQueue(store_url)
    run_id = queue.request("drift", "test", 0, time.time())
    with pytest.raises(RunWithdrawn, match="requested, not running"):  # nobody claimed it: not this process's
        with heartbeats(queue, run_id, timeout_s=0.6, on_withdrawn=lambda: None):
            pass
    queue.claim("w:1")
    withdrawn = threading.Event()
    with heartbeats(queue, run_id, timeout_s=0.6, on_withdrawn=withdrawn.set):
        time.sleep(0.5)
        assert queue.expire(timeout_s=0.3) == []  # beaten every 0.1 s
        queue.finish(run_id, "failed", None, "withdrawn by the test")  # as the controller's expiry does
        assert withdrawn.wait(2)


def test_runs_recorded_before_requests_and_heartbeats_keep_their_rows(tmp_path: Path) -> None:
    """A store whose training_runs came with the controller's records (before version 2) opens with its runs."""
    url = str(tmp_path / "store.db")
    database = open_database(url)
    database.execute(
        "CREATE TABLE training_runs (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, reason TEXT NOT NULL, "
        "started_at TEXT NOT NULL, started_unix DOUBLE PRECISION NOT NULL, finished_at TEXT, status TEXT NOT NULL, "
        "exit_code INTEGER, pid INTEGER, new_rows INTEGER NOT NULL, log_path TEXT)")
    for status in ("succeeded", "running"):  # the running one's process, of that release, beats no more
        database.execute("INSERT INTO training_runs (source, reason, started_at, started_unix, status, new_rows) "
                         "VALUES ('drift', 'old', '2026-01-01T00:00:00Z', 1.0, ?, 7)", (status,))
    database.close()
    queue = RunQueue(url)
    old, left_running = queue.all()
    assert (old["status"], old["new_rows"], old["worker"]) == ("succeeded", 7, None)
    assert queue.claim("w:1") is None and queue.last_started() == 1.0
    assert queue.expire(timeout_s=60) == [left_running["id"]]  # it would have blocked every trigger for ever


def test_a_request_no_worker_claims_is_failed_so_that_another_can_be_requested(store_url: str) -> None:
    queue = RunQueue(store_url)
    stale = queue.request("drift", "test", 0, time.time() - 100)
    fresh = queue.request("drift", "test", 0, time.time())
    assert queue.expire(timeout_s=60) == []  # without a claim timeout, requests wait
    assert queue.expire(timeout_s=60, claim_timeout_s=50) == [stale]
    row = queue.get(stale)
    assert row is not None and "no worker claimed it in 50 s" in row["detail"]
    assert [r["id"] for r in queue.active()] == [fresh]
