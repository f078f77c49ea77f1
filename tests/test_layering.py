"""The one-way data flow, enforced: shared code below everything, services free of torch and the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.data import ROOT

PACKAGES = ("tuneloop", "services", "trainer", "exporters", "monitoring")


def imported_modules(package: str, full: bool = False) -> dict[str, set[str]]:
    """Per file, the modules it imports: top-level package names, or full dotted names."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names if full else {name.split(".")[0] for name in names}
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("services", {"torch", "transformers", "peft", "trainer", "exporters", "sentence_transformers"}),
        ("trainer", {"services", "exporters", "bentoml"}),
        ("exporters", {"services", "bentoml"}),
        ("monitoring", {"services", "exporters", "torch", "transformers", "bentoml"}),
    ],
)
def test_package_does_not_import(package: str, forbidden: set[str]) -> None:
    offenders = {path: names & forbidden for path, names in imported_modules(package).items() if names & forbidden}
    assert offenders == {}


def test_controller_takes_only_the_trigger_policy_from_the_trainer() -> None:
    """The controller starts training as a process; of the trainer it imports only the torch-free policy."""
    from_trainer = {
        path: {name for name in names if name.split(".")[0] == "trainer"}
        for path, names in imported_modules("monitoring", full=True).items()
    }
    assert set().union(*from_trainer.values()) == {"trainer.trigger"}
    policy_imports = imported_modules("trainer", full=True)["trainer/trigger.py"]
    assert {name.split(".")[0] for name in policy_imports} <= {"__future__", "dataclasses", "typing", "tuneloop"}


def test_shared_modules_import_no_layer_above_them() -> None:
    above = {"services", "trainer", "exporters", "monitoring", "torch"}
    # The entry points (the CLI and the demo it runs) sit on top of everything.
    shared = {p: n for p, n in imported_modules("tuneloop").items() if not p.endswith(("cli.py", "demo.py"))}
    assert {p: n & above for p, n in shared.items() if n & above} == {}


def test_serving_path_runs_with_torch_unimportable(registry_path: Path) -> None:
    """Load the service module and serve a prediction in a process where `import torch` fails."""
    script = f"""
import sys
for name in ("torch", "transformers", "peft", "sentence_transformers"):
    sys.modules[name] = None  # any import of these now raises ImportError
import os
os.environ["TUNELOOP_REGISTRY__PATH"] = {str(registry_path)!r}
import services.service as service
from services.live_model import load_live_model
from tuneloop.registry import Registry
live = load_live_model(Registry(service.settings.registry.path), service.settings)
scores = live.classifier.predict(["a wonderful, moving film"])
print(live.manifest.labels[int(scores.probabilities[0].argmax())])
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "positive"
