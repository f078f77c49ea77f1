"""Feedback store throughput: the controller's batch writes and the trainer's read, SQLite against PostgreSQL.

    python benchmarks/store.py [--rounds 5] [--batches 20] [--batch 500]

In process, through `FeedbackStore` (what the controller and `tuneloop train` call): each round opens a
new store on each backend, interleaved, and writes `--batches` consumed batches of `--batch` feedback rows
each with its prediction (the controller's `controller.poll_max_records` is 500), every feedback joined to
the text that was served; then reads every row back as a training run does. Both are durable on commit
(SQLite WAL with synchronous=FULL; PostgreSQL with fsync and synchronous_commit on), on the same disk;
PostgreSQL is a real server on loopback (`deploy/postgres/local_server.py`). Writes benchmarks/results/store.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.spread import spread  # noqa: E402
from cli.processes import local_postgres  # noqa: E402
from tuneloop.events import FeedbackEvent, PredictionEvent  # noqa: E402
from tuneloop.feedback_store import FeedbackStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def batches(count: int, size: int) -> list[tuple[list[PredictionEvent], list[FeedbackEvent]]]:
    made = []
    for b in range(count):
        ids = [uuid.uuid4().hex for _ in range(size)]
        predictions = [PredictionEvent(request_id=i, text=f"text {b} {n} of a review", label="negative",
                                       scores={"negative": 0.8, "positive": 0.2}, model_version=1)
                       for n, i in enumerate(ids)]
        feedback = [FeedbackEvent(request_id=i, label="positive") for i in ids]
        made.append((predictions, feedback))
    return made


def measure(url: str, work: list[tuple[list[PredictionEvent], list[FeedbackEvent]]]) -> dict[str, float]:
    store = FeedbackStore(url)
    started = time.perf_counter()
    for predictions, feedback in work:
        store.write(predictions, feedback)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    rows = store.feedback_rows()
    read_s = time.perf_counter() - started
    store.close()
    stored = sum(len(f) for _, f in work)
    assert len(rows) == stored, f"{url}: {len(rows)} rows read of {stored} written"
    return {"write_rows_per_s": stored / write_s, "read_rows_per_s": stored / read_s,
            "batch_ms": 1000 * write_s / len(work)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
    with tempfile.TemporaryDirectory() as work, local_postgres().running_postgres() as server:
        for round_ in range(args.rounds):
            order = ["sqlite", "postgresql"] if round_ % 2 == 0 else ["postgresql", "sqlite"]
            for backend in order:
                url = (str(Path(work) / f"store-{round_}.db") if backend == "sqlite"
                       else server.create_database(f"bench_{round_}"))
                runs[backend].append(measure(url, batches(args.batches, args.batch)))
                print(f"round {round_ + 1}/{args.rounds} {backend:10s} "
                      f"write {runs[backend][-1]['write_rows_per_s']:8.0f} rows/s, "
                      f"read {runs[backend][-1]['read_rows_per_s']:8.0f} rows/s", flush=True)
    result: dict[str, object] = {
        "command": "python benchmarks/store.py " + " ".join(sys.argv[1:]),
        "host": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "rows_per_round": args.batches * args.batch, "batch": args.batch, "rounds": args.rounds,
    }
    for backend, measured in runs.items():
        result[backend] = {key: spread([m[key] for m in measured]) for key in measured[0]}
    ratios = {key: [p[key] / s[key] for p, s in zip(runs["postgresql"], runs["sqlite"], strict=True)]
              for key in ("write_rows_per_s", "read_rows_per_s")}
    result["postgresql_over_sqlite"] = {key: spread(values) for key, values in ratios.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "store.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, label in (("write_rows_per_s", "write"), ("read_rows_per_s", "read")):
        r = result["postgresql_over_sqlite"][key]
        print(f"{label}: SQLite {result['sqlite'][key]['median']:.0f} rows/s, PostgreSQL "
              f"{result['postgresql'][key]['median']:.0f} rows/s: {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")
    print(f"wrote {RESULTS / 'store.json'}")


if __name__ == "__main__":
    main()
