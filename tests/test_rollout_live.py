"""Shadow, canary and rollback with real parts: `bentoml serve` (two workers), the controller, a real
Kafka broker carrying the model events, real ONNX sessions and real imdb traffic with its true labels.

The candidates are copies of v1 published next to it: one with its label order reversed (it answers
the opposite sentiment), one identical. The gate would never pass the reversed one; it is published
directly so that the live comparison, not the gate, has to catch it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.dashboard import ROLLOUT_ROW, assert_panels_have_data, dashboard_queries
from tests.support.data import imdb_parts
from tests.support.processes import (
    bus_env,
    free_port,
    run_cli,
    running_controller,
    running_prometheus,
    running_service,
    tuneloop_env,
    wait_for,
)
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import MANIFEST, Registry

TOKEN = "rollout-test-token"


def publish_copy(registry: Registry, reverse_labels: bool) -> int:
    manifest, directory = registry.resolve(1)
    labels = manifest.labels[::-1] if reverse_labels else manifest.labels
    with registry.staging() as stage:
        for path in directory.rglob("*"):
            if path.is_file() and path.name != MANIFEST:
                target = stage / path.relative_to(directory)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        (stage / "labels.json").write_text(json.dumps(labels))
        return registry.publish(
            stage, base_model=manifest.base_model, labels=labels, parent_version=1, metrics=manifest.metrics,
            export=manifest.export, promote=False, reason="test copy of v1",
        ).version


@pytest.fixture
def registry(registry_path: Path, tmp_path: Path) -> Path:
    path = tmp_path / "registry"
    shutil.copytree(registry_path, path)
    return path


def test_shadow_rolls_back_a_worse_candidate_and_canary_promotes_a_good_one_without_a_failed_request(
    registry: Path, kafka: object, tmp_path: Path
) -> None:
    reg = Registry(registry)
    bad, good = publish_copy(reg, reverse_labels=True), publish_copy(reg, reverse_labels=False)
    env = bus_env("kafka", tmp_path, kafka.bootstrap_servers, **{
        "TUNELOOP_ROLLOUT__STAGES": '["shadow", "canary"]', "TUNELOOP_ROLLOUT__BAKE_S": "3",
        "TUNELOOP_ROLLOUT__MIN_FEEDBACK_ROWS": "60", "TUNELOOP_ROLLOUT__CANARY_SHARE": "0.5",
        # imdb accuracy is about 0.87: 60 rows per side cannot tell 2 points apart; 15 still catches the bad copy.
        "TUNELOOP_ROLLOUT__MAX_ACCURACY_DROP": "0.15",
        # Far longer than the test waits: only the model events on Kafka can make the replicas follow in time.
        "TUNELOOP_SERVE__WATCH_INTERVAL_S": "300",
        "TUNELOOP_CONTROLLER__ADMIN_TOKEN": TOKEN,
    })
    cli_env = tuneloop_env(registry, **env)
    store = FeedbackStore(env["TUNELOOP_CONTROLLER__STORE_URL"])
    traffic = imdb_parts()[1]
    served: list[int | str] = []
    stop = threading.Event()

    port = free_port()
    targets = {"tuneloop-service": f"127.0.0.1:{port}",
               "tuneloop-controller": f"127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}"}
    with (
        running_service(registry, tmp_path / "serve", port=port, **env) as service,
        running_controller(registry, tmp_path, env),
        running_prometheus(targets, tmp_path) as prometheus,
    ):

        def send_traffic() -> None:
            """Predict four texts at a time, then label them with the truth, as an application would."""
            i = 0
            with service.client() as client:
                while not stop.is_set():
                    texts = [traffic.texts[(i + k) % len(traffic)] for k in range(4)]
                    labels = [traffic.labels[(i + k) % len(traffic)] for k in range(4)]
                    i += 4
                    try:
                        response = client.post("/predict", json={"texts": texts})
                        if response.status_code != 200:
                            served.append(f"predict HTTP {response.status_code}")
                            continue
                        predictions = response.json()
                        served.extend(p["model_version"] for p in predictions)
                        items = [{"request_id": p["request_id"], "label": label}
                                 for p, label in zip(predictions, labels, strict=True)]
                        answer = client.post("/feedback/batch", json={"items": items})
                        if answer.status_code != 202:
                            served.append(f"feedback HTTP {answer.status_code}")
                    except httpx.HTTPError as exc:
                        served.append(f"{type(exc).__name__}: {exc}")

        sender = threading.Thread(target=send_traffic, daemon=True)
        sender.start()
        try:
            time.sleep(3)
            run_cli("rollout", "start", str(bad), "--stage", "shadow", env=cli_env)
            # The replicas load the candidate on the model event, long before their registry poll.
            with service.client() as client:
                wait_for(lambda: (client.get("/model").json().get("candidate") or {}).get("version") == bad, 20,
                         "a replica to load the shadow candidate")
            wait_for(lambda: any(e.action == "withdraw" and e.version == bad for e in reg.history()), 120,
                     "the controller to roll the reversed candidate back")
            withdrawal = reg.history()[-1]
            assert withdrawal.reason.startswith("worse:"), withdrawal
            shadow_rows = store._db.execute(
                "SELECT COUNT(*) FROM shadow_predictions WHERE model_version = ?", (bad,)).fetchone()[0]
            assert shadow_rows >= 60
            assert bad not in served  # shadow is scored, never returned

            run_cli("rollout", "start", str(good), "--stage", "shadow", env=cli_env)
            wait_for(lambda: ("canary", good) in [(e.action, e.version) for e in reg.history()], 120, "the good candidate to reach canary")
            rollout_panels, _ = dashboard_queries(rows={ROLLOUT_ROW})
            assert len({title for title, _ in rollout_panels}) == 4  # four panels, eight queries
            assert_panels_have_data(prometheus, rollout_panels)
            wait_for(lambda: reg.live_version() == good, 180, "the good candidate to pass canary")
            wait_for(lambda: set(served[-40:]) == {good}, 30, "both replicas to serve it")
            assert [(e.action, e.version) for e in reg.history()[-3:]] == [
                ("shadow", good), ("canary", good), ("promote", good)]
            canary_index = len(served) - served[::-1].index(1)  # after the last text v1 answered
            assert good in served[:canary_index]  # the canary answered a share before the promotion

            # The admin endpoint rolls back, and every replica follows within seconds.
            with httpx.Client(base_url=f"http://127.0.0.1:{env['TUNELOOP_CONTROLLER__PORT']}", timeout=30) as admin:
                assert admin.post("/admin/rollback", json={}).status_code in (401, 403)
                response = admin.post("/admin/rollback", json={"reason": "test"},
                                      headers={"Authorization": f"Bearer {TOKEN}"})
                assert response.status_code == 200, response.text
                assert response.json() == {"previous": good, "version": 1}
                refused = admin.post("/admin/rollback", json={"to": 99}, headers={"Authorization": f"Bearer {TOKEN}"})
                assert refused.status_code == 409 and "version 99 does not exist" in refused.json()["detail"]
            mark = len(served)
            wait_for(lambda: set(served[-40:]) == {1} and len(served) > mark + 40, 30, "both replicas to serve v1 again")
        finally:
            stop.set()
            sender.join()
    failures = [s for s in served if isinstance(s, str)]
    assert failures == [], failures[:5]
    history = run_cli("history", env=cli_env).stdout
    assert "withdraw" in history and "canary" in history and "worse" in history
