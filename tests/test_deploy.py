"""Deployment files agree with the code they deploy."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
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
    documents = list(yaml.safe_load_all((KUBERNETES / "base" / "service.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "registry-cache")
    assert env["TUNELOOP_REGISTRY__CACHE_DIR"] == mount["mountPath"]  # replicas share no disk: S3 and a cache each


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
    for container in containers(kustomize_build(KUBERNETES / "base")).values():
        assert_requires_kafka(container)
    settings = Settings(events={"require_kafka": True, "kafka_bootstrap_servers": "kafka:9092", "replication_factor": 3})
    assert settings.events.min_insync_replicas == 2


def assert_requires_kafka(container: dict) -> None:
    env = {e["name"]: e for e in container["env"]}
    assert env["TUNELOOP_EVENTS__REQUIRE_KAFKA"]["value"] == "true"
    assert env["TUNELOOP_EVENTS__KAFKA_BOOTSTRAP_SERVERS"]["valueFrom"]["configMapKeyRef"]["optional"] is False
    assert int(env["TUNELOOP_EVENTS__REPLICATION_FACTOR"]["value"]) >= 3


KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZE = "sigs.k8s.io/kustomize/kustomize/v5@v5.7.1"
# Variables a container may set that are not tuneloop settings: boto3's, for the registry on S3.
FOREIGN_ENV = {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@functools.cache
def kustomize_binary() -> str:
    """kustomize, built once into .kustomize/bin with `go install` from the Go module proxy."""
    built = ROOT / ".kustomize" / "bin" / "kustomize"
    if not built.is_file():
        go = shutil.which("go") or "/usr/local/go/bin/go"
        subprocess.run([go, "install", KUSTOMIZE], env=os.environ | {"GOBIN": str(built.parent)}, check=True,
                       capture_output=True, timeout=900)
    return str(built)


def kustomize_build(directory: Path) -> list[dict]:
    done = subprocess.run([kustomize_binary(), "build", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


def containers(documents: list[dict]) -> dict[str, dict]:
    """Every Deployment's first container, by the Deployment's name."""
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
            for d in documents if d["kind"] == "Deployment"}


def test_kustomize_builds_the_base_and_the_gpu_overlay_with_every_part() -> None:
    base = kustomize_build(KUBERNETES / "base")
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in base)
    assert kinds == sorted([
        ("ConfigMap", "tuneloop-settings"), ("Secret", "tuneloop-secrets"),
        ("Deployment", "tuneloop"), ("Service", "tuneloop"), ("PodDisruptionBudget", "tuneloop"),
        ("HorizontalPodAutoscaler", "tuneloop"),
        ("Deployment", "tuneloop-controller"), ("Service", "tuneloop-controller"),
        ("PodDisruptionBudget", "tuneloop-controller"), ("Deployment", "tuneloop-trainer"),
        ("ServiceMonitor", "tuneloop"), ("ServiceMonitor", "tuneloop-controller"), ("PrometheusRule", "tuneloop"),
    ])
    controller = next(d for d in base if d["kind"] == "Deployment" and d["metadata"]["name"] == "tuneloop-controller")
    assert controller["spec"]["replicas"] == 2  # one leads, one waits (controller.wait_to_lead)
    env = {e["name"]: e.get("value") for e in containers(base)["tuneloop-controller"]["env"]}
    assert env["TUNELOOP_TRIGGER__LOCAL_WORKER"] == "false"  # runs go to the trainer workers
    assert containers(base)["tuneloop-trainer"]["command"] == ["tuneloop", "trainer"]
    gpu = containers(kustomize_build(KUBERNETES / "overlays" / "gpu"))
    assert gpu["tuneloop-trainer"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e.get("value") for e in gpu["tuneloop-trainer"]["env"]}["TUNELOOP_TRAIN__DEVICE"] == "cuda"
    for cpu_only in ("tuneloop", "tuneloop-controller"):  # serving and the controllers stay on CPU nodes
        assert "nvidia.com/gpu" not in gpu[cpu_only]["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_every_variable_a_manifest_sets_is_a_setting_and_every_reference_resolves(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = kustomize_build(KUBERNETES / overlay)
    data = {(d["kind"], d["metadata"]["name"]): d.get("data") or d.get("stringData") for d in documents
            if d["kind"] in ("ConfigMap", "Secret")}
    for name, container in containers(documents).items():
        values = {}
        for variable in container["env"]:
            if "value" in variable:
                values[variable["name"]] = variable["value"]
                continue
            ref = variable["valueFrom"]
            kind, key_ref = ("ConfigMap", ref["configMapKeyRef"]) if "configMapKeyRef" in ref else ("Secret", ref["secretKeyRef"])
            assert key_ref["key"] in data[(kind, key_ref["name"])], (name, variable)
            values[variable["name"]] = data[(kind, key_ref["name"])][key_ref["key"]]
        for variable in values:
            assert variable in FOREIGN_ENV or setting_exists(variable), f"{name}: {variable} is no setting"
        for variable in [v for v in os.environ if v.startswith("TUNELOOP_")]:
            monkeypatch.delenv(variable)
        for variable, value in values.items():
            monkeypatch.setenv(variable, value)
        Settings()  # every value valid as the pod would read it


def setting_exists(variable: str) -> bool:
    """Whether TUNELOOP_<SECTION>__<FIELD> names a field of Settings."""
    if not variable.startswith("TUNELOOP_") or "__" not in variable:
        return False
    section, field = variable.removeprefix("TUNELOOP_").lower().split("__", 1)
    model = Settings.model_fields.get(section)
    return model is not None and field in model.annotation.model_fields


def test_the_prometheus_rule_object_is_the_rules_file() -> None:
    rule = next(d for d in kustomize_build(KUBERNETES / "base") if d["kind"] == "PrometheusRule")
    rules = yaml.safe_load((PROMETHEUS_DIR / "tuneloop.rules.yml").read_text())
    assert rule["spec"]["groups"] == rules["groups"], "run python deploy/kubernetes/rules_to_crd.py"
