"""The one-way data flow, enforced: shared code below everything, services free of torch and the trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.data import ROOT
from tests.support.imports import imports_of, module_name

# Every directory of Python code, bottom to top; each may import its own package and those listed for it, no other.
LAYERS: dict[str, set[str]] = {
    "tuneloop": set(),  # the shared base: nothing above it
    "services": {"tuneloop"},  # serving learns of models through the registry, never the trainer's code
    "trainer": {"tuneloop"},
    "exporters": {"tuneloop", "trainer"},  # merges and exports what the trainer built
    "monitoring": {"tuneloop"},  # starts training as a process; the trigger policy is its own
    "pipeline": {"tuneloop", "trainer", "exporters"},  # a training run: train, export, gate, publish
    "cli": {"tuneloop", "services", "trainer", "exporters", "monitoring", "pipeline"},  # the top: anything but tests
    "benchmarks": {"tuneloop", "services", "trainer", "exporters", "monitoring", "pipeline", "cli"},
    "tests": {"tuneloop", "services", "trainer", "exporters", "monitoring", "pipeline", "cli"},
}
HEAVY = {"torch", "transformers", "peft", "sentence_transformers"}
# Third-party packages a layer must not import, beyond the project rule above.
THIRD_PARTY_FORBIDDEN: dict[str, set[str]] = {
    "tuneloop": HEAVY | {"bentoml"},
    "services": HEAVY,  # the serving image has no torch (bentofile.yaml)
    "trainer": {"bentoml"},
    "exporters": {"bentoml"},
    "monitoring": HEAVY | {"bentoml"},
    "pipeline": {"bentoml"},
}


def imported_modules(package: str, full: bool = False) -> dict[str, set[str]]:
    """Per file, the modules it imports: top-level package names, or full dotted names."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names = imports_of(path)
        found[str(path.relative_to(ROOT))] = names if full else {name.split(".")[0] for name in names}
    return found


def test_every_directory_of_code_has_a_layer() -> None:
    found = {p.parent.name for p in ROOT.glob("*/*.py") if not p.parent.name.startswith(".")}
    assert found - {"deploy"} == set(LAYERS)  # deploy/ holds scripts run by path, imported by nothing


@pytest.mark.parametrize("package", list(LAYERS))
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    project = set(LAYERS)
    allowed = LAYERS[package] | {package}
    forbidden = THIRD_PARTY_FORBIDDEN.get(package, set())
    offenders = {
        path: bad for path, names in imported_modules(package).items()
        if (bad := (names & project) - allowed | (names & forbidden))
    }
    assert offenders == {}


def test_no_import_cycles() -> None:
    """No module reaches itself through the project's imports (a cycle makes import order matter)."""
    modules = {module_name(path): path for package in LAYERS for path in (ROOT / package).rglob("*.py")}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    for name, path in modules.items():  # a package's __init__ is imported with each of its modules
        if path.name != "__init__.py" and (parent := name.rpartition(".")[0]) in modules and parent != name:
            graph[name].add(parent)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_test_files_share_helpers_through_conftest_and_support_only() -> None:
    """A test module imports no other test module (nor conftest): shared code lives in tests/support/."""
    offenders = {
        path: {name for name in names if name.startswith(("tests.test_", "tests.conftest"))}
        for path, names in imported_modules("tests", full=True).items()
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_monitoring_imports_nothing_from_the_trainer() -> None:
    """The controller starts training as a process; the trigger policy lives in monitoring, torch-free."""
    from_trainer = {
        path: {name for name in names if name.split(".")[0] == "trainer"}
        for path, names in imported_modules("monitoring", full=True).items()
    }
    assert {path: names for path, names in from_trainer.items() if names} == {}
    policy_imports = imported_modules("monitoring", full=True)["monitoring/trigger.py"]
    assert {name.split(".")[0] for name in policy_imports} <= {"__future__", "dataclasses", "typing", "tuneloop"}


def test_serving_path_runs_with_torch_unimportable(registry_path: Path) -> None:
    """Load the service module and serve a prediction in a process where `import torch` fails."""
    script = f"""
import sys
for name in ("torch", "transformers", "peft", "sentence_transformers"):
    sys.modules[name] = None  # any import of these now raises ImportError
import os
os.environ["TUNELOOP_REGISTRY__URL"] = {str(registry_path)!r}
import services.service as service
from services.live_model import load_live_model
from tuneloop.registry import Registry
live = load_live_model(Registry.from_config(service.settings.registry), service.settings)
scores = live.classifier.predict(["a wonderful, moving film"])
print(live.manifest.labels[int(scores.probabilities[0].argmax())])
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "positive"
