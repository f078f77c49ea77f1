"""Two controllers on one PostgreSQL store (controller.wait_to_lead): one leads, the other waits and takes over from
a leader killed with SIGKILL: over Kafka mid-stream, no accepted feedback lost or stored twice; with a candidate in
canary, judged to its end by the one that took over."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import processes
from tests.support.processes import NO_RUNS, bus_env, free_port, running_service, wait_for
from tests.support.versions import copy_version
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry
from tuneloop.rollout_stage import CANARY

pytestmark = pytest.mark.slow

def role(env: dict[str, str]) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}/healthz", timeout=2).json()["role"]
    except httpx.HTTPError:
        return "down"


def send(client: httpx.Client, ids: range) -> list[str]:
    items = [{"text": f"feedback text number {i}, a fine film", "label": "positive" if i % 2 else "negative",
              "feedback_id": f"fb-{i}"} for i in ids]
    response = client.post("/feedback/batch", json={"items": items})
    assert response.status_code == 202, response.text
    return response.json()["feedback_ids"]


def test_a_killed_leader_is_replaced_and_every_accepted_feedback_is_stored_once(
    kafka: object, postgres: object, registry_path: Path, tmp_path: Path
) -> None:
    url = postgres.create_database(f"failover_{uuid.uuid4().hex[:12]}")
    first = bus_env("kafka", tmp_path, kafka.bootstrap_servers, TUNELOOP_CONTROLLER__STORE_URL=url,
                    TUNELOOP_CONTROLLER__WAIT_TO_LEAD="true") | NO_RUNS
    second = first | {"TUNELOOP_CONTROLLER__PORT": str(free_port())}
    store = FeedbackStore(url)
    accepted: list[str] = []
    with running_service(registry_path, tmp_path, **first) as server, server.client() as client, \
            processes.running_controller(registry_path, tmp_path, first) as leader:
        wait_for(lambda: role(first) == "leader", 30, "the first controller to lead")
        with processes.running_controller(registry_path, tmp_path, second):
            assert role(second) == "waiting"
            accepted += send(client, range(40))
            wait_for(lambda: store.count() == 40, 60, "40 rows stored by the leader")
            accepted += send(client, range(40, 80))  # in Kafka; the leader may be storing them as it dies
            killed = time.monotonic()
            os.killpg(leader.pid, signal.SIGKILL)
            wait_for(lambda: role(second) == "leader", 60, "the waiting controller to lead")
            failover_s = time.monotonic() - killed
            accepted += send(client, range(80, 100))
            wait_for(lambda: store.count() == 100, 90, lambda: f"100 rows stored, {store.count()} so far")
            consuming_s = time.monotonic() - killed
    stored = [row["feedback_id"] for row in store.feedback_rows()]
    store.close()
    print(f"failover: the waiting controller led {failover_s:.1f} s after the leader's SIGKILL, "
          f"and had stored every accepted row {consuming_s:.1f} s after it")
    assert sorted(stored) == sorted(accepted) and len(set(stored)) == 100
    assert failover_s < 15  # the dead session ends with its socket; the waiting one tries every LOCK_CHECK_S
    # Its consumer gets the partitions at once, not when Kafka gives up on the dead one (session timeout, 45 s).
    assert consuming_s < 20


def test_the_controller_that_takes_over_judges_the_rollout_in_progress_to_its_end(
    postgres: object, registry_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "registry"
    registry = Registry(path)  # its own: the session's v1 must stay alone and live
    assert copy_version(Registry(registry_path), 1, registry, promote=True) == 1
    assert copy_version(Registry(registry_path), 1, registry, promote=False) == 2
    url = postgres.create_database(f"rollout_{uuid.uuid4().hex[:12]}")
    first = bus_env("embedded", tmp_path, TUNELOOP_CONTROLLER__STORE_URL=url, TUNELOOP_CONTROLLER__WAIT_TO_LEAD="true",
                    TUNELOOP_ROLLOUT__STAGE_TIMEOUT_S="12") | NO_RUNS  # no feedback comes: withdrawn at 12 s
    second = first | {"TUNELOOP_CONTROLLER__PORT": str(free_port())}
    with processes.running_controller(path, tmp_path, first) as leader:
        wait_for(lambda: role(first) == "leader", 30, "the first controller to lead")
        with processes.running_controller(path, tmp_path, second) as standby:
            registry.start_rollout(2, CANARY, 0.1, "failover test", parent=1)  # its 12 s start now
            os.killpg(leader.pid, signal.SIGKILL)  # well before the stage times out
            assert registry.rollout() is not None
            wait_for(lambda: registry.rollout() is None, 60, "the rollout to end")
            # The one that took over judged it (it logs the verdict just after the registry changed).
            wait_for(lambda: "rollout v2 canary -> withdraw: timeout" in standby.log.read_text(), 10,
                     lambda: f"the standby's verdict in its log:\n{standby.log.read_text()[-3000:]}")
    assert registry.live_version() == 1 and registry.history()[-1].action == "withdraw"
