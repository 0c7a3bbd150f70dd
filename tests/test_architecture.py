"""The package layout holds: no import cycles between modules, the layer contracts in pyproject.toml are kept, and
the checks themselves catch a violation (an upward import, a cycle) when one is planted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted; imports under
    ``if TYPE_CHECKING:`` are left out by the graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return cycles


def _graph(*packages: str):
    return grimp.build_graph(*packages, exclude_type_checking_imports=True)


def test_no_import_cycles():
    assert import_cycles(_graph("recsys", "server")) == []


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for pkg in ("recsys", "server"):
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed")
    return subprocess.run([str(exe), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_contracts_are_kept_and_catch_an_upward_import(tmp_path):
    root = _copy_tree(tmp_path)
    ok = _lint_imports(root)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    assert "0 broken" in ok.stdout
    # plant violations in the copy: core importing a stage above it, a library module importing the server
    with (root / "recsys" / "core" / "io.py").open("a") as f:
        f.write("\nimport recsys.bundle  # planted\n")
    with (root / "recsys" / "train" / "recency.py").open("a") as f:
        f.write("\nimport server.service  # planted\n")
    bad = _lint_imports(root)
    assert bad.returncode != 0
    assert "recsys: stages import downwards only BROKEN" in bad.stdout
    assert "recsys' library never imports the server BROKEN" in bad.stdout


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from cyc import b  # a function-level import still counts\n")
    (pkg / "b.py").write_text("import cyc.a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cyc.a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert import_cycles(_graph("cyc")) == [["cyc.a", "cyc.b"]]
    finally:
        sys.path.remove(str(tmp_path))
