"""Soak: predictions and feedback at a steady rate for a long while, a model swap every few minutes.

A real `bentoml serve` (the shipped worker count) and `tuneloop controller` on the embedded log (as
`make up` runs them), model v1 of imdb. Throughout: `--rate` single-text `POST /predict` per
second, and for one prediction in `--feedback-every` a labelled feedback by request_id, sent in
batches each second. Every `--swap-every` seconds a copy of the live version is published and
promoted, and the replicas swap to it. Every 30 s the service's and the controller's process trees
are measured (RSS, threads, open file descriptors) with the sizes of the store and the event log.

At the end the load stops and the store must hold every feedback answered 202, exactly once.

    .venv/bin/python benchmarks/soak.py                    # 20 minutes; results/soak.json and soak.png
    .venv/bin/python benchmarks/soak.py --minutes 2        # a quick look

What a user would do instead is nothing: there is no anchor to run beside it. The figures to read
are the differences between start (after a minute of load) and end.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.drift import IMDB, ensure_registry  # noqa: E402
from cli.processes import bus_env, running_controller, running_service, tree_usage, tuneloop_env  # noqa: E402
from trainer.data import load_csv, split, write_csv  # noqa: E402
from tuneloop.clock import utc_now  # noqa: E402
from tuneloop.feedback_store import FeedbackStore  # noqa: E402
from tuneloop.registry import MANIFEST, Registry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_EVERY_S = 30.0


def publish_copy(registry: Registry) -> int:
    """A copy of the live version, promoted: the replicas swap to it as to any new version."""
    manifest, directory = registry.resolve()
    with registry.staging() as staged:
        for path in directory.rglob("*"):
            if path.is_file() and path.name != MANIFEST:
                target = staged / path.relative_to(directory)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        return registry.publish(
            staged, base_model=manifest.base_model, labels=manifest.labels, parent_version=manifest.version,
            metrics=manifest.metrics, export=manifest.export, reason="soak: a swap",
        ).version


def file_mb(*paths: Path) -> float:
    return round(sum(p.stat().st_size for path in paths for p in path.parent.glob(path.name + "*") if p.is_file()) / 2**20, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--rate", type=float, default=20, help="single-text predictions per second")
    parser.add_argument("--feedback-every", type=int, default=4, help="one labelled feedback per this many predictions")
    parser.add_argument("--swap-every", type=float, default=180, help="seconds between model swaps")
    parser.add_argument("--registries", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()

    bootstrap, traffic = split(load_csv(IMDB), 0.3, seed=13)
    work = Path(tempfile.mkdtemp(prefix="tuneloop-soak-"))
    source = ensure_registry(args.registries / "imdb", write_csv(work / "imdb-bootstrap.csv", bootstrap), None)
    registry_path = work / "registry"
    shutil.copytree(source, registry_path)
    registry = Registry(registry_path)
    # The soak measures serving and feedback, not training: a run the trigger might start is a stand-in that exits.
    env = tuneloop_env(registry_path, **bus_env("embedded", work), TUNELOOP_SERVE__WATCH_INTERVAL_S="1",
                       TUNELOOP_TRIGGER__COMMAND=json.dumps([sys.executable, "-c", "pass"]),
                       TUNELOOP_TRIGGER__RUNS_DIR=str(work / "runs"))
    store_path, events_path = work / "store.db", work / "events.db"

    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    versions: set[int] = set()
    to_label: list[tuple[str, str]] = []
    accepted: list[str] = []
    lock = threading.Lock()

    def predict(client: httpx.Client) -> None:
        rng, n, started = random.Random(0), 0, time.monotonic()
        while not stop.is_set():
            i = rng.randrange(len(traffic))
            sent = time.perf_counter()
            try:
                response = client.post("/predict", json={"texts": [traffic.texts[i]]})
                if response.status_code != 200:
                    failures.append(f"predict {response.status_code} {response.text[:200]}")
                else:
                    answer = response.json()[0]
                    latencies.append((time.perf_counter() - sent) * 1000)
                    versions.add(answer["model_version"])
                    if n % args.feedback_every == 0:
                        with lock:
                            to_label.append((answer["request_id"], traffic.labels[i]))
            except httpx.HTTPError as exc:
                failures.append(f"predict {exc!r}")
            n += 1
            stop.wait(max(0.0, started + n / args.rate - time.monotonic()))

    def feedback(client: httpx.Client) -> None:
        n = 0
        while not (stop.is_set() and not to_label):
            stop.wait(1.0)
            with lock:
                batch, to_label[:] = to_label[:], []
            if not batch:
                continue
            items = [{"request_id": r, "label": label, "feedback_id": f"soak-{n + k}"} for k, (r, label) in enumerate(batch)]
            n += len(items)
            try:
                response = client.post("/feedback/batch", json={"items": items})
                if response.status_code == 202:
                    accepted.extend(item["feedback_id"] for item in items)
                else:
                    failures.append(f"feedback {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(f"feedback {exc!r}")

    samples: list[dict] = []
    swaps = 0
    with (
        running_service(env, work / "serve") as server,
        running_controller(env, work / "controller.log") as controller,
        server.client() as predict_client,
        server.client() as feedback_client,
    ):
        threads = [threading.Thread(target=predict, args=(predict_client,)),
                   threading.Thread(target=feedback, args=(feedback_client,))]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        next_sample, next_swap = started + SAMPLE_EVERY_S, started + args.swap_every
        end = started + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(1.0)
            now = time.monotonic()
            if now >= next_swap:
                version = publish_copy(registry)
                swaps += 1
                print(f"{now - started:6.0f} s: swap to v{version}", flush=True)
                next_swap += args.swap_every
            if now >= next_sample:
                sample = {"t_s": round(now - started), "service": tree_usage(server.process.pid),
                          "controller": tree_usage(controller.pid), "store_mb": file_mb(store_path),
                          "events_mb": file_mb(events_path), "predictions": len(latencies),
                          "feedback_accepted": len(accepted), "failed": len(failures)}
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample += SAMPLE_EVERY_S
        stop.set()
        for thread in threads:
            thread.join()
        deadline = time.monotonic() + 180
        store = FeedbackStore(store_path)
        while time.monotonic() < deadline and store.count() < len(accepted):
            time.sleep(1.0)
        stored = [str(r["feedback_id"]) for r in store.feedback_rows()]

    first, last = samples[min(1, len(samples) - 1)], samples[-1]  # start: after a minute of load
    result = {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores",
        "date": utc_now(),
        "duration_s": round(args.minutes * 60),
        "rate_per_s": args.rate,
        "predictions": len(latencies),
        "failed_requests": len(failures),
        "failures": failures[:20],
        "feedback_accepted": len(accepted),
        "feedback_stored": len(set(stored) & set(accepted)),
        "feedback_stored_twice": len(stored) - len(set(stored)),
        "swaps": swaps,
        "versions_served": sorted(versions),
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(statistics.quantiles(latencies, n=100)[98], 1) if len(latencies) > 100 else None,
        "rss_mb_start": first["service"]["rss_mb"], "rss_mb_end": last["service"]["rss_mb"],
        "fds_start": first["service"]["fds"], "fds_end": last["service"]["fds"],
        "threads_start": first["service"]["threads"], "threads_end": last["service"]["threads"],
        "controller_rss_mb_start": first["controller"]["rss_mb"], "controller_rss_mb_end": last["controller"]["rss_mb"],
        "controller_fds_start": first["controller"]["fds"], "controller_fds_end": last["controller"]["fds"],
        "controller_threads_start": first["controller"]["threads"], "controller_threads_end": last["controller"]["threads"],
        "store_mb_start": first["store_mb"], "store_mb_end": last["store_mb"],
        "events_mb_start": first["events_mb"], "events_mb_end": last["events_mb"],
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for axis, key, label in zip(axes, ("rss_mb", "fds", "threads"), ("RSS (MB)", "open fds", "threads"), strict=True):
        for role in ("service", "controller"):
            axis.plot(minutes, [s[role][key] for s in samples], label=role)
        axis.set_title(label)
        axis.set_xlabel("minutes")
        axis.set_ylim(bottom=0)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
