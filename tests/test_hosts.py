"""tuneloop across hosts: network namespaces on this machine (tests/support/hosts.py), reaching each other only over
a bridge, with no file in common but the code.

    A, B  `bentoml serve`, each in its own directory with its own registry cache
    C, D  `tuneloop controller` with controller.wait_to_lead: C leads, D waits (trigger.local_worker off)
    E     `tuneloop trainer`: claims the runs C requests, trains, publishes
    F     the infrastructure: a real Kafka broker, PostgreSQL server (the feedback store, the run requests) and
          S3-compatible server (versitygw: the registry)

The CLINC150 reference scenario runs across them: v1 (three domains, all six declared) in the bucket, 900 labelled
feedback rows of the three new domains through A and B → Kafka → C → PostgreSQL; a run C requests goes to E, which
publishes v2 to S3; A and B swap under load. The faults, each its own test, in this order on the one cluster (a
later test starts from where the one before left it): the trainer's host dies mid-run; A's link goes down; the
leading controller is SIGKILLed; PostgreSQL and the S3 server restart mid-stream.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import pytest

from cli import processes as launch
from tests.support import hosts
from tests.support.processes import (
    BIN,
    NO_RUNS,
    Server,
    bus_env,
    local_broker,
    local_postgres,
    local_s3,
    tuneloop_env,
    wait_for,
)
from tests.support.versions import copy_version
from trainer import scenario
from tuneloop.errors import StoreError
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry
from tuneloop.runs import RunQueue

WHY_NOT = hosts.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=f"no hosts to run on: {WHY_NOT}"),
              pytest.mark.timeout(1800)]

TOKEN = "multi-host-admin"
HEARTBEAT_TIMEOUT_S = 10


@dataclass
class Load:
    """Paced /predict requests to each service host from this process, each outcome kept with its time."""

    urls: list[str]
    outcomes: list[tuple[str, float, int | str]] = field(default_factory=list)  # url, time, version or the failure
    paused: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Self:
        texts = scenario.sample(scenario.NEW_DOMAINS + scenario.OLD_DOMAINS, "test", 2, seed=5).texts
        for url in self.urls:
            thread = threading.Thread(target=self._run, args=(url, texts), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, url: str, texts: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            for i in range(10**9):
                if self._stop.wait(0.1):
                    return
                if url in self.paused:
                    continue
                try:
                    response = client.post("/predict", json={"texts": [texts[i % len(texts)]]})
                    outcome: int | str = (response.json()[0]["model_version"] if response.status_code == 200
                                          else f"HTTP {response.status_code}: {response.text[:200]}")
                except (httpx.HTTPError, ValueError) as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                self.outcomes.append((url, time.time(), outcome))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def failures(self, url: str | None = None, since: float = 0.0) -> list[tuple[str, float, int | str]]:
        return [o for o in self.outcomes if not isinstance(o[2], int) and (url in (None, o[0])) and o[1] >= since]

    def serving(self, url: str, version: int, last: int = 5) -> bool:
        mine = [o[2] for o in self.outcomes if o[0] == url][-last:]
        return len(mine) == last and all(v == version for v in mine)


@dataclass
class Cluster:
    network: hosts.Network
    hosts: dict[str, hosts.Host]
    services: dict[str, Server]
    env: dict[str, str]  # what every tuneloop process gets (each host adds its own)
    postgres: object
    s3: object
    store: FeedbackStore
    runs: RunQueue
    registry: Registry  # this process's view of the bucket
    workdir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # controllers and the trainer, by host
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def controller_url(self, name: str) -> str:
        return f"http://{self.hosts[name].address}:3100"

    def role(self, name: str) -> str:
        try:
            return httpx.get(f"{self.controller_url(name)}/healthz", timeout=2).json()["role"]
        except httpx.HTTPError:
            return "down"

    def admin(self, name: str, path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.controller_url(name)}/admin/{path}", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"})

    def start_controller(self, name: str) -> None:
        host = self.hosts[name]
        env = self.env | {"TUNELOOP_CONTROLLER__HOST": host.address}
        self.processes[name] = self.stack.enter_context(launch.running_controller(
            env, self.workdir / f"controller-{name}.log", cwd=self._dir(name), launcher=host.launcher))

    def start_trainer(self) -> None:
        host = self.hosts["e"]
        log = self.workdir / f"trainer-{time.monotonic_ns()}.log"
        self.processes["e"] = self.stack.enter_context(launch.running(
            [*host.launcher, str(BIN / "tuneloop"), "trainer"], self.env, log, self._dir("e")))

    def kill_host(self, name: str) -> None:
        """Every process on the host, SIGKILLed: the machine is gone."""
        pids = subprocess.run(["ip", "netns", "pids", self.hosts[name].name], capture_output=True, text=True, check=True).stdout
        for pid in map(int, pids.split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.processes[name].wait()

    def run_log(self, run_id: int) -> Path:
        return self._dir("e") / "var" / "runs" / f"run-{run_id}.log"

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(exist_ok=True)
        return path

    def stored_ids(self, prefix: str) -> list[str] | None:
        """Feedback ids stored with `prefix`; None while the store is away (its connection is replaced next time)."""
        try:
            return [str(r["feedback_id"]) for r in self.store.feedback_rows() if str(r["feedback_id"]).startswith(prefix)]
        except StoreError:
            return None

    def send_feedback(self, items: list[dict], via: str) -> list[str]:
        response = httpx.post(f"{self.services[via].url}/feedback/batch", json={"items": items}, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["feedback_ids"]


@pytest.fixture(scope="module")
def cluster(clinc_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("hosts")
    network = hosts.Network()
    saved = dict(os.environ)
    try:
        named = {name: network.add(name) for name in "abcdef"}
        f = named["f"]
        with contextlib.ExitStack() as infra:
            postgres = local_postgres.LocalPostgres(port=5432, host=f.address, launcher=f.launcher).start()
            infra.callback(postgres.cleanup)
            s3 = local_s3.LocalS3(port=7070, host=f.address, launcher=f.launcher).start()
            infra.callback(s3.cleanup)
            kafka = local_broker.LocalKafka(port=9092, host=f.address, launcher=f.launcher).start()
            infra.callback(kafka.cleanup)
            os.environ.update(s3.env())  # this process reads the bucket too
            registry_url = s3.create_bucket(f"hosts-{uuid.uuid4().hex[:12]}") + "/registry"
            registry = Registry(registry_url, workdir / "test-cache")
            assert copy_version(Registry(clinc_registry), 1, registry, promote=True) == 1
            store_url = postgres.create_database("tuneloop")
            env = tuneloop_env(registry_url) | s3.env() | bus_env("kafka", workdir, kafka.bootstrap_servers) | NO_RUNS | {
                "TUNELOOP_CONTROLLER__STORE_URL": store_url, "TUNELOOP_CONTROLLER__PORT": "3100",
                "TUNELOOP_CONTROLLER__ADMIN_TOKEN": TOKEN, "TUNELOOP_CONTROLLER__WAIT_TO_LEAD": "true",
                "TUNELOOP_TRIGGER__LOCAL_WORKER": "false",
                "TUNELOOP_TRIGGER__HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
                "TUNELOOP_REGISTRY__CACHE_DIR": "registry-cache",  # relative: in each host's own directory
                "TUNELOOP_EVENTS__SPOOL_DIR": "spool",
            }
            env.pop("TUNELOOP_EVENTS__EMBEDDED_PATH", None)
            services = {}
            for name in "ab":
                host = named[name]
                services[name] = infra.enter_context(launch.running_service(
                    env, workdir / name, port=3000, cwd=workdir / name, launcher=host.launcher, host=host.address))
            cluster = Cluster(network, named, services, env, postgres, s3, FeedbackStore(store_url),
                              RunQueue(store_url), registry, workdir)
            infra.enter_context(cluster.stack)
            cluster.start_controller("c")
            wait_for(lambda: cluster.role("c") == "leader", 60, "C to lead")
            cluster.start_controller("d")
            assert cluster.role("d") == "waiting"
            cluster.start_trainer()
            feedback = scenario.clinc().feedback
            items = [{"text": t, "label": label, "feedback_id": f"clinc-{i}"}
                     for i, (t, label) in enumerate(zip(feedback.texts, feedback.labels, strict=True))]
            for start in range(0, len(items), 100):
                cluster.send_feedback(items[start:start + 100], via="ab"[start // 100 % 2])
            wait_for(lambda: cluster.store.count() == len(items), 120,
                     lambda: f"{len(items)} rows stored, {cluster.store.count()} so far")
            yield cluster
    finally:
        os.environ.clear()
        os.environ.update(saved)
        network.remove()


def wait_ended(cluster: Cluster, run_id: int, timeout: float) -> dict:
    def ended() -> bool:
        row = cluster.runs.get(run_id)
        return row is not None and row["status"] not in ("requested", "running")

    wait_for(ended, timeout, lambda: f"run {run_id} to end: {cluster.runs.get(run_id)}", interval=1)
    row = cluster.runs.get(run_id)
    assert row is not None
    return row


def test_the_trainer_host_dying_mid_run_fails_the_run_publishes_nothing_and_a_restarted_trainer_goes_on(
    cluster: Cluster,
) -> None:
    response = cluster.admin("c", "trigger", {"reason": "multi-host test: a run to lose"})
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    wait_for(lambda: "train: from v1" in (cluster.run_log(run_id).read_text() if cluster.run_log(run_id).exists()
                                          else ""), 240, "the run to start training on E")
    assert cluster.runs.get(run_id)["status"] == "running"  # type: ignore[index]
    killed = time.monotonic()
    cluster.kill_host("e")
    row = wait_ended(cluster, run_id, timeout=HEARTBEAT_TIMEOUT_S * 6)
    print(f"trainer host killed: run {run_id} failed {time.monotonic() - killed:.1f} s later")
    assert row["status"] == "failed" and "no heartbeat" in row["detail"], row
    assert cluster.registry.list_versions() == [1]  # nothing published
    cluster.start_trainer()  # E comes back; the next test's run is its


def test_a_clinc_expansion_trains_on_the_trainer_host_and_goes_live_on_both_service_hosts_under_load(
    cluster: Cluster,
) -> None:
    urls = [cluster.services[n].url for n in "ab"]
    with Load(urls) as load:
        wait_for(lambda: all(load.serving(u, 1) for u in urls), 30, "both hosts answering with v1")
        triggered = time.monotonic()
        response = cluster.admin("c", "trigger", {"reason": "multi-host test"})
        assert response.status_code == 202, response.text
        row = wait_ended(cluster, response.json()["run_id"], timeout=900)
        assert row["status"] == "succeeded", (row, cluster.run_log(row["id"]).read_text()[-3000:])
        assert row["worker"] == f"{os.uname().nodename}:{cluster.processes['e'].pid}"  # E's worker claimed it
        wait_for(lambda: all(load.serving(u, 2) for u in urls), 60, "both hosts serving v2")
        trigger_to_live_s = time.monotonic() - triggered
    print(f"trigger -> v2 live on both hosts: {trigger_to_live_s:.0f} s, {len(load.outcomes)} requests")
    assert load.failures() == []
    assert cluster.registry.live_version() == 2


def test_a_service_host_cut_off_keeps_nothing_stale_and_the_other_keeps_serving(cluster: Cluster) -> None:
    a, b = (cluster.services[n].url for n in "ab")
    with Load([a, b]) as load:
        wait_for(lambda: load.serving(a, 2) and load.serving(b, 2), 30, "both hosts serving v2")
        load.paused.add(a)
        cluster.hosts["a"].link_down()
        down = time.time()
        response = cluster.admin("c", "rollback", {"to": 1, "reason": "multi-host test: while A is away"})
        assert response.status_code == 200, response.text
        wait_for(lambda: load.serving(b, 1), 60, "B serving v1")
        time.sleep(5)  # A stays away a while
        cluster.hosts["a"].link_up()
        load.paused.discard(a)
        up = time.time()
        wait_for(lambda: load.serving(a, 1), 90, "A back and serving v1")
    assert load.failures(b) == []  # B kept serving throughout
    print(f"A away {up - down:.0f} s; back on v1 {max(t for u, t, _ in load.outcomes if u == a) - up:.0f} s after")
    # A answered nothing but whole versions once back (a request in flight as the link returned may time out).
    assert [o for o in load.failures(a, since=up + 15)] == []


def test_the_leading_controller_killed_the_standby_leads_and_stores_everything_once(cluster: Cluster) -> None:
    runs_before = len(cluster.runs.all())
    before = cluster.store.count()
    accepted = cluster.send_feedback(
        [{"text": f"when should my oil be changed, car {i}", "label": "oil_change_when", "feedback_id": f"lead-{i}"}
         for i in range(40)], via="a")
    killed = time.monotonic()
    cluster.kill_host("c")
    wait_for(lambda: cluster.role("d") == "leader", 60, "D to lead")
    failover_s = time.monotonic() - killed
    accepted += cluster.send_feedback(
        [{"text": f"how do I change the oil {i}", "label": "oil_change_how", "feedback_id": f"lead-{i}"}
         for i in range(40, 80)], via="b")
    wait_for(lambda: cluster.store.count() == before + 80, 90, lambda: f"80 rows, {cluster.store.count() - before}")
    consuming_s = time.monotonic() - killed
    print(f"controller failover across hosts: D led {failover_s:.1f} s after C's host died, "
          f"every accepted row stored {consuming_s:.1f} s after")
    stored = cluster.stored_ids("lead-")
    assert stored is not None and sorted(stored) == sorted(accepted) and len(stored) == 80
    assert failover_s < 20 and consuming_s < 30
    assert len(cluster.runs.all()) == runs_before  # no run started by the takeover
    assert cluster.admin("d", "rollback", {"to": 2, "reason": "multi-host test: D leads"}).status_code == 200


def test_postgres_and_the_s3_server_restarted_mid_stream_lose_no_feedback_and_swaps_resume(cluster: Cluster) -> None:
    a, b = (cluster.services[n].url for n in "ab")
    accepted: list[str] = []
    refused: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        for i in range(10**6):
            if stop.wait(0.2):
                return
            items = [{"text": f"what is my bank balance, account {i}-{j}", "label": "balance",
                      "feedback_id": f"restart-{i}-{j}"} for j in range(5)]
            try:
                accepted.extend(cluster.send_feedback(items, via="ab"[i % 2]))
            except (AssertionError, httpx.HTTPError) as exc:  # a refusal is the client's to retry; never a loss
                refused.append(str(exc)[:200])

    with Load([a, b]) as load:
        wait_for(lambda: load.serving(a, 2) and load.serving(b, 2), 60, "both hosts serving v2")
        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        time.sleep(3)
        cluster.postgres.stop()
        time.sleep(3)
        cluster.postgres.start()
        time.sleep(3)
        cluster.s3.stop()
        time.sleep(3)
        cluster.s3.start()
        time.sleep(3)
        stop.set()
        sender.join()
        wait_for(lambda: set(accepted) <= set(cluster.stored_ids("restart-") or ()), 120, "every accepted row stored")
        response = cluster.admin("d", "rollback", {"to": 1, "reason": "multi-host test: after the restarts"})
        assert response.status_code == 200, response.text
        wait_for(lambda: load.serving(a, 1) and load.serving(b, 1), 90, "both hosts serving v1 again")
    stored = cluster.stored_ids("restart-")
    print(f"restarts: {len(accepted)} rows accepted, {len(refused)} batches refused, {len(stored)} stored")
    assert stored is not None and len(accepted) > 50 and sorted(stored) == sorted(accepted)
    assert load.failures() == []  # serving never needed PostgreSQL or S3 to answer
