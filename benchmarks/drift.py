"""Drift benchmark: controller CPU per 1,000 prediction events, false alarms, and detection delay.

Real models (bootstrapped here by the CLI when the registries are empty), real ONNX Runtime
predictions, the real controller (`Controller.step`: parse, store, windows, trigger) on the
embedded log. Two shifts:

- imdb -> amazon (input drift, same task): held-out imdb traffic first, for the false-alarm
  rate over many windows, then amazon reviews, for the delay until each signal flags them.
- CLINC150 old -> new domains (a shift that hurts), with labelled feedback on every other
  prediction, for the delay of the confidence and feedback-accuracy signals and the trigger.
  Before the shift, the old domains' test split, which differs a little from the train split the
  reference comes from (v1 is less accurate on it); and, replayed alone, the old domains' train rows
  v1 never saw: traffic from the reference's own distribution, for the detector's false-alarm rate.

    .venv/bin/python benchmarks/drift.py            # results in benchmarks/results/drift.json, drift_clinc.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitoring.controller import Controller  # noqa: E402
from monitoring.metrics import controller_metrics  # noqa: E402
from monitoring.state import ControllerState  # noqa: E402
from trainer import scenario  # noqa: E402
from trainer.data import LabelledTexts, load_csv, split, traffic_order, write_csv  # noqa: E402
from tuneloop.config import Settings  # noqa: E402
from tuneloop.events import FeedbackEvent, PredictionEvent, new_id  # noqa: E402
from tuneloop.inference import OnnxTextClassifier  # noqa: E402
from tuneloop.registry import Registry  # noqa: E402

IMDB, AMAZON = ROOT / "data" / "sentiment" / "imdb.csv", ROOT / "data" / "sentiment" / "amazon.csv"
RESULTS = ROOT / "benchmarks" / "results"
TRIGGER_SIGNALS = Settings().trigger.signals
BOOTSTRAP_PER_INTENT = 30  # CLINC v1's rows per intent; the other 70 of the train split are traffic it never saw


def ensure_registry(path: Path, data: Path, labels: list[str] | None) -> Path:
    if Registry(path).live_version() is None:
        args = [str(Path(sys.executable).with_name("tuneloop")), "bootstrap", "--data", str(data), "--no-progress"]
        args += ["--labels", ",".join(labels)] if labels else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")} | {
            "TUNELOOP_REGISTRY__URL": str(path), "HF_HUB_OFFLINE": "1"}
        print(f"bootstrapping {path} from {data.name} ...", flush=True)
        subprocess.run(args, env=env, check=True, cwd=ROOT)
    return path


def prediction_events(registry: Path, data: LabelledTexts) -> list[tuple[PredictionEvent, str]]:
    """(event, true label) for each text, scored by the registry's live version in ONNX Runtime."""
    manifest, directory = Registry(registry).resolve()
    classifier = OnnxTextClassifier.from_version(manifest, directory, "cpu")
    scores = classifier.predict(data.texts)
    events = []
    for i, (text, truth) in enumerate(zip(data.texts, data.labels, strict=True)):
        row = scores.probabilities[i]
        events.append((PredictionEvent(
            request_id=new_id(), text=text, label=manifest.labels[int(row.argmax())],
            scores={label: round(float(p), 6) for label, p in zip(manifest.labels, row, strict=True)},
            model_version=manifest.version, sketch=[round(float(x), 4) for x in scores.sketch[i]],
            tokens=int(scores.tokens[i]), unknown_tokens=int(scores.unknown_tokens[i]),
        ), truth))
    return events


def run_controller(registry: Path, stream: list[tuple[PredictionEvent, str]], feedback_every: int, metrics, workdir: Path
                   ) -> tuple[float, ControllerState]:
    """Publish the stream (and feedback on every n-th prediction) to a fresh embedded log; drain it through the
    controller; return its CPU seconds and its state."""
    os.environ["TUNELOOP_REGISTRY__URL"] = str(registry)
    settings = Settings()
    settings.registry.url = str(registry)
    settings.events.embedded_path = workdir / "events.db"
    settings.controller.store_url = str(workdir / "store.db")
    settings.trigger.command = [sys.executable, "-c", "pass"]  # the run itself is not what is measured
    settings.trigger.runs_dir = workdir / "runs"
    settings.trigger.consecutive_windows, settings.trigger.min_new_rows = 2, 100
    settings.trigger.feedback_quiet_s = 0  # a replay drains in seconds: wall-clock pauses do not map to events
    controller = Controller(settings, metrics=metrics)
    topics = settings.events.topics
    controller.bus.ensure_topics(topics.model_dump().values())
    for start in range(0, len(stream), 500):
        chunk = stream[start : start + 500]
        controller.bus.publish_many(topics.predictions, [(e.request_id.encode(), e.model_dump_json().encode()) for e, _ in chunk])
        labelled = [FeedbackEvent(request_id=e.request_id, label=truth) for i, (e, truth) in enumerate(chunk, start)
                    if feedback_every and i % feedback_every == 0]
        if labelled:
            controller.bus.publish_many(topics.feedback, [(f.feedback_id.encode(), f.model_dump_json().encode()) for f in labelled])
    consumer = controller.bus.consumer(settings.controller.group_id, [topics.predictions, topics.feedback])
    started = time.process_time()
    while controller.step(consumer):
        pass
    return time.process_time() - started, controller.state


def delays(state: ControllerState, switch_at: int, signals: list[str]) -> dict[str, int | None]:
    after = [w for w in state.windows() if w["events_seen"] > switch_at]
    return {s: next((w["events_seen"] - switch_at for w in after if s in w["drifted"]), None) for s in signals}


def summary(values: list[int | None]) -> dict[str, object]:
    seen = [v for v in values if v is not None]
    return {"median": statistics.median(seen) if seen else None, "min": min(seen, default=None),
            "max": max(seen, default=None), "missed": len(values) - len(seen)}


def plot(state: ControllerState, switch_at: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = state.windows()
    x = [w["events_seen"] for w in windows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name in ("confidence_ks", "class_mix_chi2", "embedding_mmd", "input_length_ks"):
        top.semilogy(x, [max(next((s["p_value"] for s in w["signals"] if s["name"] == name), 1.0), 1e-6) for w in windows], label=name)
    top.axhline(Settings().drift.alpha, color="grey", linestyle=":", label="alpha")
    top.set_ylabel("adjusted p-value")
    top.legend(fontsize=8, loc="lower left")
    for name in ("feedback_accuracy", "confidence_psi"):
        points = [(w["events_seen"], s["value"], s["threshold"]) for w in windows for s in w["signals"] if s["name"] == name]
        if points:
            line = bottom.plot([p[0] for p in points], [p[1] for p in points], label=name)[0]
            bottom.plot([p[0] for p in points], [p[2] for p in points], linestyle=":", color=line.get_color(), label=f"{name} threshold")
    for axis in (top, bottom):
        axis.axvline(switch_at, color="red", linestyle="--")
    bottom.set_xlabel("prediction events (red: traffic switches to the new domains)")
    bottom.legend(fontsize=8, loc="lower left")
    fig.suptitle("CLINC150: v1 knows 3 domains, traffic from 3 others")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registries", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--seeds", type=int, default=5, help="Replays per shift, each in a different order.")
    parser.add_argument("--events", type=int, default=2000, help="Events before the shift, per replay.")
    args = parser.parse_args()

    imdb_bootstrap, imdb_traffic = split(load_csv(IMDB), 0.3, seed=13)
    work = Path(tempfile.mkdtemp(prefix="tuneloop-drift-bench-"))
    imdb_registry = ensure_registry(args.registries / "imdb", write_csv(work / "imdb-bootstrap.csv", imdb_bootstrap), None)
    clinc_registry = ensure_registry(
        args.registries / "clinc",
        write_csv(work / "clinc-bootstrap.csv",
                  scenario.sample(scenario.OLD_DOMAINS, "train", BOOTSTRAP_PER_INTENT, seed=0)),
        scenario.label_set(),
    )
    metrics = controller_metrics()
    imdb_events = prediction_events(imdb_registry, imdb_traffic)
    amazon_events = prediction_events(imdb_registry, load_csv(AMAZON))
    old_events = prediction_events(clinc_registry, scenario.sample(scenario.OLD_DOMAINS, "test", None, seed=1))
    unseen_events = prediction_events(clinc_registry, scenario.sample(scenario.OLD_DOMAINS, "train", None, seed=0,
                                                                      skip=BOOTSTRAP_PER_INTENT))
    new_events = prediction_events(clinc_registry, scenario.sample(scenario.NEW_DOMAINS, "test", None, seed=1))

    cpu_per_1000, imdb_windows, imdb_alarms, imdb_trigger_alarms = [], 0, 0, 0
    imdb_alarm_signals: Counter[str] = Counter()
    clinc_windows, clinc_alarm_signals, clinc_false_triggers = 0, Counter(), 0
    unseen_windows, unseen_alarms, unseen_alarm_signals = 0, 0, Counter()
    sentiment_delays: dict[str, list] = {}
    clinc_delays: dict[str, list] = {}
    for seed in range(args.seeds):
        rng = random.Random(seed)
        before = [imdb_events[i] for i in traffic_order(len(imdb_events), args.events, seed)]
        after = rng.sample(amazon_events, len(amazon_events))
        cpu, state = run_controller(imdb_registry, before + after, 0, metrics, work / f"imdb-{seed}")
        cpu_per_1000.append(1000 * cpu / (len(before) + len(after)))
        quiet = [w for w in state.windows() if w["events_seen"] <= len(before)]
        imdb_windows += len(quiet)
        imdb_alarms += sum(bool(w["drifted"]) for w in quiet)
        imdb_trigger_alarms += sum(bool(set(w["drifted"]) & set(TRIGGER_SIGNALS)) for w in quiet)
        imdb_alarm_signals.update(name for w in quiet for name in w["drifted"])
        for name, delay in delays(state, len(before), ["embedding_mmd", "input_length_ks", "confidence_ks"]).items():
            sentiment_delays.setdefault(name, []).append(delay)

        before = [old_events[i] for i in traffic_order(len(old_events), args.events, seed)]
        after = rng.sample(new_events, 1200)
        cpu, state = run_controller(clinc_registry, before + after, 2, metrics, work / f"clinc-{seed}")
        cpu_per_1000.append(1000 * cpu / (len(before) + len(after)))
        fired = [d for d in state.decisions() if d["outcome"] == "fired"]
        quiet = [w for w in state.windows() if w["events_seen"] <= len(before)]
        clinc_windows += len(quiet)
        clinc_alarm_signals.update(name for w in quiet for name in w["drifted"])
        names = ["confidence_ks", "confidence_psi", "class_mix_chi2", "embedding_mmd", "input_length_ks", "feedback_accuracy"]
        for name, delay in delays(state, len(before), names).items():
            clinc_delays.setdefault(name, []).append(delay)
        trigger_delay = None
        if fired:
            # The window that fired is the last one recorded before the decision.
            fired_window = [w for w in state.windows() if w["evaluated_at"] <= fired[0]["decided_at"]][-1]
            trigger_delay = fired_window["events_seen"] - len(before)
            if trigger_delay <= 0:  # fired on the old domains: a false trigger, not a detection
                clinc_false_triggers += 1
                trigger_delay = None
        clinc_delays.setdefault("trigger fired", []).append(trigger_delay)
        clinc_delays.setdefault("runs started", []).append(len(state.runs()))
        stream = [unseen_events[i] for i in traffic_order(len(unseen_events), args.events, seed)]
        _, unseen_state = run_controller(clinc_registry, stream, 0, metrics, work / f"clinc-unseen-{seed}")
        unseen_windows += len(unseen_state.windows())
        unseen_alarms += sum(bool(w["drifted"]) for w in unseen_state.windows())
        unseen_alarm_signals.update(name for w in unseen_state.windows() for name in w["drifted"])
        if seed == 0:
            RESULTS.mkdir(parents=True, exist_ok=True)
            plot(state, len(before), RESULTS / "drift_clinc.png")

    settings = Settings()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "window": {"size": settings.drift.window_size, "step": settings.drift.window_step, "alpha": settings.drift.alpha},
        "trigger": {"consecutive_windows": 2, "min_new_rows": 100},
        "controller_cpu_seconds_per_1000_events": summary([round(v, 3) for v in cpu_per_1000]),
        "imdb_false_alarms": {"windows": imdb_windows, "any_signal": imdb_alarms, "trigger_signals": imdb_trigger_alarms,
                              "rate_any": round(imdb_alarms / max(imdb_windows, 1), 4)},
        "imdb_alarm_signals": dict(imdb_alarm_signals),
        "clinc_old_domain_windows": {"windows": clinc_windows, "alarm_signals": dict(clinc_alarm_signals),
                                     "false_triggers": clinc_false_triggers},
        "clinc_unseen_train_false_alarms": {"windows": unseen_windows, "any_signal": unseen_alarms,
                                            "rate_any": round(unseen_alarms / max(unseen_windows, 1), 4),
                                            "alarm_signals": dict(unseen_alarm_signals)},
        "imdb_to_amazon_delay_events": {k: summary(v) for k, v in sentiment_delays.items()},
        "clinc_old_to_new_delay_events": {k: summary(v) for k, v in clinc_delays.items() if k != "runs started"},
        "clinc_runs_started_per_replay": clinc_delays["runs started"],
        "seeds": args.seeds, "events_before_shift": args.events,
    }
    (RESULTS / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
