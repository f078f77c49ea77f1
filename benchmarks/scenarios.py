"""Scenario suite: the whole loop, on several real data sets, with the same shipped defaults for each.

For every scenario (`trainer/scenario.py`: CLINC150 domain expansion drawn by a seed, BANKING77 label
expansion, IMDB -> Amazon sentiment input shift) in a fresh work directory:

1. `tuneloop bootstrap` v1 on the scenario's bootstrap rows, its full label set declared.
2. A real `tuneloop serve` (BentoML, the shipped worker count) and `tuneloop controller` on the
   embedded event log. Only paths and ports are set (registry, event log, store, runs directory,
   controller and service ports); every tuning knob keeps its shipped default (an empty
   TUNELOOP_CONFIG file, so a local tuneloop.toml cannot change them).
3. A paced load: two client threads, 25 single-text `POST /predict` per second each, throughout:
   old test texts for about 20 s, then old and new test texts mixed. Every request's time,
   latency, status and model_version is kept; non-200 answers and exceptions are failures.
4. The shift: the application sends the scenario's feedback rows as it would, `POST /predict` in
   batches of up to 64 texts, then, once they are labelled, `POST /feedback/batch` (up to 1,000
   items) with their request ids and true labels, as fast as it goes: all feedback is in within
   seconds, so the trigger finds (nearly) all of it in the store.
5. Waits for the controller's drift trigger to start `tuneloop train`, then for the new version to
   be promoted and every replica to answer with it (the last 30 load responses all carry it), or
   for the run to end otherwise (verdict `rejected`, `failed`, `skipped`); no run within the wait
   is verdict `no_run`, with the trigger's latest decisions as the reason.
6. After the service stops: the no-replay ablation (`tuneloop train --replay-ratio 0` from a copy
   of v1's registry and of the store holding exactly the feedback the served run trained on) and
   the joint oracle (`tuneloop bootstrap` from scratch on v1's rows plus that feedback).
7. Accuracy of v1, the served version (or the rejected candidate), no-replay and oracle on the
   old and new test rows, with 95 % Wilson intervals. For input-shift scenarios (no new labels)
   `new` is null and the shifted domain's accuracy is under `shifted`.

Reported per scenario: verdict and failing gate checks, trigger -> every replica live (s), training
samples/s, rows trained on, quantization recipe / parity / latency ratio (and whether an fp32
fallback was needed), failed requests and p50/p99 latency steady, while training and after the swap.

    .venv/bin/python benchmarks/scenarios.py                      # the full suite (about 75 min on 2 cores)
    .venv/bin/python benchmarks/scenarios.py --scenarios clinc:1,sentiment:1
    .venv/bin/python benchmarks/scenarios.py --scenarios sentiment:1 --quick --out /tmp/s.json
    .venv/bin/python benchmarks/scenarios.py --markdown           # the README's tables from the results

Each scenario's object is appended to --out (default benchmarks/results/scenarios.json) as soon as
it is done, and the table and the plot (beside --out, .png) are redrawn. `--quick` (CI) lowers only
TUNELOOP_TRAIN__MAX_EPOCHS, and says so in the JSON. Work files: --workdir/<scenario>-<seed>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.processes import free_port, running, wait_http  # noqa: E402
from exporters.gate import right, wilson  # noqa: E402
from exporters.quantize import RECIPES  # noqa: E402
from monitoring.state import ControllerState  # noqa: E402
from trainer import scenario as scenarios  # noqa: E402
from trainer.data import LabelledTexts, concat, write_csv  # noqa: E402
from tuneloop.clock import unix_seconds, utc_iso, utc_now  # noqa: E402
from tuneloop.comparison import paired  # noqa: E402
from tuneloop.feedback_store import FeedbackStore  # noqa: E402
from tuneloop.inference import OnnxTextClassifier  # noqa: E402
from tuneloop.registry import Registry  # noqa: E402
from tuneloop.runs import ACTIVE

BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_SCENARIOS = "clinc:1,clinc:2,clinc:3,clinc:4,clinc:5,banking77:1,sentiment:1"
CONSTRUCTORS = {"clinc": scenarios.clinc, "banking77": scenarios.banking77, "sentiment": scenarios.sentiment}
QUICK_EPOCHS = 3  # the tests bootstrap their shared v1s with 3 epochs too (tests/support/data.py: TEST_EPOCHS)
LOAD_THREADS, LOAD_RATE_PER_THREAD = 2, 25.0
OLD_ONLY_S = 20.0
FEEDBACK_BATCH = 64  # serve.max_texts_per_request
LABEL_BATCH = 1000  # what /feedback/batch accepts at once
LIVE_CONFIRMATIONS = 30  # 2 workers share a port: this many load answers in a row on the new version
AFTER_SWAP_S = 10.0
RUN_FIELDS = ("id", "source", "reason", "started_at", "finished_at", "status", "exit_code", "new_rows")


def ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version(),
            "gpu": shutil.which("nvidia-smi") is not None}


def commit() -> str | None:
    """The checkout's commit, "+" when it has uncommitted changes: which defaults a result was measured with."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results"],  # the results being written are no change of defaults
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def parse_scenarios(text: str) -> list[tuple[str, int | None]]:
    """NAME:SEED items; `clinc:ref` is the reference CLINC150 draw (the tests' and the demo's)."""
    chosen: list[tuple[str, int | None]] = []
    for item in text.split(","):
        name, _, seed = item.strip().partition(":")
        if (name, seed) == ("clinc", "ref"):
            chosen.append((name, None))
            continue
        if name not in CONSTRUCTORS or not seed.lstrip("-").isdigit():
            raise SystemExit(f"--scenarios: {item!r} is not NAME:SEED with NAME one of {sorted(CONSTRUCTORS)}")
        chosen.append((name, int(seed)))
    return chosen


# --- environment: paths and ports only ------------------------------------------------------------

def env_for(directory: Path, quick: bool, controller_port: int | None = None) -> dict[str, str]:
    """Shipped defaults everywhere: only paths and ports are set (and the epoch cap in --quick)."""
    empty_config = directory / "empty.toml"
    empty_config.parent.mkdir(parents=True, exist_ok=True)
    empty_config.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_") and k != "KAFKA_BOOTSTRAP_SERVERS"} | {
        "HF_HUB_OFFLINE": "1",
        "BENTOML_HOME": str(directory / "bentoml"),
        "TUNELOOP_CONFIG": str(empty_config),
        "TUNELOOP_REGISTRY__URL": str(directory / "registry"),
        "TUNELOOP_EVENTS__EMBEDDED_PATH": str(directory / "events.db"),
        "TUNELOOP_CONTROLLER__STORE_URL": str(directory / "feedback.db"),
        "TUNELOOP_TRIGGER__RUNS_DIR": str(directory / "runs"),
    }
    if controller_port is not None:
        env["TUNELOOP_CONTROLLER__PORT"] = str(controller_port)
    if quick:
        env["TUNELOOP_TRAIN__MAX_EPOCHS"] = str(QUICK_EPOCHS)
    return env


def tuneloop(args: list[str], env: dict[str, str], log: Path, check: bool = True) -> int:
    """Run a `tuneloop` command, output to `log`; with check, raise with the log's tail when it fails."""
    with log.open("wb") as out:
        code = subprocess.run([str(BIN / "tuneloop"), *args], env=env, cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT, check=False).returncode
    if check and code != 0:
        raise RuntimeError(f"tuneloop {' '.join(args)} exited {code}:\n{log.read_text(errors='replace')[-3000:]}")
    return code


# --- the load: two paced client threads -----------------------------------------------------------

class Load:
    """LOAD_THREADS clients, each sending one single-text /predict every 1/LOAD_RATE_PER_THREAD s."""

    def __init__(self, url: str, old_texts: list[str], new_texts: list[str]) -> None:
        self.url, self.old_texts, self.new_texts = url, old_texts, new_texts
        self.shifted, self.stopped = threading.Event(), threading.Event()
        self.records: list[dict[str, object]] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(LOAD_THREADS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        interval = 1.0 / LOAD_RATE_PER_THREAD
        next_at = time.monotonic() + index * interval / LOAD_THREADS
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stopped.is_set():
                self.stopped.wait(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at + interval, time.monotonic() - 1.0)  # catch up at most 1 s of backlog
                pool = self.new_texts if self.shifted.is_set() and rng.random() < 0.5 else self.old_texts
                started, perf = time.time(), time.perf_counter()
                try:
                    response = client.post("/predict", json={"texts": [rng.choice(pool)]})
                    status: object = response.status_code
                    version = response.json()[0]["model_version"] if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    status, version = type(exc).__name__, None
                self.records.append({"time": started, "latency_s": time.perf_counter() - perf, "status": status,
                                     "version": version, "thread": index})

    def latest_versions(self, n: int) -> list[object]:
        answered = [r["version"] for r in self.records[-4 * n:] if r["status"] == 200]
        return answered[-n:]


def standby_handed_after(run: dict | None) -> float | None:
    """Seconds from the run's start until a warmed standby took it (its log says so); None for a cold start."""
    log_path = Path(run["log_path"]) if run and run.get("log_path") else None
    if log_path is None or not log_path.is_file():
        return None
    found = re.search(r"handed to this standby ([\d.]+) s after it started", log_path.read_text(errors="replace"))
    return float(found.group(1)) if found else None


def latency_phases(records: list[dict], shift_at: float, run_start: float | None, run_end: float | None,
                   live_at: float | None) -> dict[str, dict]:
    """Requests, failures and p50/p99 (ms) in each phase of the scenario."""
    inf = float("inf")
    phases = {"steady": (0.0, shift_at)}
    if run_start is None:
        phases["after_shift"] = (shift_at, inf)
    else:
        phases["shift_before_run"] = (shift_at, run_start)
        phases["training"] = (run_start, run_end or live_at or inf)
        if live_at is not None:
            phases["swap"] = (live_at - 5, live_at + 5)
            phases["after_swap"] = (live_at + 5, inf)
    out = {}
    for name, (start, end) in phases.items():
        inside = [r for r in records if start <= r["time"] < end]
        ok = [r["latency_s"] for r in inside if r["status"] == 200]
        out[name] = {"requests": len(inside), "failed": len(inside) - len(ok),
                     "p50_ms": ms(ok, 50), "p99_ms": ms(ok, 99)}
    return out


# --- the application's feedback --------------------------------------------------------------------

def send_feedback(client: httpx.Client, feedback: LabelledTexts) -> int:
    """Predict the feedback texts in batches of up to 64, then label every prediction by request_id.

    Labels come after the predictions, as they would (someone labels what was served). Sent batch by
    batch instead (predict 64, label 64), the trigger fired on the first 256 of 400 stored rows with
    drift already showing, and the run trained on 320 (smoke run, sentiment:1)."""
    request_ids: list[str] = []
    for start in range(0, len(feedback), FEEDBACK_BATCH):
        response = client.post("/predict", json={"texts": feedback.texts[start:start + FEEDBACK_BATCH]})
        response.raise_for_status()
        request_ids += [p["request_id"] for p in response.json()]
    items = [{"request_id": r, "label": label} for r, label in zip(request_ids, feedback.labels, strict=True)]
    for start in range(0, len(items), LABEL_BATCH):
        client.post("/feedback/batch", json={"items": items[start:start + LABEL_BATCH]}).raise_for_status()
    return len(items)


# --- waiting for the loop --------------------------------------------------------------------------

def wait_for_loop(state: ControllerState, registry: Registry, load: Load, v1: int, shift_at: float,
                  trigger_wait_s: float, run_wait_s: float) -> dict[str, object]:
    """Trigger -> run -> promotion -> every replica on the new version, or how it ended instead."""
    deadline = time.monotonic() + trigger_wait_s
    run = None
    while run is None:
        run = next((r for r in state.runs() if r["started_unix"] >= shift_at - 1), None)
        if run is None and time.monotonic() > deadline:
            decisions = [(d["outcome"], d["reason"]) for d in state.decisions(last=5)]
            windows = state.windows()
            drifted = [w for w in windows if w["drifted"]]
            return {"verdict": "no_run", "run": None, "live_at": None,
                    "reason": f"no training run within {trigger_wait_s:.0f} s of the shift; {len(drifted)} of "
                              f"{len(windows)} drift windows drifted; latest decisions: {decisions}"}
        time.sleep(1)
    print(f"    run {run['id']} started ({run['reason']}); waiting for promotion and the swap", flush=True)
    deadline = time.monotonic() + run_wait_s
    while True:
        run = next(r for r in state.runs() if r["id"] == run["id"])
        live = registry.live_version()
        if live != v1:
            latest = load.latest_versions(LIVE_CONFIRMATIONS)
            if len(latest) == LIVE_CONFIRMATIONS and set(latest) == {live}:
                return {"verdict": "promoted", "run": run, "live_at": time.time(), "reason": ""}
        elif run["status"] not in ACTIVE:
            if run["status"] == "succeeded":  # promotion comes before the exit; give the read a moment
                time.sleep(2)
                if registry.live_version() != v1:
                    continue
            verdict = "rejected" if run["status"] == "rejected" else run["status"]
            return {"verdict": verdict, "run": run, "live_at": None,
                    "reason": f"run {run['id']} ended {run['status']} (exit {run['exit_code']}); see {run['log_path']}"}
        if time.monotonic() > deadline:
            return {"verdict": "timeout", "run": run, "live_at": None,
                    "reason": f"run {run['id']} not live within {run_wait_s:.0f} s (status {run['status']}, "
                              f"live v{live})"}
        time.sleep(0.5)


def wait_run_finished(state: ControllerState, run_id: int, timeout_s: float) -> dict:
    """The run's record once it has ended; a run still going after the timeout is stopped (its own process group)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = next(r for r in state.runs() if r["id"] == run_id)
        if run["status"] not in ACTIVE:
            return run
        if time.monotonic() > deadline:
            if run["pid"]:
                try:
                    os.killpg(run["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass
            return run
        time.sleep(1)


# --- ablation and oracle ---------------------------------------------------------------------------

def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live WAL database (the file alone may miss committed pages)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    dst.close()
    src.close()


def trained_feedback(store: Path, v1_created_at: str, rows: int | None, before: float | None) -> list[dict]:
    """The feedback rows a run trained on: the first `rows` stored after v1 (the trainer reads them in
    stored_at order), or, without a count, those stored before `before` (all of them when None)."""
    since = utc_iso(v1_created_at)
    stored = [r for r in FeedbackStore(store).feedback_rows() if r["stored_at"] > since]
    if rows is not None:
        return stored[:rows]
    return [r for r in stored if before is None or unix_seconds(r["stored_at"]) < before]


def no_replay(directory: Path, v1_registry: Path, store: Path, keep_ids: set[str], quick: bool) -> int | None:
    """`tuneloop train --replay-ratio 0` from a copy of v1's registry and of the store cut to `keep_ids`."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(v1_registry, directory / "registry")
    copy_sqlite(store, directory / "feedback.db")
    with sqlite3.connect(directory / "feedback.db") as db:
        ids = [r[0] for r in db.execute("SELECT feedback_id FROM feedback")]
        db.executemany("DELETE FROM feedback WHERE feedback_id = ?", [(i,) for i in ids if i not in keep_ids])
    db.close()
    tuneloop(["train", "--replay-ratio", "0", "--no-progress"], env_for(directory, quick), directory / "train.log",
             check=False)
    versions = Registry(directory / "registry").list_versions()
    return versions[-1] if len(versions) > 1 else None


def oracle(directory: Path, bootstrap: LabelledTexts, feedback: list[dict], labels: list[str], quick: bool) -> None:
    """v1's rows plus the feedback, bootstrapped from scratch with the same declared labels."""
    rows = concat([bootstrap, LabelledTexts([str(r["text"]) for r in feedback], [str(r["label"]) for r in feedback])])
    data = write_csv(directory / "joint.csv", rows)
    tuneloop(["bootstrap", "--data", str(data), "--labels", ",".join(labels), "--no-progress"],
             env_for(directory, quick), directory / "bootstrap.log")


# --- evaluation ------------------------------------------------------------------------------------

def test_rows_right(registry: Path, version: int, sc: scenarios.Scenario) -> dict[str, list[bool]]:
    """Whether `version` answers each old and new test row right; resolve() verifies files whatever the status."""
    manifest, directory = Registry(registry).resolve(version)
    classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
    return {which: right(classifier.predict(rows.texts).probabilities, classifier.labels, rows.labels)
            for which, rows in (("old", sc.test_old), ("new", sc.test_new))}


def versus(reference: dict[str, list[bool]], candidate: dict[str, list[bool]], sc: scenarios.Scenario
           ) -> dict[str, object]:
    """The candidate against the reference on the same test rows (exact McNemar, as the gate judges): old rows,
    new (or shifted) rows, and both together, the mix the load sends once the shift has begun."""
    return {"old": paired(reference["old"], candidate["old"]).as_dict(),
            new_key({"kind": sc.kind}): paired(reference["new"], candidate["new"]).as_dict(),
            "mix": paired(reference["old"] + reference["new"], candidate["old"] + candidate["new"]).as_dict()}


def evaluate(registry: Path, version: int, sc: scenarios.Scenario, rights: dict[str, list[bool]] | None = None
             ) -> dict[str, object]:
    """Accuracy on old and new test rows (Wilson 95 %), from `rights` when the rows were already scored."""
    manifest = Registry(registry).manifest(version)
    rights = rights or test_rows_right(registry, version, sc)
    old, new = (wilson(sum(rights[which]), len(rights[which])) for which in ("old", "new"))
    out: dict[str, object] = {
        "version": version, "status": manifest.status,
        "old": round(old["accuracy"], 4), "old_ci95": old["ci95"], "old_rows": old["rows"],
        "new": None, "new_ci95": None, "new_rows": new["rows"],
        "recipe": manifest.export.get("quantization"),
        "gate_failed": failing_checks(manifest.gate),
    }
    shifted = {"new": round(new["accuracy"], 4), "new_ci95": new["ci95"]}
    if sc.kind == "no_new_labels":
        shifted = {"shifted": shifted["new"], "shifted_ci95": shifted["new_ci95"]}
    return out | shifted


def failing_checks(gate: dict) -> list[str]:
    return [name for name, check in gate.get("checks", {}).items() if not check.get("passed")]


def fallback(recipe: str | None) -> bool | None:
    """Whether the exporter had to fall back from the first (calibrated static int8) recipe."""
    return None if recipe is None else recipe != RECIPES[0].name


def quantization(manifest) -> dict[str, object]:
    latency = manifest.gate.get("checks", {}).get("fresh_session_and_latency", {})
    candidate, live = latency.get("candidate_median_ms"), latency.get("live_median_ms")
    recipe = manifest.export.get("quantization")
    return {
        "recipe": recipe,
        "fallback": fallback(recipe),
        # the dynamic fallbacks that keep the head (and more) in fp32
        "fp32_parts": any(r.name == recipe and not r.calibrated and (r.fp32_head or r.fp32_patterns) for r in RECIPES),
        "agreement": manifest.metrics.get("parity", {}).get("argmax_agreement"),
        "latency_ratio": round(candidate / live, 3) if candidate and live else None,
        "candidate_median_ms": candidate, "live_median_ms": live,
        "attempts": [(a["recipe"], a["parity"]["argmax_agreement"] if a.get("parity") else a.get("error"))
                     for a in manifest.export.get("quantization_attempts", [])],
    }


# --- one scenario ----------------------------------------------------------------------------------

def run_scenario(name: str, seed: int | None, workdir: Path, quick: bool, trigger_wait_s: float, run_wait_s: float,
                 v1_registry: Path | None = None) -> dict[str, object]:
    sc = CONSTRUCTORS[name](seed)
    directory = workdir / f"{name}-{'ref' if seed is None else seed}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    started = time.time()
    say = lambda text: print(f"[{name}:{seed} {time.time() - started:5.0f} s] {text}", flush=True)  # noqa: E731

    # 1. v1
    say(f"bootstrapping v1 on {len(sc.bootstrap)} rows, {len(sc.labels)} labels declared ({sc.name})")
    service_port, controller_port = free_port(), free_port()
    env = env_for(directory, quick, controller_port)
    registry_path = directory / "registry"
    if v1_registry is not None:  # a v1 bootstrapped on this scenario's rows already (the tests share theirs)
        shutil.copytree(v1_registry, registry_path)
    else:
        data = write_csv(directory / "bootstrap.csv", sc.bootstrap)
        tuneloop(["bootstrap", "--data", str(data), "--labels", ",".join(sc.labels), "--no-progress"], env,
                 directory / "bootstrap.log")
    registry = Registry(registry_path)
    v1 = registry.live_version()
    v1_manifest = registry.manifest(v1)
    if v1_manifest.labels != sc.labels:
        raise SystemExit(f"{registry_path}: v{v1} declares other labels than the scenario {sc.name}")
    shutil.copytree(registry_path, directory / "registry-v1")  # for the no-replay ablation
    state = ControllerState(directory / "feedback.db")

    # 2-5. serve, load, shift, loop
    url = f"http://127.0.0.1:{service_port}"
    say(f"serving on {url}, controller on :{controller_port}")
    with (
        running([str(BIN / "tuneloop"), "serve", "--port", str(service_port)], env, directory / "service.log",
                cwd=ROOT) as service,
        running([str(BIN / "tuneloop"), "controller"], env, directory / "controller.log", cwd=ROOT) as controller,
    ):
        wait_http(f"{url}/readyz", service, directory / "service.log")
        wait_http(f"http://127.0.0.1:{controller_port}/metrics", controller, directory / "controller.log")
        with Load(url, sc.test_old.texts, sc.test_new.texts) as load, httpx.Client(base_url=url, timeout=120) as app:
            say(f"load: {LOAD_THREADS} x {LOAD_RATE_PER_THREAD:.0f} req/s, old test texts only for {OLD_ONLY_S:.0f} s")
            time.sleep(OLD_ONLY_S)
            shift_at = time.time()
            load.shifted.set()
            sent = send_feedback(app, sc.feedback)
            feedback_in_s = time.time() - shift_at
            say(f"shift: {sent} feedback rows sent in {feedback_in_s:.1f} s; waiting for the trigger")
            loop = wait_for_loop(state, registry, load, v1, shift_at, trigger_wait_s, run_wait_s)
            say(f"loop: {loop['verdict']} {loop['reason']}")
            if loop["verdict"] == "promoted":
                time.sleep(AFTER_SWAP_S)
            run = loop["run"]
            if run is not None:
                run = wait_run_finished(state, run["id"], 120)
        records = load.records
    fired = [d for d in state.decisions() if d["outcome"] == "fired"]
    windows = state.windows()

    # Which version came of it, and what it trained on.
    verdict = loop["verdict"]
    candidates = [v for v in registry.list_versions() if v > v1]
    served_version = candidates[0] if candidates else None
    manifest = registry.manifest(served_version) if served_version else None
    training = manifest.training_data if manifest else {}
    trained_rows = training.get("feedback_rows") if manifest else None
    store = directory / "feedback.db"
    feedback = trained_feedback(store, v1_manifest.created_at, trained_rows, run["started_unix"] if run else None)
    run_start = run["started_unix"] if run else None
    run_end = unix_seconds(run["finished_at"]) if run and run["finished_at"] else None
    promoted = next((unix_seconds(e.time) for e in registry.history() if e.action == "promote" and e.version == served_version),
                    None) if verdict == "promoted" else None

    # Every replica on the new version: the first answer with it after the last answer with another one.
    live_at = None
    if verdict == "promoted":
        answered = [r for r in records if r["status"] == 200]
        last_other = max((r["time"] for r in answered if r["version"] != served_version), default=0.0)
        live_at = min((r["time"] for r in answered if r["version"] == served_version and r["time"] > last_other),
                      default=None)
    swaps = [float(s) for s in re.findall(r"swapped model v\d+ -> v\d+ in ([\d.]+) s",
                                         (directory / "service.log").read_text(errors="replace"))]

    # 7. ablation and oracle, on exactly the feedback the run trained on (all stored feedback when no run)
    say(f"no-replay ablation on {len(feedback)} feedback rows")
    ablation_dir = directory / "no-replay"
    trained_ids = {str(r["feedback_id"]) for r in feedback}
    ablation_version = no_replay(ablation_dir, directory / "registry-v1", store, trained_ids, quick)
    say(f"joint oracle: {len(sc.bootstrap)} bootstrap + {len(feedback)} feedback rows from scratch")
    oracle(directory / "oracle", sc.bootstrap, feedback, sc.labels, quick)

    # 8. accuracy
    say("evaluating v1, served, no-replay, oracle on the test rows")
    v1_rights = test_rows_right(registry_path, v1, sc)
    served_rights = test_rows_right(registry_path, served_version, sc) if served_version else None
    v1_figures = evaluate(registry_path, v1, sc, v1_rights)
    served = (evaluate(registry_path, served_version, sc, served_rights) if served_version
              else v1_figures | {"note": "no new version: v1 serves"})
    ablation = evaluate(ablation_dir / "registry", ablation_version, sc) if ablation_version else {
        "error": f"published nothing; see {ablation_dir / 'train.log'}",
        "log_tail": (ablation_dir / "train.log").read_text(errors="replace")[-1500:]}
    joint = evaluate(directory / "oracle" / "registry", 1, sc)

    phases = latency_phases(records, shift_at, run_start, run_end, live_at)
    recipes = {"v1": v1_figures.get("recipe"), "served": served.get("recipe") if served_version else None,
               "no_replay": ablation.get("recipe"), "oracle": joint.get("recipe")}
    failed = [r for r in records if r["status"] != 200]
    return {
        "scenario": name, "name": sc.name, "seed": seed, "kind": sc.kind,
        "labels_declared": len(sc.labels), "labels_old": len(sc.old_labels),
        "bootstrap_rows": len(sc.bootstrap), "feedback_rows_sent": sent, "feedback_in_s": round(feedback_in_s, 1),
        "test_rows": {"old": len(sc.test_old), "new": len(sc.test_new)},
        "v1": v1_figures, "served": served, "no_replay": ablation, "oracle": joint,
        "served_vs_v1": versus(v1_rights, served_rights, sc) if served_rights else None,
        "verdict": verdict, "reason": loop["reason"],
        "gate_failed": failing_checks(manifest.gate) if manifest else [],
        "run": {k: run[k] for k in RUN_FIELDS} if run else None,
        "shift_to_trigger_s": round(run_start - shift_at, 1) if run_start else None,
        "trigger_to_promoted_s": round(promoted - run_start, 1) if promoted and run_start else None,
        "trigger_to_live_s": round(live_at - run_start, 1) if live_at and run_start else None,
        "replica_swap_s": swaps,
        "train_samples_per_s": training.get("train_samples_per_second"),
        "epochs_run": training.get("epochs_run"),
        "planned_epochs": training.get("planned_epochs"),  # fewer than train.max_epochs when the time budget bound
        "steps": training.get("steps"), "planned_steps": training.get("planned_steps"),
        "train_seconds": training.get("train_seconds"),
        "confidence": manifest.export.get("confidence") if manifest else None,  # temperature, ECE before / after
        "standby_handed_after_s": standby_handed_after(run),  # null: the run started cold
        "export_seconds": manifest.export.get("seconds") if manifest else None,  # per export step; the rest of
        # trigger -> promoted outside training is start-up (imports, data, imprinting) and the controller's part
        "feedback_rows_at_trigger": run["new_rows"] if run else None,
        "feedback_rows_trained": trained_rows if manifest else None,
        "feedback_rows_ablation_oracle": len(feedback),
        "replayed_rows": training.get("replayed_rows"),
        "quantization": quantization(manifest) if manifest
        else {"recipe": None, "agreement": None, "latency_ratio": None},
        "recipes": recipes,
        "recipe_fallbacks": sum(1 for recipe in recipes.values() if fallback(recipe)),
        "drift_windows": {"evaluated": len(windows), "drifted": sum(1 for w in windows if w["drifted"])},
        "trigger_fired": [(d["decided_at"], d["reason"], d["detail"]) for d in fired],
        "load_threads": LOAD_THREADS, "load_rate_per_s": LOAD_THREADS * LOAD_RATE_PER_THREAD,
        "requests": len(records), "failed_requests": len(failed),
        "failed_by_status": {str(s): sum(1 for r in failed if r["status"] == s) for s in {r["status"] for r in failed}},
        "latency": phases,
        "load_p50_ms_steady": phases["steady"]["p50_ms"], "load_p99_ms_steady": phases["steady"]["p99_ms"],
        "load_p50_ms_training": phases.get("training", {}).get("p50_ms"),
        "load_p99_ms_training": phases.get("training", {}).get("p99_ms"),
        "quick": quick, "settings_overridden": {"TUNELOOP_TRAIN__MAX_EPOCHS": str(QUICK_EPOCHS)} if quick else {},
        "machine": machine(), "date": utc_now(), "commit": commit(),
        "took_s": round(time.time() - started), "workdir": str(directory),
    }


# --- output ----------------------------------------------------------------------------------------

def append_result(out: Path, result: dict[str, object]) -> list[dict]:
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() and out.read_text().strip() else []
    existing.append(result)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(existing, indent=2) + "\n")
    tmp.replace(out)
    return existing


def fmt(figures: dict | None, key: str) -> str:
    if not figures or figures.get(key) is None:
        return "-"
    return f"{figures[key]:.3f}"


def new_key(result: dict) -> str:
    return "shifted" if result.get("kind") == "no_new_labels" else "new"


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tuneloop scenarios (accuracy old / new; new = shifted domain for input shifts)")
    for column in ("scenario", "verdict", "v1", "served", "no replay", "oracle", "trigger->live s", "samples/s",
                   "rows", "recipe / agree / lat", "gate failed", "failed req", "p99 ms steady/train"):
        table.add_column(column)
    fallbacks = total = 0
    for r in results:
        if "error" in r:
            table.add_row(f"{r['scenario']}:{r['seed']}", "[red]error[/red]", *["-"] * 11)
            continue
        key = new_key(r)
        pair = lambda f: f"{fmt(f, 'old')} / {fmt(f, key)}"  # noqa: E731
        q = r["quantization"]
        total += sum(1 for recipe in r["recipes"].values() if recipe)
        fallbacks += r.get("recipe_fallbacks", 0)
        table.add_row(
            f"{r['scenario']}:{r['seed']}" + (" (quick)" if r["quick"] else ""), r["verdict"], pair(r["v1"]),
            pair(r["served"]), pair(r["no_replay"]), pair(r["oracle"]), str(r["trigger_to_live_s"] or "-"),
            str(r["train_samples_per_s"] or "-"), str(r["feedback_rows_trained"] or "-"),
            f"{q['recipe'] or '-'} / {q['agreement'] or '-'} / {q['latency_ratio'] or '-'}",
            ", ".join(r["gate_failed"]) or "-", f"{r['failed_requests']} of {r['requests']}",
            f"{r['load_p99_ms_steady']} / {r['load_p99_ms_training'] or '-'}",
        )
    Console(width=max(shutil.get_terminal_size().columns, 200)).print(table)
    print(f"quantization fell back from {RECIPES[0].name} in {fallbacks} of {total} versions built "
          "(v1, served, no-replay, oracle)")


def markdown(results: list[dict]) -> str:
    """The README's two tables from a results file: accuracy per model, then the loop's figures against the goals
    (the latest result of each scenario:seed, full runs only)."""
    latest = {f"{r['scenario']}:{r['seed']}": r for r in results if "error" not in r and not r.get("quick")}

    def acc(figures: dict, key: str) -> str:
        value, ci = figures.get(key), figures.get(f"{key}_ci95")
        return "" if value is None else f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"

    lines = ["| scenario | model | old labels | new labels / shifted domain | gate |", "|---|---|---|---|---|"]
    for key, r in latest.items():
        new, ablation = new_key(r), r["no_replay"]
        refused = ", ".join(f"`{check}`" for check in ablation.get("gate_failed", []))
        lines += [
            f"| `{key}` {r['name']} ({r['feedback_rows_sent']} feedback rows) | v1 | {acc(r['v1'], 'old')} | "
            f"{acc(r['v1'], new)} |  |",
            f"|  | served | {acc(r['served'], 'old')} | {acc(r['served'], new)} | {r['verdict']} |",
            f"|  | no replay | {acc(ablation, 'old')} | {acc(ablation, new)} | {ablation.get('status')}"
            f"{': ' + refused if refused else ''} |",
            f"|  | joint oracle | {acc(r['oracle'], 'old')} | {acc(r['oracle'], new)} |  |",
        ]
    keys = list(latest)
    lines += ["", "| loop figure | " + " | ".join(f"`{k}`" for k in keys) + " | goal |", "|---|" + "---|" * (len(keys) + 1)]

    def row(name: str, cell, goal: str = "") -> None:
        lines.append(f"| {name} | " + " | ".join(cell(latest[k]) for k in keys) + f" | {goal} |")

    def gap(r: dict) -> str:
        new = new_key(r)
        return (f"{100 * (r['served']['old'] - r['oracle']['old']):+.1f} / "
                f"{100 * (r['served'][new] - r['oracle'][new]):+.1f}")

    def p99(r: dict) -> str:
        steady, training = r["load_p99_ms_steady"], r["load_p99_ms_training"]
        return f"{steady} / {training} ms ({training / steady:.2f}×)" if steady and training else "-"

    def recipe(r: dict) -> str:
        q = r["quantization"]
        return f"`{q['recipe']}`, {100 * q['agreement']:.1f} %, {q['latency_ratio']:.2f}×" if q["recipe"] else "-"

    row("served - oracle, old / new (points)", gap, "within 2")
    row("feedback rows trained on / sent", lambda r: f"{r['feedback_rows_trained']} / {r['feedback_rows_sent']}")
    row("trigger → every replica live", lambda r: f"{r['trigger_to_live_s']:.0f} s" if r["trigger_to_live_s"] else "-",
        "≤ 180 s")
    def training(r: dict) -> str:
        steps = f", steps {r['steps']} of {r['planned_steps']}" if r.get("planned_steps") else ""
        return (f"{r.get('train_seconds') or '-'} s, {r['epochs_run']} ({r.get('planned_epochs') or '-'}){steps}, "
                f"{r['train_samples_per_s']}")

    row("training: seconds, epochs (planned), samples/s", training)
    row("load p99 steady / while training", p99, "≤ 2×")
    row("failed requests", lambda r: f"{r['failed_requests']} of {r['requests']}", "0")
    row("quantization: recipe, agreement, latency vs v1", recipe, "full int8, ≥ 99 %, ≤ 1.15×")
    row("commit measured", lambda r: f"`{r.get('commit') or '-'}`")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "error" not in r]
    if not done:
        return
    models = (("v1", "v1"), ("served", "served"), ("no_replay", "no replay"), ("oracle", "joint oracle"))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(done) + 4), 4.5), sharey=True)
    x = np.arange(len(done))
    width = 0.2
    for axis, which in zip(axes, ("old", "new"), strict=True):
        for i, (key, label) in enumerate(models):
            values, errors = [], [[], []]
            for r in done:
                figures = r.get(key) or {}
                name = which if which == "old" else new_key(r)
                value, ci = figures.get(name), figures.get(f"{name}_ci95")
                values.append(value if value is not None else np.nan)
                errors[0].append(value - ci[0] if value is not None and ci else 0)
                errors[1].append(ci[1] - value if value is not None and ci else 0)
            axis.bar(x + (i - 1.5) * width, values, width, yerr=errors, capsize=2, label=label)
        axis.set_xticks(x, [f"{r['scenario']}:{r['seed']}\n{r['verdict']}" for r in done], fontsize=8)
        axis.set_title("old test rows" if which == "old" else "new labels / shifted domain test rows")
        axis.set_ylim(0, 1.02)
        axis.set_xlim(-0.7, max(len(done), 2) - 0.3)
    axes[0].set_ylabel("accuracy (95 % Wilson interval)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("tuneloop scenarios: v1, served after the loop, without replay, joint retrain")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS, help=f"NAME:SEED,... (default {DEFAULT_SCENARIOS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI: TUNELOOP_TRAIN__MAX_EPOCHS={QUICK_EPOCHS}, nothing else")
    parser.add_argument("--out", type=Path, default=RESULTS / "scenarios.json")
    parser.add_argument("--workdir", type=Path, default=Path("var/scenarios"))
    parser.add_argument("--trigger-wait", type=float, default=300, help="seconds after the shift for a run to start")
    parser.add_argument("--run-wait", type=float, default=900,
                        help="seconds after the run starts for every replica to serve its version")
    parser.add_argument("--v1-registry", type=Path, default=None,
                        help="a registry whose v1 was bootstrapped on the (single) scenario's rows: copied, not rebuilt")
    parser.add_argument("--markdown", action="store_true", help="print the README's tables from --out and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    chosen = parse_scenarios(args.scenarios)
    if args.v1_registry is not None and len(chosen) != 1:
        raise SystemExit("--v1-registry serves one scenario; name exactly one in --scenarios")
    workdir = args.workdir.resolve()
    plot_path = args.out.with_suffix(".png")
    results = []
    for name, seed in chosen:
        try:
            result = run_scenario(name, seed, workdir, args.quick, args.trigger_wait, args.run_wait, args.v1_registry)
        except Exception as exc:  # one broken scenario must not cost the others
            traceback.print_exc()
            result = {"scenario": name, "seed": seed, "error": f"{type(exc).__name__}: {exc}"[-3000:],
                      "quick": args.quick, "machine": machine(),
                      "date": utc_now()}
        results.append(result)
        plot(append_result(args.out, result), plot_path)  # every scenario in the file, not only this run's
        print(json.dumps({k: v for k, v in result.items() if k != "latency"}, indent=2), flush=True)
    print_table(results)
    print(f"results appended to {args.out}; plot {plot_path}")


if __name__ == "__main__":
    main()
