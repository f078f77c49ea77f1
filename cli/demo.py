"""`tuneloop demo`: the reference scenario end to end, on embedded defaults, with a plot.

v1 is bootstrapped on three CLINC150 domains (all six domains' intents declared). A real
`bentoml serve` and a real controller run on the embedded event log. Traffic comes from the
old domains, then from all six, with labelled feedback on part of it. Drift builds up, the
trigger starts `tuneloop train`, the gate passes the candidate, the service swaps to it, and
the accuracy on the new domains recovers. Everything lands in one work directory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cli.processes import BIN, free_port, running, wait_http
from monitoring.state import ControllerState
from trainer import scenario
from trainer.data import write_csv
from tuneloop.clock import unix_seconds
from tuneloop.registry import Registry
from tuneloop.runs import ACTIVE


@dataclass
class Timeline:
    """One point per traffic batch: when, which phase, served versions, and correctness per domain group."""

    points: list[dict[str, object]] = field(default_factory=list)

    def add(self, phase: str, events: int, versions: list[int], old: list[bool], new: list[bool]) -> None:
        self.points.append({"time": time.time(), "phase": phase, "events": events, "versions": versions,
                            "old_correct": old, "new_correct": new})


def _probe(url: str, texts: list[str], stop: threading.Event, out: list[dict[str, object]]) -> None:
    """What one application sees: a single-text request every 100 ms, its latency, version and status."""
    rng = random.Random(1)
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            started = time.time()
            try:
                response = client.post("/predict", json={"texts": [rng.choice(texts)]})
                version = response.json()[0]["model_version"] if response.status_code == 200 else None
                status: object = response.status_code
            except (httpx.HTTPError, ValueError) as exc:
                version, status = None, type(exc).__name__
            out.append({"time": started, "latency_s": time.time() - started, "status": status, "version": version})
            stop.wait(max(0.0, 0.1 - (time.time() - started)))


def run_demo(workdir: Path, feedback_per_intent: int, epochs: int | None, say: Callable[[str], None] = print,
             min_new_rows: int | None = None) -> dict[str, object]:
    workdir.mkdir(parents=True, exist_ok=True)
    service_port, controller_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")} | {
        "HF_HUB_OFFLINE": "1",
        "TUNELOOP_REGISTRY__URL": str(workdir / "registry"),
        "TUNELOOP_EVENTS__EMBEDDED_PATH": str(workdir / "events.db"),
        "TUNELOOP_CONTROLLER__STORE_URL": str(workdir / "feedback.db"),
        "TUNELOOP_CONTROLLER__PORT": str(controller_port),
        "TUNELOOP_TRIGGER__RUNS_DIR": str(workdir / "runs"),
        "TUNELOOP_TRIGGER__CONSECUTIVE_WINDOWS": "2",
    }
    if epochs:
        env["TUNELOOP_TRAIN__MAX_EPOCHS"] = str(epochs)
    if min_new_rows is not None:
        env["TUNELOOP_TRIGGER__MIN_NEW_ROWS"] = str(min_new_rows)
    registry = Registry(workdir / "registry")
    if registry.live_version() is None:
        say("1/4 bootstrapping v1 on banking, travel, kitchen_and_dining (intents of six domains declared)")
        data = write_csv(workdir / "v1-train.csv", scenario.sample(scenario.OLD_DOMAINS, "train", 30, seed=0))
        subprocess.run([str(BIN / "tuneloop"), "bootstrap", "--data", str(data), "--labels",
                        ",".join(scenario.label_set()), "--no-progress"], env=env, check=True)
    start_version = registry.live_version()
    old_test = scenario.sample(scenario.OLD_DOMAINS, "test", None, seed=5)
    new_test = scenario.sample(scenario.NEW_DOMAINS, "test", None, seed=5)
    feedback = scenario.sample(scenario.NEW_DOMAINS, "train", feedback_per_intent, seed=2)
    timeline = Timeline()
    rng = random.Random(0)
    state = ControllerState(workdir / "feedback.db")
    say(f"2/4 serving on 127.0.0.1:{service_port}, controller on :{controller_port} (logs in {workdir})")
    serve_args = [str(BIN / "bentoml"), "serve", "services.service:Classifier", "--host", "127.0.0.1",
                  "--port", str(service_port)]
    with (
        running(serve_args, env | {"BENTOML_HOME": str(workdir / "bentoml")}, workdir / "service.log") as service,
        running([str(BIN / "tuneloop"), "controller"], env, workdir / "controller.log") as controller,
        httpx.Client(base_url=f"http://127.0.0.1:{service_port}", timeout=60) as client,
    ):
        wait_http(f"http://127.0.0.1:{service_port}/readyz", service, workdir / "service.log")
        wait_http(f"http://127.0.0.1:{controller_port}/healthz", controller, workdir / "controller.log")
        events = 0
        probes: list[dict[str, object]] = []
        stop_probe = threading.Event()
        prober = threading.Thread(
            target=_probe, args=(f"http://127.0.0.1:{service_port}", old_test.texts + new_test.texts, stop_probe, probes),
            daemon=True,
        )
        prober.start()

        next_batch = time.monotonic()

        def traffic(phase: str, with_feedback: list[tuple[str, str]]) -> None:
            """One application batch every 0.5 s in every phase, so phases differ only in what they test."""
            nonlocal events, next_batch
            time.sleep(max(0.0, next_batch - time.monotonic()))
            next_batch = time.monotonic() + 0.5
            old = rng.sample(range(len(old_test)), 16)
            new = rng.sample(range(len(new_test)), 16) if phase != "old domains" else []
            texts = [old_test.texts[i] for i in old] + [new_test.texts[i] for i in new]
            truth = [old_test.labels[i] for i in old] + [new_test.labels[i] for i in new]
            texts += [t for t, _ in with_feedback]
            response = client.post("/predict", json={"texts": texts})
            response.raise_for_status()
            predictions = response.json()
            events += len(texts)
            correct = [p["label"] == t for p, t in zip(predictions, truth, strict=False)]
            timeline.add(phase, events, sorted({p["model_version"] for p in predictions}), correct[: len(old)],
                         correct[len(old) : len(truth)])
            if with_feedback:
                items = [{"request_id": p["request_id"], "label": label}
                         for p, (_, label) in zip(predictions[len(truth):], with_feedback, strict=True)]
                client.post("/feedback/batch", json={"items": items}).raise_for_status()

        say("3/4 traffic: old domains, then all six with feedback on the new intents")
        for _ in range(60):
            traffic("old domains", [])
        pairs = list(zip(feedback.texts, feedback.labels, strict=True))
        for start in range(0, len(pairs), 16):
            traffic("shift + feedback", pairs[start : start + 16])
        deadline = time.monotonic() + 900
        while registry.live_version() == start_version:
            runs = state.runs()
            if runs and runs[-1]["status"] not in (*ACTIVE, "succeeded"):
                raise RuntimeError(f"training run {runs[-1]['id']} ended {runs[-1]['status']}; see {runs[-1]['log_path']}")
            if time.monotonic() > deadline:
                raise RuntimeError("no new version within 15 minutes; see controller.log")
            traffic("shift, waiting for the loop", [])
        swapped_at = time.monotonic() + 30
        while time.monotonic() < swapped_at and timeline.points[-1]["versions"] != [registry.live_version()]:
            traffic("after the swap", [])
        for _ in range(60):
            traffic("after the swap", [])
        stop_probe.set()
        prober.join()
    return {"timeline": timeline.points, "probes": probes, "windows": state.windows(), "runs": state.runs(),
            "decisions": state.decisions(), "history": [e.model_dump() for e in registry.history()],
            "start_version": start_version, "end_version": registry.live_version()}


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["timeline"]
    t0 = points[0]["time"]

    def rolling(key: str, width: int = 5) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for i, point in enumerate(points):
            window = [c for p in points[max(0, i - width + 1) : i + 1] for c in p[key]]
            if window:
                xs.append(point["time"] - t0)
                ys.append(sum(window) / len(window))
        return xs, ys

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.plot(*rolling("old_correct"), label="old domains (banking, travel, kitchen)")
    top.plot(*rolling("new_correct"), label="new domains (auto, home, utility)")
    top.set_ylabel("served accuracy (rolling)")
    top.set_ylim(-0.02, 1.02)
    windows = result["windows"]

    def seconds(iso: str) -> float:
        return unix_seconds(iso) - t0

    for name in ("confidence_ks", "embedding_mmd", "class_mix_chi2"):
        xs = [seconds(w["evaluated_at"]) for w in windows]
        ys = [max(next((s["p_value"] for s in w["signals"] if s["name"] == name), 1.0) or 1.0, 1e-6) for w in windows]
        bottom.semilogy(xs, ys, label=f"{name} p-value")
    accuracy = [(seconds(w["evaluated_at"]), s["value"]) for w in windows for s in w["signals"] if s["name"] == "feedback_accuracy"]
    if accuracy:
        twin = bottom.twinx()
        twin.plot([a[0] for a in accuracy], [a[1] for a in accuracy], color="black", linestyle=":", label="feedback accuracy")
        twin.set_ylabel("feedback accuracy")
        twin.set_ylim(-0.02, 1.02)
    bottom.axhline(0.05, color="grey", linestyle=":")
    bottom.set_ylabel("drift test p-value")
    bottom.set_xlabel("seconds since the demo's traffic began")
    for axis in (top, bottom):
        for run in result["runs"]:
            axis.axvline(seconds(run["started_at"]), color="orange", linestyle="--")
        for entry in result["history"][1:]:
            axis.axvline(seconds(entry["time"]), color="green", linestyle="-")
    top.legend(loc="lower left", fontsize=8)
    bottom.legend(loc="lower left", fontsize=8)
    fig.suptitle("tuneloop demo: drift -> training run (orange) -> swap to the new version (green)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary_rows(result: dict[str, object]) -> list[tuple[str, str]]:
    points = result["timeline"]

    def accuracy(key: str, versions: set[int]) -> str:
        correct = [c for p in points if set(p["versions"]) <= versions for c in p[key]]
        return f"{sum(correct) / len(correct):.3f} ({len(correct)} texts)" if correct else "-"

    start, end = result["start_version"], result["end_version"]
    run = result["runs"][-1] if result["runs"] else None
    swap = next((e for e in result["history"] if e["version"] == end and e["action"] == "promote"), None)
    loop_s = "-"
    if run and swap:
        loop_s = f"{unix_seconds(swap['time']) - unix_seconds(run['started_at']):.0f} s"
    probes = result.get("probes", [])
    failed = sum(1 for probe in probes if probe["status"] != 200)
    return [
        (f"v{start} on old domains", accuracy("old_correct", {start})),
        (f"v{start} on new domains", accuracy("new_correct", {start})),
        (f"v{end} on old domains", accuracy("old_correct", {end})),
        (f"v{end} on new domains", accuracy("new_correct", {end})),
        ("training run", f"{run['id']}: {run['status']} ({run['source']})" if run else "-"),
        ("trigger to new version promoted", loop_s),
        ("single-text probe requests failed", f"{failed} of {len(probes)}"),
        ("drift windows", str(len(result["windows"]))),
        ("trigger decisions recorded", json.dumps([(d["outcome"], d["reason"]) for d in result["decisions"]][:6])),
    ]
