"""What the project's modules import, read from their source (the layering and packaging tests)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.data import ROOT


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Full dotted names a file imports, at any depth (lazy imports too); relative imports made absolute.

    `from package import name` yields `package` and `package.name`: the name may be a module."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..a import b
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def source_of(name: str) -> Path | None:
    """The project file a dotted module name is, if it is one."""
    for candidate in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def closure(path: Path) -> set[Path]:
    """Project files a module needs: what it imports, directly or through other project modules, with the
    `__init__.py` of every package on the way (importing `a.b` runs `a/__init__.py` first)."""
    seen: set[Path] = set()
    pending = [path]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = module_name(current).split(".")
        for depth in range(1, len(parts)):
            if (init := source_of(".".join(parts[:depth]))) is not None:
                pending.append(init)
        pending += [source for name in imports_of(current) if (source := source_of(name)) is not None]
    return seen
