"""Feedback from HTTP through the bus into the store, on a real Kafka broker and on the embedded log."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import processes
from tests.support.processes import NO_RUNS, bus_env, local_broker, running_service, tree_usage, wait_for
from tuneloop import faults
from tuneloop.bus import EmbeddedBus, KafkaBus
from tuneloop.feedback_store import FeedbackStore

pytestmark = pytest.mark.slow
BUSES = ["embedded", "kafka"]


@pytest.fixture(params=BUSES)
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    servers = request.getfixturevalue("kafka").bootstrap_servers if request.param == "kafka" else ""
    return bus_env(request.param, tmp_path, servers)


def running_controller(registry: Path, tmp_path: Path, env: dict[str, str], wait: bool = True
                       ) -> AbstractContextManager[subprocess.Popen]:
    return processes.running_controller(registry, tmp_path, env | NO_RUNS, wait)


def store(env: dict[str, str]) -> FeedbackStore:
    return FeedbackStore(env["TUNELOOP_CONTROLLER__STORE_URL"])


def open_test_bus(env: dict[str, str]) -> EmbeddedBus | KafkaBus:
    if env.get("TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS"):
        return KafkaBus(env["TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS"])
    return EmbeddedBus(Path(env["TUNELOOP_EVENTS__EMBEDDED_PATH"]))


def dead_letters(env: dict[str, str], expected: int) -> list[dict]:
    topic = env.get("TUNELOOP_EVENTS__TOPICS__DEAD_LETTER", "tuneloop.feedback.dead-letter")
    consumer = open_test_bus(env).consumer("test-reader", [topic])
    letters: list[dict] = []
    deadline = time.monotonic() + 30
    while len(letters) < expected and time.monotonic() < deadline:
        letters += [json.loads(r.value) for r in consumer.poll(100, timeout_s=1.0)]
    consumer.close()
    return letters


def metric(url: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", httpx.get(url).text, re.M)
    return float(match.group(1)) if match else 0.0


def test_feedback_round_trip_joins_predictions_and_stores_each_once(
    setup: dict[str, str], registry_path: Path, tmp_path: Path
) -> None:
    round_trip(setup, registry_path, tmp_path)


def test_feedback_round_trip_over_kafka_into_postgresql(kafka: object, postgres: object, registry_path: Path,
                                                        tmp_path: Path) -> None:
    url = postgres.create_database(f"feedback_{uuid.uuid4().hex[:12]}")
    round_trip(bus_env("kafka", tmp_path, kafka.bootstrap_servers, TUNELOOP_CONTROLLER__STORE_URL=url),
               registry_path, tmp_path)


def round_trip(setup: dict[str, str], registry_path: Path, tmp_path: Path) -> None:
    """Predictions and feedback (joined, by text, resent) over HTTP: each stored once, joined to what was served."""
    with running_service(registry_path, tmp_path, **setup) as server, server.client() as client, running_controller(
        registry_path, tmp_path, setup
    ):
        predictions = client.post("/predict", json={"texts": ["A gem of a film.", "Painfully boring."]}).json()
        single = client.post("/feedback", json={"request_id": predictions[0]["request_id"], "label": "positive"})
        assert single.status_code == 202, single.text
        batch = client.post(
            "/feedback/batch",
            json={"items": [
                {"request_id": predictions[1]["request_id"], "label": "positive", "feedback_id": "fb-joined"},
                {"text": "Brilliant cast, weak ending.", "label": "negative", "feedback_id": "fb-text", "source": "qa"},
            ]},
        )
        assert batch.status_code == 202, batch.text
        assert batch.json()["feedback_ids"] == ["fb-joined", "fb-text"]
        resent = client.post("/feedback", json={"text": "again", "label": "negative", "feedback_id": "fb-text"})
        assert resent.status_code == 202
        wait_for(lambda: store(setup).count() == 3, 60, "3 stored feedback rows")
        metrics = f"http://127.0.0.1:{setup['TUNELOOP_CONTROLLER__PORT']}/metrics"
        wait_for(lambda: metric(metrics, "tuneloop_controller_duplicates_skipped_total") >= 1, 30, "duplicate count")
    rows = {row["feedback_id"]: row for row in store(setup).feedback_rows()}
    first = rows[single.json()["feedback_ids"][0]]
    assert (first["text"], first["label"], first["predicted_label"], first["model_version"]) == (
        "A gem of a film.", "positive", "positive", 1)
    assert (rows["fb-joined"]["text"], rows["fb-joined"]["predicted_label"]) == ("Painfully boring.", "negative")
    assert (rows["fb-text"]["text"], rows["fb-text"]["source"]) == ("Brilliant cast, weak ending.", "qa")
    assert store(setup).count("predictions") >= 2


INVALID = [
    ("unknown label", "/feedback", {"text": "x", "label": "meh"}, "unknown label(s) ['meh']"),
    ("no request_id or text", "/feedback", {"label": "positive"}, "needs a request_id"),
    ("no label", "/feedback", {"text": "x"}, "label"),
    ("label not a string", "/feedback", {"text": "x", "label": 3}, "string"),
    ("blank text", "/feedback", {"text": "\u00a0\u2028", "label": "positive"}, "only whitespace"),
    ("NUL in text", "/feedback", {"text": "a\u0000b", "label": "positive"}, "NUL character"),
    ("bad feedback_id", "/feedback", {"text": "x", "label": "positive", "feedback_id": "a b/c"}, "pattern"),
    ("unknown field", "/feedback/batch", {"items": [{"text": "x", "label": "positive", "colour": "red"}]}, "extra"),
    ("empty batch", "/feedback/batch", {"items": []}, "at least 1"),
    ("one bad item refuses the batch", "/feedback/batch",
     {"items": [{"text": "x", "label": "positive"}, {"text": "y", "label": "meh"}]}, "unknown label"),
]


def test_invalid_feedback_gets_a_4xx_and_stores_nothing(setup: dict[str, str], registry_path: Path, tmp_path: Path) -> None:
    with running_service(registry_path, tmp_path, **setup) as server, server.client() as client:
        for case, path, body, message in INVALID:
            response = client.post(path, json=body)
            assert response.status_code == 400, (case, response.text)
            assert message in response.text, (case, response.text)
        with running_controller(registry_path, tmp_path, setup):
            ok = client.post("/feedback", json={"text": "fine", "label": "positive"})
            assert ok.status_code == 202
            wait_for(lambda: store(setup).count() == 1, 60, "the one valid row")
        assert [r["text"] for r in store(setup).feedback_rows()] == ["fine"]


def test_malformed_and_unjoinable_feedback_is_dead_lettered_with_a_reason(
    setup: dict[str, str], registry_path: Path, tmp_path: Path
) -> None:
    env = setup | {"TUNELOOP_CONTROLLER__JOIN_TIMEOUT_S": "2"}
    feedback_topic = env.get("TUNELOOP_EVENTS__TOPICS__FEEDBACK", "tuneloop.feedback")
    bus = open_test_bus(env)
    bus.ensure_topics([feedback_topic])
    # Written straight to the topic: the service would refuse these with a 400.
    assert bus.publish_many(feedback_topic, [(None, b"{not json"), (None, b'{"label": "positive"}')]) == [True, True]
    with running_service(registry_path, tmp_path, **env) as server, server.client() as client, running_controller(
        registry_path, tmp_path, env
    ):
        orphan = client.post("/feedback", json={"request_id": "never-served", "label": "negative"})
        assert orphan.status_code == 202
        letters = dead_letters(env, expected=3)
    assert len(letters) == 3, letters
    malformed = [letter for letter in letters if "malformed" in letter["reason"]]
    assert sorted(letter["raw"] for letter in malformed) == ['{"label": "positive"}', "{not json"]
    assert any("needs a request_id" in letter["reason"] for letter in malformed)
    orphans = [letter for letter in letters if "did not arrive within 2 s" in letter["reason"]]
    assert len(orphans) == 1 and "never-served" in orphans[0]["raw"]
    assert store(env).count() == 0


def test_controller_crash_between_write_and_commit_stores_nothing_twice(
    setup: dict[str, str], registry_path: Path, tmp_path: Path
) -> None:
    with running_service(registry_path, tmp_path, **setup) as server, server.client() as client:
        items = [{"text": f"review {i}", "label": "positive", "feedback_id": f"crash-{i}"} for i in range(20)]
        assert client.post("/feedback/batch", json={"items": items}).status_code == 202
        crashing = setup | {faults.ENV: "ingest:stored"}
        with running_controller(registry_path, tmp_path, crashing, wait=False) as doomed:
            assert doomed.wait(timeout=60) == -signal.SIGKILL  # wrote the batch, killed before committing offsets
        assert store(setup).count() == 20
        with running_controller(registry_path, tmp_path, setup):
            metrics = f"http://127.0.0.1:{setup['TUNELOOP_CONTROLLER__PORT']}/metrics"
            wait_for(lambda: metric(metrics, "tuneloop_controller_duplicates_skipped_total") == 20, 60,
                     "the redelivered batch to be recognised")
    assert store(setup).count() == 20
    assert sorted(r["feedback_id"] for r in store(setup).feedback_rows()) == sorted(i["feedback_id"] for i in items)


@pytest.fixture
def own_broker() -> Iterator[object]:
    """A broker of this test's own, since the test kills it."""
    broker = local_broker.LocalKafka().start()
    try:
        yield broker
    finally:
        broker.cleanup()


def test_broker_sigkill_mid_stream_loses_and_duplicates_nothing(
    own_broker: object, registry_path: Path, tmp_path: Path
) -> None:
    env = bus_env("kafka", tmp_path, own_broker.bootstrap_servers)
    accepted: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def send_feedback(client: httpx.Client) -> None:
        i = 0
        while not stop.is_set():
            feedback_id = f"kill-{i}"
            response = client.post("/feedback", json={"text": f"text {i}", "label": "negative", "feedback_id": feedback_id})
            if response.status_code == 202:
                accepted.append(feedback_id)
            else:
                failures.append(f"{response.status_code} {response.text}")
            i += 1

    with running_service(registry_path, tmp_path, **env) as server, server.client() as client, running_controller(
        registry_path, tmp_path, env
    ):
        sender = threading.Thread(target=send_feedback, args=(client,))
        sender.start()
        wait_for(lambda: len(accepted) >= 50, 60, "50 accepted before the kill")
        own_broker.kill()
        killed_at = len(accepted)
        wait_for(lambda: len(accepted) >= killed_at + 30, 120, "30 accepted while the broker is down")
        own_broker.start()
        wait_for(lambda: len(accepted) >= killed_at + 60, 120, "more accepted after the restart")
        stop.set()
        sender.join()
        wait_for(lambda: store(env).count() >= len(accepted), 120, f"all {len(accepted)} accepted rows stored")
        spooled = metric(server.url + "/metrics", 'tuneloop_feedback_accepted_total{via="spool"}')
    stored = [r["feedback_id"] for r in store(env).feedback_rows()]
    assert failures == []
    assert sorted(stored) == sorted(accepted)  # every 202 stored, exactly once
    assert spooled > 0  # the outage really was bridged by the spool


def test_with_a_feedback_token_feedback_needs_it_and_predictions_do_not(registry_path: Path, tmp_path: Path) -> None:
    # /feedback drives retraining and rollout verdicts, and anyone who could reach it could send some.
    env = bus_env("embedded", tmp_path) | {"TUNELOOP_SERVE__FEEDBACK_TOKEN": "s3cret"}
    with running_service(registry_path, tmp_path, **env) as server, server.client() as client:
        body = {"text": "fine", "label": "positive"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/feedback", json=body, headers=headers)
            assert response.status_code == 401 and "serve.feedback_token" in response.text, response.text
        batch = client.post("/feedback/batch", json={"items": [body]})
        assert batch.status_code == 401
        assert client.post("/feedback", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 202
        assert client.post("/predict", json={"texts": ["no token needed"]}).status_code == 200


def open_descriptors(pid: int) -> collections.Counter[str]:
    """What a process and its children hold open: sockets, pipes and event fds by kind, files by name."""
    held: collections.Counter[str] = collections.Counter()
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        fd_dir = Path(f"/proc/{process.pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.is_dir() else []:
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            held[target.split(":[")[0] if ":[" in target else Path(target).name] += 1
    return held


OUTAGE_S = 90.0  # a minute and a half of retries, reconnects and spooling, within the suite's time; leaks grow with it


def test_started_before_its_broker_the_loop_stores_every_accepted_feedback_once_joined_and_nothing_grows(
    registry_path: Path, tmp_path: Path
) -> None:
    # The deployment comes up before Kafka, which stays down: predictions and feedback (by request_id and by text)
    # are answered, their events spooled, and when the broker first starts, topics are created, the spools drain
    # and each accepted feedback is stored once, joined to what was served. Before the fix (D2), prediction
    # events were dropped while Kafka was down, and feedback naming those requests was dead-lettered after
    # controller.join_timeout_s. Threads and fds must stay flat through the outage, and again once reconnected.
    broker = local_broker.LocalKafka()  # never started yet: its topics do not exist either
    env = bus_env("kafka", tmp_path, broker.bootstrap_servers)
    accepted: dict[str, tuple[str, str | None]] = {}  # feedback_id -> (the text it labels, the label served)
    seen: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}  # snapshot -> (threads, fds) of service, controller
    descriptors: dict[str, collections.Counter[str]] = {}  # snapshot -> the service's open descriptors
    failures: list[str] = []

    def exchange(client: httpx.Client, i: int) -> str | None:
        """A prediction, then feedback on it; the worker that took the feedback."""
        text = f"review {i}: the plot is thin but the cast carries it"
        predicted = client.post("/predict", json={"texts": [text]})
        if predicted.status_code != 200:
            failures.append(f"predict {predicted.status_code} {predicted.text}")
            return None
        served = predicted.json()[0]
        feedback_id = f"outage-{i}"
        joined = {"request_id": served["request_id"]} if i % 2 else {"text": text}
        response = client.post("/feedback", json={**joined, "label": "positive", "feedback_id": feedback_id})
        if response.status_code == 202:
            accepted[feedback_id] = (text, served["label"] if i % 2 else None)
        else:
            failures.append(f"feedback {response.status_code} {response.text}")
        return response.headers.get("x-tuneloop-worker")

    def fresh_exchange(i: int) -> str | None:
        # A worker opens its Kafka clients and metric files at its first use: on a fresh connection every exchange may
        # reach any worker, so none is first used between two snapshots and read as growth (CI failed twice so).
        with server.client() as fresh:
            return exchange(fresh, i)

    def every_worker_exchanges(first: int, each: int) -> int:
        """Exchanges until every worker has taken `each` feedback; the next index."""
        taken: collections.Counter[str | None] = collections.Counter()
        i = first
        while min(taken[w] for w in workers) < each:
            assert i - first < 40 * each, f"the workers' share stayed {taken}"
            taken[fresh_exchange(i)] += 1
            i += 1
        return i

    def snapshot(name: str) -> None:
        seen[name] = tuple((u["threads"], u["fds"]) for u in (tree_usage(server.process.pid), tree_usage(controller.pid)))
        descriptors[name] = open_descriptors(server.process.pid)  # what grew, should an assert fail

    try:
        with running_service(registry_path, tmp_path, **env) as server, running_controller(
            registry_path, tmp_path, env
        ) as controller:
            workers = [str(n) for n in range(1, len(psutil.Process(server.process.pid).children()) + 1)]
            started, i, taken = time.monotonic(), 0, collections.Counter()
            while (elapsed := time.monotonic() - started) < OUTAGE_S:
                taken[fresh_exchange(i)] += 1
                i += 1
                if "warm" not in seen and elapsed > 30 and all(taken[w] >= 5 for w in workers):
                    snapshot("warm")  # every retry loop has started by now, in every worker
                time.sleep(0.2)
            assert "warm" in seen, f"the outage's traffic reached the workers {dict(taken)}"
            snapshot("outage end")
            broker.start()
            i = every_worker_exchanges(i, 10)
            wait_for(lambda: store(env).count() >= len(accepted), 180, f"all {len(accepted)} accepted rows stored")
            snapshot("reconnected")
            i = every_worker_exchanges(i, 25)  # connected traffic, then a duplicate would have arrived too
            wait_for(lambda: store(env).count() >= len(accepted), 60, "the connected traffic stored")
            snapshot("settled")
            spooled = metric(server.url + "/metrics", 'tuneloop_feedback_accepted_total{via="spool"}')
            prediction_events_waiting = metric(server.url + "/metrics", "tuneloop_prediction_events_spooled")
    finally:
        broker.cleanup()
    rows = store(env).feedback_rows()
    assert failures == []
    assert len(accepted) > 150 and spooled >= 100 and prediction_events_waiting == 0  # the spools bridged it, then drained
    assert sorted(r["feedback_id"] for r in rows) == sorted(accepted)  # every 202 stored, exactly once
    for row in rows:
        text, served_label = accepted[row["feedback_id"]]
        assert row["text"] == text and (served_label is None or row["predicted_label"] == served_label), row
    for before, after in (("warm", "outage end"), ("reconnected", "settled")):
        for process, was, now in zip(("service", "controller"), seen[before], seen[after], strict=True):
            grown = descriptors[after] - descriptors[before]
            assert now[0] <= was[0] + 2 and now[1] <= was[1] + 4, (
                f"{process} (threads, fds) {before} {was} -> {after} {now}; the service's new descriptors: {dict(grown)}")
