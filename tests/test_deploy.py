"""Deployment files agree with the code they deploy."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import tomllib

import yaml

from tests.support.data import ROOT
from tests.support.imports import closure
from tuneloop.config import ALL_SIGNALS, Settings


def test_bentofile_points_at_the_service_and_packages_everything_it_imports() -> None:
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    module, attribute = bentofile["service"].split(":")
    assert module == "services.service" and attribute == "Classifier"
    needed = {p.relative_to(ROOT).as_posix() for p in closure(ROOT / "services" / "service.py")}
    candidates = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("*/*.py")}
    included = {n for n in candidates if any(fnmatch.fnmatch(n, pattern) for pattern in bentofile["include"])}
    assert included == needed  # everything the service imports, nothing it does not (the trainer's data, tests)
    packages = bentofile["python"]["packages"]
    assert "torch" not in " ".join(packages) and "transformers" not in " ".join(packages)
    serve_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert set(packages) <= set(serve_extra) | set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_kubernetes_probes_use_the_service_health_endpoints() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "service.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "registry")
    assert env["TUNELOOP_REGISTRY__URL"] == mount["mountPath"]


PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `apt-get install prometheus` (.ci/run does it)"
    return subprocess.run([binary, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_config_and_the_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "tuneloop.rules.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_on_the_series_they_are_written_for() -> None:
    """promtool's rule unit tests: each alert fires on its series at the expected time, and not before."""
    result = promtool("test", "rules", "tuneloop.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_the_issue_names_exists() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "tuneloop.rules.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"TuneloopDriftSustained", "TuneloopFeedbackAccuracyDrop", "TuneloopConsumerLagHigh",
            "TuneloopNoModelLoaded", "TuneloopTrainingFailed"} <= names


def test_grafana_provisioning_names_the_dashboard_datasource() -> None:
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "tuneloop.yml").read_text())
    uids = {source["uid"] for source in datasource["datasources"]}
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "tuneloop.json").read_text())
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    used |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert used == uids
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("request rate", "latency", "model version", "feedback accuracy", "lag", "training runs"):
        assert needed in titles
    signals = {t["expr"].split('signal="')[1].split('"')[0] for p in dashboard["panels"]
               for t in p.get("targets", []) if 'signal="' in t["expr"]}
    assert signals == set(ALL_SIGNALS)


def test_the_kubernetes_deployment_requires_kafka_and_replicated_topics() -> None:
    # With no Kafka configured every 202 landed in the pod's throwaway embedded log, lost with the pod.
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "service.yaml").read_text()))
    container = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["TUNELOOP_EVENTS__REQUIRE_KAFKA"]["value"] == "true"
    assert env["TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS"]["valueFrom"]["configMapKeyRef"]["optional"] is False
    assert int(env["TUNELOOP_EVENTS__REPLICATION_FACTOR"]["value"]) >= 3
    settings = Settings(events={"require_kafka": True, "kafka_bootstrap_servers": "kafka:9092", "replication_factor": 3})
    assert settings.events.min_insync_replicas == 2
