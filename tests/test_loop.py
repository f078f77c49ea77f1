"""The loop on the reference scenario: fine-tune on feedback, gate, hot swap, roll back.

CI runs a reduced version (10 feedback rows per new intent); `benchmarks/loop.py` and
`benchmarks/scenarios.py` run the full one. The scenario: v1 knows three CLINC150 domains, with all six domains'
intents declared; feedback arrives for the three others.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from monitoring.state import ControllerState
from tests.support.processes import bus_env, run_cli, running_controller, running_service, tuneloop_env
from trainer import scenario
from trainer.data import write_csv
from tuneloop.events import FeedbackEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.inference import OnnxTextClassifier
from tuneloop.registry import Registry
from tuneloop.runs import ACTIVE

pytestmark = pytest.mark.slow

FEEDBACK_PER_INTENT = 10
# Fine-tuning must teach 45 unseen intents from 10 rows each: 3 epochs leave their margins too thin
# for int8 parity (measured: 97 % agreement, rejected); 6 reach it (99.4 %, about 100 s on 2 cores).
TRAIN_EPOCHS = "6"
# The trigger waits for nearly all the feedback (450 rows): measured in CI, a run fired at 224 rows
# (5 per intent) left full int8 at 98.9 % parity, and the slower fallback then failed the latency check.
MIN_NEW_ROWS = 440


@pytest.fixture
def registry(clinc_registry: Path, tmp_path: Path) -> Path:
    """A private copy of the scenario's v1: these tests promote and roll back."""
    return Path(shutil.copytree(clinc_registry, tmp_path / "registry"))


def accuracy(registry: Path, version: int, domains: tuple[str, ...]) -> float:
    manifest, directory = Registry(registry).resolve(version)
    data = scenario.sample(domains, "test", None, seed=3)
    predicted = OnnxTextClassifier.from_version(manifest, directory, "cpu").predict(data.texts).probabilities.argmax(1)
    return sum(manifest.labels[int(p)] == label for p, label in zip(predicted, data.labels, strict=True)) / len(data)


def fill_store(store_path: Path, labels_shuffled: bool = False) -> int:
    """Feedback by text for the new domains, as an application would send it."""
    data = scenario.sample(scenario.NEW_DOMAINS, "train", FEEDBACK_PER_INTENT, seed=2)
    labels = list(data.labels)
    if labels_shuffled:
        random.Random(0).shuffle(labels)
    FeedbackStore(store_path).write([], [FeedbackEvent(text=t, label=label) for t, label in zip(data.texts, labels, strict=True)])
    return len(data)


def train_cli(registry: Path, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = tuneloop_env(registry, TUNELOOP_CONTROLLER__STORE_URL=str(store), TUNELOOP_TRAIN__MAX_EPOCHS=TRAIN_EPOCHS)
    return run_cli("train", "--no-progress", *args, env=env, check=False)


def test_a_candidate_trained_on_shuffled_labels_is_rejected_kept_and_never_served(registry: Path, tmp_path: Path
                                                                                   ) -> None:
    # The no-replay candidate's rejection is measured by tests/test_scenarios.py beside a joint retrain.
    fill_store(tmp_path / "store.db", labels_shuffled=True)
    result = train_cli(registry, tmp_path / "store.db")
    assert result.returncode == 3, result.stdout + result.stderr
    reg = Registry(registry)
    manifest = reg.manifest(2)
    assert manifest.status == "rejected" and reg.live_version() == 1
    checks = manifest.gate["checks"]
    assert not checks["new_data_accuracy"]["passed"], checks["new_data_accuracy"]
    assert manifest.training_data["replayed_rows"] > 0
    with pytest.raises(Exception, match="rejected by the validation gate"):
        reg.promote(2)
    assert "REJECTED" in result.stdout
    assert "rejected" in run_cli("history", env=tuneloop_env(registry)).stdout


def test_drift_triggers_training_with_replay_and_both_replicas_swap_without_a_failed_request(
    registry: Path, kafka: object, tmp_path: Path
) -> None:
    env = bus_env("kafka", tmp_path, kafka.bootstrap_servers, **{
        "TUNELOOP_TRIGGER__CONSECUTIVE_WINDOWS": "2", "TUNELOOP_TRIGGER__MIN_NEW_ROWS": str(MIN_NEW_ROWS),
        "TUNELOOP_TRIGGER__RUNS_DIR": str(tmp_path / "runs"), "TUNELOOP_TRAIN__MAX_EPOCHS": TRAIN_EPOCHS,
    })
    state = ControllerState(env["TUNELOOP_CONTROLLER__STORE_URL"])
    old_before = accuracy(registry, 1, scenario.OLD_DOMAINS)
    new_before = accuracy(registry, 1, scenario.NEW_DOMAINS)
    feedback = scenario.sample(scenario.NEW_DOMAINS, "train", FEEDBACK_PER_INTENT, seed=2)
    probes = scenario.sample(scenario.OLD_DOMAINS + scenario.NEW_DOMAINS, "val", 2, seed=4).texts
    with (
        running_service(registry, tmp_path / "a", **env) as replica_a,
        running_service(registry, tmp_path / "b", **env) as replica_b,
        running_controller(registry, tmp_path, env),
    ):
        outcomes: list[tuple[str, int | str]] = []
        stop = threading.Event()

        def load(url: str) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    try:
                        response = client.post("/predict", json={"texts": random.sample(probes, 4)})
                        outcomes.append((url, response.json()[0]["model_version"] if response.status_code == 200
                                         else f"HTTP {response.status_code}"))
                    except (httpx.HTTPError, ValueError) as exc:
                        outcomes.append((url, f"{type(exc).__name__}: {exc}"))
                    time.sleep(0.2)

        loaders = [threading.Thread(target=load, args=(r.url,), daemon=True) for r in (replica_a, replica_b)]
        for thread in loaders:
            thread.start()
        with replica_a.client() as client:
            for start in range(0, len(feedback), 32):
                texts, labels = feedback.texts[start : start + 32], feedback.labels[start : start + 32]
                predictions = client.post("/predict", json={"texts": texts}).json()
                items = [{"request_id": p["request_id"], "label": label} for p, label in zip(predictions, labels, strict=True)]
                assert client.post("/feedback/batch", json={"items": items}).status_code == 202
        deadline = time.monotonic() + 600
        while Registry(registry).live_version() != 2 or {v for _, v in outcomes[-20:]} != {2}:
            runs = state.runs()
            assert not runs or runs[0]["status"] in (*ACTIVE, "succeeded"), (runs, Path(runs[0]["log_path"]).read_text())
            assert time.monotonic() < deadline, f"no swap to v2: runs {runs}, decisions {state.decisions()[-3:]}"
            time.sleep(1)
        time.sleep(2)
        stop.set()
        for thread in loaders:
            thread.join()

    failures = [o for o in outcomes if not isinstance(o[1], int)]
    assert failures == [], failures[:5]
    for replica in (replica_a, replica_b):  # each replica served v1, then v2, and never v1 again after v2
        versions = [v for url, v in outcomes if url == replica.url]
        assert versions[0] == 1 and versions[-1] == 2
        assert 1 not in versions[versions.index(2):]
    [run] = state.runs()
    assert run["source"] == "drift" and run["status"] == "succeeded"
    manifest = Registry(registry).manifest(2)
    assert manifest.status == "accepted" and manifest.parent_version == 1
    assert manifest.training_data["replayed_rows"] > 0 and manifest.training_data["run_id"] == run["id"]
    assert all(check["passed"] for check in manifest.gate["checks"].values())
    old_after, new_after = accuracy(registry, 2, scenario.OLD_DOMAINS), accuracy(registry, 2, scenario.NEW_DOMAINS)
    print(f"\nold domains {old_before:.3f} -> {old_after:.3f}; new domains {new_before:.3f} -> {new_after:.3f}; "
          f"requests {Counter(v for _, v in outcomes)}")
    assert new_after >= new_before + 0.4
    assert old_after >= old_before - 0.05

    rolled = run_cli("rollback", "--reason", "test", env=tuneloop_env(registry))
    assert "rolled back v2 -> v1" in rolled.stdout
    assert [(e.action, e.version) for e in Registry(registry).history()] == [("promote", 1), ("promote", 2), ("rollback", 1)]


def test_feedback_labelled_out_of_scope_teaches_the_declared_label_and_keeps_the_intents(tmp_path: Path) -> None:
    # serve.out_of_scope_label (`oos`): declared at bootstrap, never seen by v1; feedback labels texts no intent
    # covers with it, and the fine-tuned version must answer it for out-of-scope texts it never saw.
    registry = tmp_path / "registry"
    domain = ("banking",)
    data = write_csv(tmp_path / "bootstrap.csv", scenario.sample(domain, "train", 30, seed=0))
    labels = [*scenario.domain_labels(domain), "oos"]
    run_cli("bootstrap", "--data", str(data), "--labels", ",".join(labels), "--no-progress", env=tuneloop_env(registry))
    out_of_scope = scenario.out_of_scope("train", 100, seed=0)
    FeedbackStore(tmp_path / "store.db").write([], [FeedbackEvent(text=t, label="oos") for t in out_of_scope.texts])
    result = train_cli(registry, tmp_path / "store.db")
    assert result.returncode == 0, result.stdout + result.stderr
    unseen_out, in_scope = scenario.out_of_scope("test", 200, seed=1), scenario.sample(domain, "test", None, seed=1)

    def answers(version: int, texts: list[str]) -> list[str]:
        manifest, directory = Registry(registry).resolve(version)
        scores = OnnxTextClassifier.from_version(manifest, directory, "cpu").predict(texts).probabilities
        return [manifest.labels[int(i)] for i in scores.argmax(1)]

    recall = {v: answers(v, unseen_out.texts).count("oos") / len(unseen_out) for v in (1, 2)}
    accuracy = {v: sum(a == t for a, t in zip(answers(v, in_scope.texts), in_scope.labels, strict=True)) / len(in_scope)
                for v in (1, 2)}
    assert recall[1] < 0.05 and recall[2] > 0.6, recall
    assert accuracy[2] > accuracy[1] - 0.05, accuracy
    assert Registry(registry).live_version() == 2
