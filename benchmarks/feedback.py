"""Feedback throughput: HTTP -> Kafka -> controller -> store, with the consumer-lag curve.

    python benchmarks/feedback.py [--duration 20] [--batch 100] [--concurrency 4] [--bus kafka|embedded]

Starts its own Kafka broker (KRaft, loopback), a `bentoml serve` and a controller; wrk posts
`/feedback/batch` requests of `--batch` texts (new feedback ids every time) for `--duration`
seconds while the controller's lag and the store's row count are sampled every 0.5 s, until the
lag is back to zero. Writes benchmarks/results/feedback.json and feedback_lag.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import default_registry, preflight, run_wrk, texts  # noqa: E402
from cli.processes import bus_env, local_broker, running_controller, running_service, tuneloop_env  # noqa: E402
from tuneloop.feedback_store import FeedbackStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def wrk_script(directory: Path, batch: int) -> Path:
    pool = texts()
    bodies = []
    for start in range(0, 40 * batch, batch):
        items = [{"text": pool[(start + i) % len(pool)], "label": "positive" if i % 2 else "negative"} for i in range(batch)]
        bodies.append(json.dumps({"items": items}))
    lua = ["bodies = {"] + [f"  [==[{body}]==]," for body in bodies] + ["}", "counter = 0", "request = function()"]
    lua += ["  counter = counter % #bodies + 1"]
    lua += ['  return wrk.format("POST", "/feedback/batch", {["Content-Type"] = "application/json"}, bodies[counter])']
    lua += ["end"]
    path = directory / "feedback.lua"
    path.write_text("\n".join(lua) + "\n")
    return path


def lag(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=5).text
    return sum(float(v) for v in re.findall(r"^tuneloop_controller_consumer_lag\{[^}]*\} (\S+)$", text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bus", choices=["kafka", "embedded"], default="kafka")
    args = parser.parse_args()
    registry = preflight(args.registry)

    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        workdir = Path(work)
        servers = stack.enter_context(local_broker().running_kafka()).bootstrap_servers if args.bus == "kafka" else ""
        env = bus_env(args.bus, workdir, servers)
        server = stack.enter_context(running_service(tuneloop_env(registry, **env), workdir))
        stack.enter_context(running_controller(tuneloop_env(registry, **env), workdir / "controller.log"))
        metrics_url = f"http://127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}/metrics"
        store = FeedbackStore(env["TUNELOOP_CONTROLLER__STORE_URL"])
        samples: list[tuple[float, float, int]] = []
        load_done = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while True:
                samples.append((time.monotonic() - started, lag(metrics_url), store.count()))
                if load_done.is_set() and samples[-1][1] == 0 and samples[-1][2] >= accepted_rows[0]:
                    return
                time.sleep(0.5)

        accepted_rows = [float("inf")]
        sampler = threading.Thread(target=sample)
        sampler.start()
        result = run_wrk(server.url + "/feedback/batch", wrk_script(workdir, args.batch), args.concurrency, args.duration)
        load_seconds = time.monotonic() - started
        accepted_rows[0] = (result["requests"] - result["failed"]) * args.batch
        load_done.set()
        sampler.join(timeout=600)
        drained_at = samples[-1][0]
        stored = store.count()

    summary = {
        "bus": args.bus,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "requests_failed": result["failed"],
        "rows_accepted": accepted_rows[0],
        "rows_stored": stored,
        "accepted_rows_per_second": accepted_rows[0] / load_seconds,
        "end_to_end_rows_per_second": stored / drained_at,
        "lag_zero_after_load_s": drained_at - load_seconds,
        "max_lag": max(s[1] for s in samples),
        "request_p50_ms": result["p50_ms"],
        "request_p99_ms": result["p99_ms"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feedback.json").write_text(json.dumps(summary | {"samples": samples}, indent=2) + "\n")
    plot(samples, load_seconds, RESULTS / "feedback_lag.png", summary)
    for key, value in summary.items():
        print(f"{key:28s} {value:.1f}" if isinstance(value, float) else f"{key:28s} {value}")


def plot(samples: list[tuple[float, float, int]], load_seconds: float, path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds, lags, stored = zip(*samples, strict=True)
    figure, lag_axis = plt.subplots(figsize=(8, 4))
    lag_axis.plot(seconds, lags, color="tab:red", label="consumer lag (messages)")
    lag_axis.set_xlabel("seconds since load started")
    lag_axis.set_ylabel("consumer lag (messages)")
    lag_axis.axvspan(0, load_seconds, color="0.92", label="wrk load")
    rows_axis = lag_axis.twinx()
    rows_axis.plot(seconds, stored, color="tab:blue", label="rows in store")
    rows_axis.set_ylabel("feedback rows stored")
    lines = lag_axis.get_legend_handles_labels()[0] + rows_axis.get_legend_handles_labels()[0]
    labels = lag_axis.get_legend_handles_labels()[1] + rows_axis.get_legend_handles_labels()[1]
    lag_axis.legend(lines, labels, loc="upper left")
    figure.suptitle(
        f"feedback via {summary['bus']}: {summary['accepted_rows_per_second']:.0f} rows/s accepted, "
        f"{summary['end_to_end_rows_per_second']:.0f} rows/s stored end to end"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
