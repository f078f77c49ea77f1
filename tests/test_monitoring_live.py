"""Drift and the trigger on live replays: real `bentoml serve`, real controller, real Prometheus.

(a) imdb traffic the model never saw, then amazon reviews: no false trigger on imdb (the
false-alarm rate over many windows is reported), and the switch shows up in the embedding and
length signals within a measured number of events.
(b) The reference scenario on the real Kafka broker: v1 knows three CLINC150 domains and meets
the three others; confidence and feedback accuracy fall, the trigger fires once, and the
cooldown suppresses it after that. Prometheus scrapes both processes throughout: every panel
of the shipped Grafana dashboard returns data and every alert rule evaluates.

The controller's training command is replaced by a stand-in process that sleeps and exits 0:
these tests are about when a run starts, not about training (the loop tests run the real one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from monitoring.state import ControllerState
from tests.support.dashboard import ROLLOUT_ROW, assert_panels_have_data, dashboard_queries
from tests.support.data import AMAZON, ROOT, clinc_unseen, imdb_parts
from tests.support.processes import (
    BIN,
    Prometheus,
    bus_env,
    free_port,
    running_controller,
    running_prometheus,
    running_service,
    tuneloop_env,
    wait_for,
)
from trainer import scenario
from trainer.data import load_csv, traffic_order
from tuneloop.config import DriftConfig
from tuneloop.runs import ACTIVE

pytestmark = pytest.mark.slow

STAND_IN_RUN = json.dumps([sys.executable, "-c", "import time; time.sleep(3)"])
WINDOW = DriftConfig().window_size
STEP = DriftConfig().window_step


def replay(client: httpx.Client, texts: list[str], labels: list[str] | None = None, batch: int = 32) -> None:
    """Predict every text, in order; with labels, send each prediction's true label back as feedback."""
    for start in range(0, len(texts), batch):
        response = client.post("/predict", json={"texts": texts[start : start + batch]})
        assert response.status_code == 200, response.text
        if labels is not None:
            items = [
                {"request_id": p["request_id"], "label": label}
                for p, label in zip(response.json(), labels[start : start + batch], strict=True)
            ]
            feedback = client.post("/feedback/batch", json={"items": items})
            assert feedback.status_code == 202, feedback.text


def events_windowed(state: ControllerState) -> int:
    windows = state.windows()
    return windows[-1]["events_seen"] if windows else 0


def trigger_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "TUNELOOP_TRIGGER__CONSECUTIVE_WINDOWS": "2",
        "TUNELOOP_TRIGGER__MIN_NEW_ROWS": "100",
        "TUNELOOP_TRIGGER__COOLDOWN_S": "3600",
        "TUNELOOP_TRIGGER__COMMAND": STAND_IN_RUN,
        "TUNELOOP_TRIGGER__RUNS_DIR": str(tmp_path / "runs"),
    } | extra


def test_imdb_raises_no_alarm_and_amazon_shows_in_embedding_and_length(registry_path: Path, tmp_path: Path) -> None:
    traffic = imdb_parts()[1]  # 300 rows v1 never trained or validated on
    picks = traffic_order(len(traffic), 2000, seed=5)
    imdb_texts, imdb_labels = [traffic.texts[i] for i in picks], [traffic.labels[i] for i in picks]
    amazon = load_csv(AMAZON).texts[:800]
    env = bus_env("embedded", tmp_path, **trigger_env(tmp_path))
    state = ControllerState(env["TUNELOOP_CONTROLLER__STORE_URL"])
    with running_service(registry_path, tmp_path, **env) as service, running_controller(registry_path, tmp_path, env):
        with service.client() as client:
            replay(client, imdb_texts, imdb_labels)
            wait_for(lambda: events_windowed(state) >= len(imdb_texts), 120, "the imdb windows")
            imdb_windows = state.windows()
            imdb_decisions = state.decisions()
            replay(client, amazon)
            wait_for(lambda: events_windowed(state) >= len(imdb_texts) + len(amazon), 120, "the amazon windows")
    windows = len(imdb_windows)
    assert windows == (len(imdb_texts) - WINDOW) // STEP + 1
    alarms = [w for w in imdb_windows if w["drifted"]]
    print(f"\nimdb: {len(alarms)} of {windows} windows flagged any signal "
          f"(false-alarm rate {len(alarms) / windows:.3f}): {[w['drifted'] for w in alarms]}")
    assert len(alarms) / windows <= 0.1
    assert not [d for d in imdb_decisions if d["outcome"] == "fired"], imdb_decisions

    after = [w for w in state.windows() if w["events_seen"] > len(imdb_texts)]
    delays = {}
    for signal in ("embedding_mmd", "input_length_ks"):
        first = next((w for w in after if signal in w["drifted"]), None)
        assert first is not None, f"{signal} never flagged amazon traffic: {[w['drifted'] for w in after]}"
        delays[signal] = first["events_seen"] - len(imdb_texts)
    print(f"amazon detected after {delays} events (window {WINDOW}, step {STEP})")
    assert max(delays.values()) <= WINDOW


def test_clinc_shift_fires_the_trigger_once_per_cooldown_and_drives_the_dashboard(
    clinc_registry: Path, kafka: object, tmp_path: Path
) -> None:
    old = clinc_unseen(10)  # 450 rows of known intents v1 never saw (CLINC's test split is itself a small shift)
    new = scenario.sample(scenario.NEW_DOMAINS, "test", 20, seed=1)  # 900 rows of intents v1 never saw
    service_port, controller_port, token = free_port(), free_port(), "test-admin-token"
    env = bus_env(
        "kafka", tmp_path, kafka.bootstrap_servers,
        **trigger_env(tmp_path, TUNELOOP_CONTROLLER__PORT=str(controller_port), TUNELOOP_CONTROLLER__ADMIN_TOKEN=token),
    )
    state = ControllerState(env["TUNELOOP_CONTROLLER__STORE_URL"])
    targets = {"tuneloop-service": f"127.0.0.1:{service_port}", "tuneloop-controller": f"127.0.0.1:{controller_port}"}
    with (
        running_prometheus(targets, tmp_path) as prometheus,
        running_service(clinc_registry, tmp_path, port=service_port, **env) as service,
        running_controller(clinc_registry, tmp_path, env) as controller,
        service.client() as client,
    ):
        replay(client, old.texts, old.labels)
        wait_for(lambda: events_windowed(state) >= len(old) - STEP, 120, "the old-domain windows")
        assert [d for d in state.decisions() if d["outcome"] == "fired"] == []

        replay(client, new.texts, new.labels)
        wait_for(lambda: events_windowed(state) >= len(old) + len(new) - STEP, 120, "the new-domain windows")
        # The run starts once the labelled feedback has paused (trigger.feedback_quiet_s), on the controller's tick.
        wait_for(lambda: any(d["outcome"] == "fired" for d in state.decisions()), 60, "the trigger to fire")
        decisions = state.decisions()
        fired = [d for d in decisions if d["outcome"] == "fired"]
        assert len(fired) == 1 and fired[0]["source"] == "drift", decisions
        # The shift goes on after the run started: the cooldown (or the run itself) holds off a second one.
        replay(client, new.texts[:300], new.labels[:300])
        wait_for(lambda: events_windowed(state) >= len(old) + len(new) + 300 - STEP, 120, "the later windows")
        decisions = state.decisions()
        assert [d["id"] for d in decisions if d["outcome"] == "fired"] == [fired[0]["id"]], decisions
        suppressed = [d["reason"] for d in decisions if d["outcome"] == "suppressed" and d["id"] > fired[0]["id"]]
        assert suppressed and set(suppressed) <= {"cooldown", "run_in_progress"}, decisions
        shifted = [w for w in state.windows() if w["events_seen"] > len(old) + WINDOW]
        assert all({"confidence_ks", "feedback_accuracy"} <= set(w["drifted"]) for w in shifted[-3:]), shifted[-3:]
        wait_for(lambda: state.runs()[0]["status"] not in ACTIVE, 30, "the stand-in run to end")
        assert [(r["id"], r["status"], r["source"]) for r in state.runs()] == [(1, "succeeded", "drift")]
        assert "trigger fired (drift_sustained)" in controller.log.read_text()

        # A manual run bypasses the cooldown; the admin endpoint wants the token.
        admin = f"http://127.0.0.1:{controller_port}/admin/trigger"
        assert httpx.post(admin, json={"reason": "no token"}).status_code == 401
        assert httpx.post(admin, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        cli_env = tuneloop_env(clinc_registry, **env)
        manual = subprocess.run(
            [str(BIN / "tuneloop"), "trigger", "--reason", "operator test"],
            env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert manual.returncode == 0 and "training run 2 requested" in manual.stdout, manual.stdout + manual.stderr
        busy = httpx.post(admin, json={"reason": "again"}, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert busy.status_code == 409 and "in progress" in busy.json()["detail"]

        check_dashboard_and_rules(prometheus)


def check_dashboard_and_rules(prometheus: Prometheus) -> None:
    # The run counter appears with the first run; by then every other series has been scraped for a while.
    wait_for(lambda: bool(prometheus.query("tuneloop_training_runs_total")), 60, "the training-run counter in Prometheus")
    panels, annotations = dashboard_queries(skip_rows={ROLLOUT_ROW})
    for expr in annotations:
        prometheus.query(expr)  # annotations mark events (swaps, runs starting): they must parse, not always match
    assert_panels_have_data(prometheus, panels)
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    written = yaml.safe_load((ROOT / "deploy" / "prometheus" / "tuneloop.rules.yml").read_text())["groups"]
    assert sorted(rule["name"] for rule in rules) == sorted(rule["alert"] for group in written for rule in group["rules"])
    assert all(rule["health"] == "ok" for rule in rules), rules
    active = {rule["name"] for rule in rules if rule["state"] in ("pending", "firing")}
    assert {"TuneloopDriftSustained", "TuneloopFeedbackAccuracyDrop"} <= active
    assert "TuneloopControllerLeadership" not in active  # the one controller leads
