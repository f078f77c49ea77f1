"""Controller failover: a waiting controller taking over from a killed leader, against restarting the one controller.

    python benchmarks/failover.py [--rounds 5] [--registry var/registry]

Real Kafka and PostgreSQL on loopback (`deploy/kafka/local_broker.py`, `deploy/postgres/local_server.py`), the
feedback store on PostgreSQL, a registry with a live version (default var/registry: `tuneloop bootstrap` or `make
demo` makes one). Each round, interleaved:

- **standby** (controller.wait_to_lead): two controllers, one leading; the leader's process group is SIGKILLed;
- **restart** (the anchor: one controller and a supervisor, systemd or Kubernetes, that starts it again at once):
  the controller is SIGKILLed and a new one started the moment it is gone.

Measured from the SIGKILL: until a controller answers /readyz (it leads), and until a feedback event published to
Kafka right after the kill is in the store (the new leader's consumer joined the group and consumed). Writes
benchmarks/results/failover.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.spread import spread  # noqa: E402
from cli.processes import bus_env, free_port, local_broker, local_postgres, running_controller, tuneloop_env  # noqa: E402
from tuneloop.bus import KafkaBus  # noqa: E402
from tuneloop.events import FeedbackEvent  # noqa: E402
from tuneloop.feedback_store import FeedbackStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NO_RUNS = {"TUNELOOP_TRIGGER__MIN_NEW_ROWS": str(10**9)}  # no drift-started training beside the measurement


def ready(env: dict[str, str]) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"http://127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}/readyz", timeout=1).status_code == 200
    return False


def until(condition: object, timeout: float = 120) -> float:
    """Seconds until `condition()` holds, polled every 50 ms."""
    started = time.perf_counter()
    while not condition():  # type: ignore[operator]
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.perf_counter() - started


class Round:
    """One measurement's store, topics and controllers' settings."""

    def __init__(self, kafka: object, postgres: object, registry: Path, workdir: Path) -> None:
        self.store_url = postgres.create_database(f"failover_{uuid.uuid4().hex[:12]}")  # type: ignore[attr-defined]
        self.env = tuneloop_env(registry) | bus_env("kafka", workdir, kafka.bootstrap_servers) | NO_RUNS | {  # type: ignore[attr-defined]
            "TUNELOOP_CONTROLLER__STORE_URL": self.store_url, "TUNELOOP_CONTROLLER__WAIT_TO_LEAD": "true"}
        self.bus = KafkaBus(kafka.bootstrap_servers)  # type: ignore[attr-defined]
        self.workdir = workdir

    def controller(self, port: int | None = None) -> contextlib.AbstractContextManager:
        env = self.env | {"TUNELOOP_CONTROLLER__PORT": str(port or free_port())}
        return running_controller(env, self.workdir / f"controller-{time.monotonic_ns()}.log", wait=True)

    def feedback(self, feedback_id: str) -> None:
        event = FeedbackEvent(feedback_id=feedback_id, text="a benchmark text", label="positive")
        [sent] = self.bus.publish_many(self.env["TUNELOOP_EVENTS__TOPICS__FEEDBACK"],
                                        [(event.feedback_id.encode(), event.model_dump_json().encode())])
        assert sent, "Kafka did not take the event"

    def stored(self, store: FeedbackStore, feedback_id: str) -> bool:
        with contextlib.suppress(Exception):
            return any(r["feedback_id"] == feedback_id for r in store.feedback_rows())
        return False


def kill(process: object) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    process.wait()  # type: ignore[attr-defined]


def measure(mode: str, kafka: object, postgres: object, registry: Path, workdir: Path) -> dict[str, float]:
    work = Round(kafka, postgres, registry, workdir)
    store = FeedbackStore(work.store_url)
    port = free_port()
    with contextlib.ExitStack() as stack:
        leader = stack.enter_context(work.controller(port))
        until(lambda: ready(work.env | {"TUNELOOP_CONTROLLER__PORT": str(port)}))
        work.feedback("before")  # the leader consumes: its group holds the partitions
        until(lambda: work.stored(store, "before"))
        standby_port = free_port()
        if mode == "standby":
            stack.enter_context(work.controller(standby_port))
        kill(leader)
        killed = time.perf_counter()
        work.feedback("after")
        if mode == "restart":
            stack.enter_context(work.controller(standby_port))
        new = work.env | {"TUNELOOP_CONTROLLER__PORT": str(standby_port)}
        until(lambda: ready(new))
        leading_s = time.perf_counter() - killed
        until(lambda: work.stored(store, "after"))
        consuming_s = time.perf_counter() - killed
    store.close()
    work.bus.close()
    return {"leading_s": leading_s, "consuming_s": consuming_s}


@contextlib.contextmanager
def infrastructure() -> Iterator[tuple[object, object]]:
    postgres = local_postgres().LocalPostgres().start()
    kafka = local_broker().LocalKafka().start()
    try:
        yield kafka, postgres
    finally:
        kafka.cleanup()
        postgres.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--registry", type=Path, default=ROOT / "var" / "registry")
    parser.add_argument("--out", type=Path, default=RESULTS / "failover.json")
    args = parser.parse_args()
    if not (args.registry / "live").exists():
        sys.exit(f"{args.registry} holds no registry: `tuneloop bootstrap --data ...` (or `make demo`) first")
    measured: dict[str, list[dict[str, float]]] = {"standby": [], "restart": []}
    with infrastructure() as (kafka, postgres), tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in (("standby", "restart") if r % 2 == 0 else ("restart", "standby")):
                figures = measure(mode, kafka, postgres, args.registry, Path(tmp))
                measured[mode].append(figures)
                print(f"round {r + 1} {mode}: leading {figures['leading_s']:.2f} s, "
                      f"consuming {figures['consuming_s']:.2f} s", flush=True)
    summary = {mode: {key: spread([m[key] for m in rounds]) for key in ("leading_s", "consuming_s")}
               for mode, rounds in measured.items()}
    ratios = {key: spread([s[key] / r[key] for s, r in zip(measured["standby"], measured["restart"], strict=True)])
              for key in ("leading_s", "consuming_s")}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rounds": args.rounds,
              "summary": summary, "standby_over_restart": ratios, "measured": measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for mode in measured:
        print(f"{mode}: leading {summary[mode]['leading_s']['median']:.2f} s, "
              f"consuming {summary[mode]['consuming_s']['median']:.2f} s (median of {args.rounds})")
    print(f"standby / restart: leading {ratios['leading_s']['median']:.2f}x, "
          f"consuming {ratios['consuming_s']['median']:.2f}x; written {args.out}")


if __name__ == "__main__":
    main()
