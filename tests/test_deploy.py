"""Deployment files agree with the code they deploy."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import yaml

from tests.conftest import ROOT

PROJECT_PACKAGES = ("tuneloop", "services", "trainer", "exporters", "monitoring")


def project_imports(path: Path) -> set[Path]:
    """Project source files a module imports, directly or through other project modules."""
    seen: set[Path] = set()
    pending = [path]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in ast.walk(ast.parse(current.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in PROJECT_PACKAGES:
                    candidate = ROOT / (name.replace(".", "/") + ".py")
                    pending.append(candidate if candidate.exists() else ROOT / name.replace(".", "/") / "__init__.py")
    return seen


def test_bentofile_points_at_the_service_and_packages_everything_it_imports() -> None:
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    module, attribute = bentofile["service"].split(":")
    assert module == "services.service" and attribute == "Classifier"
    needed = {p.relative_to(ROOT).as_posix() for p in project_imports(ROOT / "services" / "service.py")}
    included = {n for n in needed if any(fnmatch.fnmatch(n, pattern) for pattern in bentofile["include"])}
    excluded = {n for n in needed if any(fnmatch.fnmatch(n, pattern) for pattern in bentofile.get("exclude", []))}
    assert needed - included == set() and excluded == set()
    packages = " ".join(bentofile["python"]["packages"])
    assert "onnxruntime" in packages and "torch" not in packages and "transformers" not in packages


def test_kubernetes_probes_use_the_service_health_endpoints() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "service.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = {e["name"]: e["value"] for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "registry")
    assert env["TUNELOOP_REGISTRY__PATH"] == mount["mountPath"]
