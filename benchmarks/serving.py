"""Serving benchmark: single-text requests at several concurrencies against a real `bentoml serve`, beside
what a user would run instead.

Three servers, all started at once and measured in turn, interleaved (each repeat of a point runs each
server once, so a drift of the machine hits them alike):
- `onnx`: tuneloop as shipped (int8 ONNX, its batcher, prediction events);
- `torch`: the same version run as PyTorch eager (serve.backend=torch, same batching settings);
- `bare`: the anchor, `benchmarks/bare_server.py`: Starlette + uvicorn with as many workers as tuneloop,
  ONNX Runtime with the same model file and threads, `tokenizers`, one text per run, nothing else.
Then the raw ONNX Runtime ceiling on the same cores. Load comes from wrk (C, one thread), so the load
generator takes little of the CPU it measures.

    python benchmarks/serving.py [--duration 15] [--repeat 3] [--concurrency 1 8 32 128] [--registry var/registry]

Each point is measured --repeat times with fresh connections and the median run is reported with
the range: BentoML's HTTP workers share one listening socket, so how a handful of keep-alive
connections lands on the workers varies from run to run.

Writes benchmarks/results/serving.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.processes import free_port, running, running_service, tuneloop_env, wait_http  # noqa: E402
from tuneloop.config import Settings  # noqa: E402
from tuneloop.inference import OnnxTextClassifier  # noqa: E402
from tuneloop.registry import Registry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IMDB = ROOT / "data" / "sentiment" / "imdb.csv"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def texts() -> list[str]:
    with IMDB.open() as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def wrk_script(directory: Path) -> Path:
    bodies = [json.dumps({"texts": [text]}) for text in texts()]
    lua = ["bodies = {"] + [f"  [==[{body}]==]," for body in bodies] + ["}"]
    lua += [
        "counter = 0",
        "request = function()",
        "  counter = counter % #bodies + 1",
        '  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, bodies[counter])',
        "end",
    ]
    path = directory / "predict.lua"
    path.write_text("\n".join(lua) + "\n")
    return path


def run_wrk(url: str, script: Path, concurrency: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return parse_wrk(out, concurrency)


def parse_wrk(out: str, concurrency: int) -> dict[str, float]:
    """One wrk run's figures from its --latency report; latencies in ms, None where it printed none."""

    def latency(percentile: str) -> float | None:
        found = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)  # wrk pads seconds: "6.95s "
        return float(found.group(1)) * UNITS[found.group(2)] if found else None  # None: no request completed

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "concurrency": concurrency,
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "requests": requests,
        "failed": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(int(n) for n in socket_errors.groups()) if socket_errors else 0),
    }


def raw_ceiling(registry: Path, seconds: float = 10.0) -> dict[str, float]:
    """In-process ONNX Runtime throughput over the same texts, best of a few batch sizes."""
    manifest, directory = Registry(registry).resolve()
    classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
    pool = texts()
    best: dict[str, float] = {}
    for batch in (1, 8, 32):
        classifier.predict(pool[:batch])
        done, started, i = 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds / 3:
            chunk = pool[i : i + batch] or pool[:batch]
            classifier.predict(chunk)
            done += len(chunk)
            i = (i + batch) % len(pool)
        rate = done / (time.perf_counter() - started)
        if rate > best.get("texts_per_second", 0):
            best = {"batch": batch, "texts_per_second": rate}
    return best


def default_registry() -> Path:
    return Path(os.environ.get("TUNELOOP_REGISTRY__URL", "var/registry"))


def preflight(registry: Path) -> Path:
    """Exit with what to do unless wrk is installed and the registry serves a model; the resolved registry."""
    if not shutil.which("wrk"):
        sys.exit("wrk is needed for the load: apt-get install wrk")
    registry = registry.resolve()
    if Registry(registry).live_version() is None:
        sys.exit(f"no model in {registry}: run `tuneloop bootstrap --data {IMDB.relative_to(ROOT)}` first")
    return registry


@contextlib.contextmanager
def bare_server(registry: Path, workers: int, threads: int, workdir: Path) -> Iterator[str]:
    """`benchmarks/bare_server.py` (uvicorn, `workers` processes) on the registry's live version; its base URL."""
    _, directory = Registry(registry).resolve()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")} | {
        "BARE_MODEL_DIR": str(directory), "BARE_THREADS": str(threads)}
    args = [sys.executable, str(ROOT / "benchmarks" / "bare_server.py"), str(port), str(workers)]
    log = workdir / "bare.log"
    with running(args, env, log, ROOT) as process:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", process, log)
        yield url


@contextlib.contextmanager
def server(backend: str, registry: Path, workdir: Path) -> Iterator[str]:
    """One server on the registry's live version, on the CPU (the anchor has no GPU path); its base URL."""
    if backend == "bare":
        serve = Settings().serve  # tuneloop's defaults: as many workers, as many threads each
        workers = len(os.sched_getaffinity(0)) if serve.workers == "cpu_count" else int(serve.workers)
        with bare_server(registry, workers, serve.intra_op_threads, workdir) as url:
            yield url
    else:
        own = workdir / backend  # each service its own event log and spool, never the repository's var/
        env = tuneloop_env(registry, TUNELOOP_SERVE__BACKEND=backend, TUNELOOP_SERVE__EXECUTION_PROVIDER="cpu",
                           TUNELOOP_EVENTS__EMBEDDED_PATH=str(own / "events.db"),
                           TUNELOOP_EVENTS__SPOOL_DIR=str(own / "spool"))
        with running_service(env, own) as service:
            yield service.url


SINGLE_CLIENT_S = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=default_registry())
    parser.add_argument("--duration", type=int, default=15, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per point; the median is reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--backends", nargs="+", default=["onnx", "bare", "torch"])
    parser.add_argument("--single-client-runs", type=int, default=10,
                        help="then this many 5 s runs of one sequential client per server, every one reported")
    args = parser.parse_args()
    registry = preflight(args.registry)

    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model_version": Registry(registry).live_version(),
        "duration_s": args.duration,
    }
    runs: dict[str, dict[int, list[dict]]] = {b: {c: [] for c in args.concurrency} for b in args.backends}
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        script = wrk_script(Path(work))
        urls = {b: stack.enter_context(server(b, registry, Path(work))) + "/predict" for b in args.backends}
        for url in urls.values():
            run_wrk(url, script, 8, 3)  # warm-up
        for concurrency in args.concurrency:
            for repeat in range(args.repeat):
                order = list(urls)[repeat % len(urls):] + list(urls)[: repeat % len(urls)]  # each goes first in turn
                for backend, url in ((b, urls[b]) for b in order):
                    runs[backend][concurrency].append(run_wrk(url, script, concurrency, args.duration))
                    last = runs[backend][concurrency][-1]
                    p50, p99 = (f"{last[k]:7.1f}" if last[k] is not None else "    n/a" for k in ("p50_ms", "p99_ms"))
                    print(f"{backend:5s} c={concurrency:<3d} {last['requests_per_second']:7.1f} req/s  "
                          f"p50 {p50} ms  p99 {p99} ms  failed {last['failed']}  requests {last['requests']}", flush=True)
        single: dict[str, list[dict]] = {b: [] for b in args.backends}
        for repeat in range(args.single_client_runs):  # one client's latency varies by run: each run is reported
            for backend in args.backends[repeat % len(args.backends):] + args.backends[: repeat % len(args.backends)]:
                single[backend].append(run_wrk(urls[backend], script, 1, SINGLE_CLIENT_S))
    for backend in args.backends:
        results[backend] = [median_row(runs[backend][c]) for c in args.concurrency]
    if args.single_client_runs:
        results["single_client"] = {"duration_s": SINGLE_CLIENT_S, **single}
    results["raw_onnx_ceiling"] = raw_ceiling(registry)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def median_row(measured: list[dict]) -> dict:
    """The median run by req/s, with the range and every failure."""
    ordered = sorted(measured, key=lambda r: r["requests_per_second"])
    return ordered[len(ordered) // 2] | {
        "min_requests_per_second": ordered[0]["requests_per_second"],
        "max_requests_per_second": ordered[-1]["requests_per_second"],
        "failed": sum(r["failed"] for r in ordered),
    }


def range_of(row: dict) -> str:
    return f"{row['min_requests_per_second']:.0f}-{row['max_requests_per_second']:.0f}"


def markdown(results: dict) -> str:
    ceiling = results["raw_onnx_ceiling"]["texts_per_second"]
    lines = [
        ("| concurrency | tuneloop int8 ONNX req/s (range) | p50 / p99 ms | hand-rolled server req/s (range) | "
         "p50 / p99 ms | tuneloop / hand-rolled | PyTorch eager req/s (range) | p50 / p99 ms | tuneloop / raw ceiling |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, onnx_row in enumerate(results.get("onnx", [])):
        bare = results.get("bare", [None] * (i + 1))[i]
        eager = results.get("torch", [None] * (i + 1))[i]

        def cells(row: dict | None) -> str:
            if row is None:
                return "- | -"
            p50, p99 = (f"{row[k]:.1f}" if row[k] is not None else "-" for k in ("p50_ms", "p99_ms"))
            return f"{row['requests_per_second']:.0f} ({range_of(row)}) | {p50} / {p99}"

        ratio = f"{onnx_row['requests_per_second'] / bare['requests_per_second']:.2f}x" if bare else "-"
        lines.append(f"| {onnx_row['concurrency']} | {cells(onnx_row)} | {cells(bare)} | {ratio} | {cells(eager)} | "
                     f"{onnx_row['requests_per_second'] / ceiling:.0%} |")
    lines.append(f"\nRaw ONNX Runtime ceiling: {ceiling:.0f} texts/s (batch {results['raw_onnx_ceiling']['batch']}).")
    single = results.get("single_client")
    if single:
        runs_each = len(next(v for k, v in single.items() if k != "duration_s"))
        lines.append(f"\nOne sequential client, {runs_each} runs of {single['duration_s']} s each, p50 / p99 ms per run:")
        for backend, runs in single.items():
            if backend != "duration_s":
                lines.append(f"- {backend}: " + ", ".join(f"{r['p50_ms']} / {r['p99_ms']}" for r in runs))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
