"""The controller: the loop that consumes prediction and feedback events and ties the parts together.

Each step polls one batch and hands it to the parts in order:

1. `monitoring.ingest`: store the batch, dead-letter what cannot be stored, commit the offsets;
2. `monitoring.drift_watch`: finished training runs; drift windows, trigger decisions, new runs;
3. `monitoring.rollout_watch`: a candidate in shadow or canary judged, moved on, announced;
4. `monitoring.retention`: old predictions, consumed log messages and abandoned exports pruned.

Everything after the commit (2 to 4) may fail without losing an event. `monitoring.admin`
serves /metrics and the admin operations; `monitoring.metrics` holds every metric.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from monitoring.admin import Admin, admin_app
from monitoring.drift_watch import DriftWatch
from monitoring.ingest import Ingest
from monitoring.metrics import ControllerMetrics, controller_metrics
from monitoring.retention import Retention
from monitoring.rollout_watch import RolloutWatch
from monitoring.state import ControllerState
from tuneloop.bus import Bus, Consumer, announce, open_bus
from tuneloop.config import Settings
from tuneloop.database import redact
from tuneloop.errors import Conflict
from tuneloop.events import ModelEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry
from tuneloop.store_backends import open_database

log = logging.getLogger("tuneloop.controller")


class Controller:
    def __init__(self, settings: Settings, bus: Bus | None = None, metrics: ControllerMetrics | None = None) -> None:
        self.settings = settings
        self.topics = settings.events.topics
        self.bus = bus or open_bus(settings.events)
        self.store = FeedbackStore(settings.controller.store_url)
        self.metrics = metrics or controller_metrics()
        self.registry = Registry.from_config(settings.registry)
        self.state = ControllerState(settings.controller.store_url)
        self.ingest = Ingest(settings.controller, self.topics, self.bus, self.store, self.metrics.ingest)
        self.drift = DriftWatch(settings, self.registry, self.store, self.state, self.metrics.drift)
        self.rollout = RolloutWatch(settings.rollout, self.registry, self.store, self.metrics.rollout, self.announce)
        self.admin = Admin(self.registry, self.state, self.drift, self.announce)
        self.retention = Retention(settings.controller, self.store, self.bus, self.registry)

    def run(self, stop: threading.Event, leading: threading.Event | None = None) -> None:
        """Consume until stopped; after any failure, reconnect and resume from the last committed offsets.
        `leading`: set while the store's lock is known held (exclusive_controller's)."""
        try:
            while not stop.is_set():
                if leading is not None and not leading.is_set():
                    # The lock's connection is down and another may lead: joining Kafka as the one static member
                    # would fence that leader's consumer, and its rejoin this one's, in turn.
                    log.warning("not consuming while the store's lock is being taken back")
                    stop.wait(2)
                    continue
                self._consume(stop)
        finally:
            self.drift.close()

    def _consume(self, stop: threading.Event) -> None:
        consumer = None
        try:
            self.bus.ensure_topics(self.topics.model_dump().values())
            group = self.settings.controller.group_id
            # One member id for every controller: only the leader consumes, and a leader taking over from a dead
            # one gets its partitions at once (a new member waited out the dead one's 45 s session).
            consumer = self.bus.consumer(group, [self.topics.predictions, self.topics.feedback], member=f"{group}-leader")
            log.info("controller consuming %s and %s", self.topics.predictions, self.topics.feedback)
            while not stop.is_set():
                self.step(consumer)
        except Exception as exc:  # broker gone, store locked, dead-letter refused: retry from committed offsets
            log.warning("controller step failed (%r); resuming from committed offsets in 2 s", exc)
            stop.wait(2)
        finally:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    consumer.close()

    def step(self, consumer: Consumer) -> int:
        """One batch: stored and committed, then watched. Returns how many records it held."""
        ingested = self.ingest.step(consumer)
        self._watch(ingested.predictions)
        return ingested.records

    def _watch(self, predictions: list[PredictionEvent]) -> None:
        """After the offsets are committed: runs, the rollout, windows and decisions. A failure here loses no event."""
        self.drift.collect_finished_runs()
        self.rollout.judge()
        self.drift.observe(predictions)
        self.retention.prune()

    def announce(self, event: ModelEvent) -> None:
        """Tell the replicas on the model topic; they also poll the registry, so a lost event only delays them."""
        try:
            announce(self.bus, self.topics.model, event)
        except Exception as exc:  # the replicas' registry watch finds the change anyway
            log.warning("model event not published (%s)", exc)


@contextlib.contextmanager
def exclusive_controller(store_url: str, wait: threading.Event | None = None) -> Iterator[threading.Event]:
    """Hold the store's controller lock while inside; raise Conflict when another controller holds it, or with
    `wait`, wait until it stops (Conflict if `wait` is set first).

    Two controllers on one store would both store every event of the embedded log, both judge the
    rollout and both start training runs. The lock goes with the process, however it ends: an flock
    beside a SQLite file, a session advisory lock on a PostgreSQL server (tuneloop.postgres). Yields an event
    set while the lock is known held."""
    database = open_database(store_url)
    try:
        with database.exclusive("controller", wait) as held:
            yield held
    finally:
        database.close()


def serve_controller(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the controller with its HTTP side (/metrics, /admin) until stopped, the only one leading on its store.

    With controller.wait_to_lead, a controller that finds another leading serves /healthz and /metrics and waits;
    it builds its parts only once it leads."""
    import uvicorn

    if stop is None:  # the process's own controller: SIGTERM stops it cleanly (PID 1 in a container ignores a
        stop = threading.Event()  # signal left at its default action; a leader that lost its lock sends one too)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = settings.controller
    metrics = controller_metrics()
    app = admin_app(None, config.admin_token.get_secret_value())
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    http = threading.Thread(target=server.run, name="controller-http", daemon=True)
    if config.wait_to_lead:
        http.start()
    with contextlib.ExitStack() as leading:
        try:
            held = leading.enter_context(exclusive_controller(config.store_url, wait=stop if config.wait_to_lead else None))
        except Conflict:
            if stop.is_set():  # stopped while waiting to lead
                return
            raise
        if not http.is_alive():  # a refused controller takes no port
            http.start()
        log.info("leading on %s", redact(config.store_url))
        metrics.leader.set(1)
        controller = Controller(settings, metrics=metrics)
        app.state.admin = controller.admin
        controller.run(stop, held)
