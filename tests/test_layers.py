"""Layers import downward only (lower layers never import the methods, training, apps or the CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fewflow"
# from the ground up; a module may import its own band and the bands below it
BANDS = [
    {"_validate", "_io", "_progress", "analytic"},
    {"data", "models", "paths", "sources"},
    {"couplings", "solvers", "guidance", "metrics", "source_pruning", "plotting", "inverse",
     "interop", "points", "motion"},
    {"methods", "objectives"},
    {"train"},
    {"config", "runs", "sampling", "evaluate", "pretrained", "control"},
    {"bench"},
    {"cli"},
]
LEVEL = {name: i for i, band in enumerate(BANDS) for name in band}


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(SRC).parts
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = ["fewflow", *rel[:-1]][: max(1, len(rel) - node.level + 1)]
                out.append(".".join(pkg + ([node.module] if node.module else [])))
            elif node.module:
                out.append(node.module)
    return out


def upward_imports() -> list[str]:
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC).parts
        if len(parts) == 1 and parts[0] == "__init__.py":
            continue
        here = parts[0].removesuffix(".py")
        assert here in LEVEL, f"{f}: module {here!r} has no layer in tests/test_layers.py"
        for mod in _imports(f):
            p = mod.split(".")
            if p[0] != "fewflow" or len(p) < 2:
                continue
            there = p[1]
            if there not in LEVEL:
                continue
            if LEVEL[there] > LEVEL[here] and not (here in ("objectives", "methods") and there == "methods"):
                bad.append(f"{f.relative_to(SRC)} imports {mod}")
    return bad


def test_no_upward_import():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a solver importing the trainer is reported."""
    fake = tmp_path / "fewflow"
    (fake / "solvers").mkdir(parents=True)
    (fake / "solvers" / "bad.py").write_text("from fewflow.train import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert upward_imports() == ["solvers/bad.py imports fewflow.train"]
