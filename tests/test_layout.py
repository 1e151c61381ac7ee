"""The package shows the pipeline: one package per stage, imports that only go down, TensorFlow only under
heads/, no stand-in modules. Read from the code's own imports (ast), lazy imports inside functions included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import featlab

PKG = Path(featlab.__file__).parent
#: a module may import its own stage and the stages below it, never one above or beside it
RANK = {"bottom": 0, "data": 1, "scoring": 2, "backbones": 2, "features": 3, "heads": 4, "report": 5, "study": 6,
        "cli": 7}
STAGES = ("data", "scoring", "backbones", "features", "heads", "report", "study")


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = ["featlab", *p.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "cli" if module == "featlab.cli" else "bottom"


def import_edges(modules: dict[str, Path]) -> set[tuple[str, str]]:
    """(importer, imported) for every featlab module named by an import statement anywhere in a module."""
    edges = set()
    for m, p in modules.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    t = ".".join(base + ([node.module] if node.module else []))
                else:
                    t = node.module or ""
                targets = [f"{t}.{a.name}" if f"{t}.{a.name}" in modules else t for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {(m, t) for t in targets if t in modules and t != m}
    return edges


def test_every_import_goes_down_the_stages():
    """cli -> study -> report -> heads -> features -> backbones / scoring -> data -> bottom, and nothing back
    up or sideways (a helper needed by two stages belongs to the lower)."""
    modules = _modules()
    edges = import_edges(modules)
    assert len(edges) > 250, len(edges)  # the graph was read (a parser that finds nothing passes nothing)
    bad = sorted(f"{a} -> {b}" for a, b in edges
                 if stage_of(a) != stage_of(b) and RANK[stage_of(a)] <= RANK[stage_of(b)])
    assert not bad, bad


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b in import_edges(modules):
        if not modules[b].name == "__init__.py":  # importing a package's docstring-only __init__ is no edge back
            graph[a].add(b)
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError(" -> ".join(path + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_each_stage_is_a_package_that_says_what_it_takes_and_gives():
    for s in STAGES:
        doc = ast.get_docstring(ast.parse((PKG / s / "__init__.py").read_text())) or ""
        assert doc.startswith(f"The {s} stage: ") and "->" in doc.splitlines()[0], (s, doc[:80])
    flat = sorted(p.name for p in PKG.glob("*.py"))
    assert flat == ["__init__.py", "cli.py", "config.py", "errors.py", "paths.py", "progress.py", "staging.py"], flat


def test_no_stand_in_modules():
    """A module that only imports (and forwards names or itself) is a stand-in: every module outside the
    packages' __init__ defines something of its own."""
    for m, p in _modules().items():
        if p.name == "__init__.py":
            continue
        body = ast.parse(p.read_text()).body
        own = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
                                                  ast.AnnAssign))
               and not (isinstance(n, ast.Assign) and "sys.modules" in ast.unparse(n))]
        assert own, f"{m} defines nothing of its own"


def test_tensorflow_only_under_heads():
    """Statically, only heads/ names TensorFlow or Keras; and importing every module of the package in a
    fresh interpreter loads neither (they come when a head trains or runs)."""
    for m, p in _modules().items():
        names = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        if stage_of(m) != "heads":
            assert not names & {"tensorflow", "keras"}, m
    code = ("import importlib, sys, pkgutil, featlab\n"
            "for m in pkgutil.walk_packages(featlab.__path__, 'featlab.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(len([m for m in sys.modules if m.startswith('featlab')]),"
            " sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= len(_modules()) - 1 and out[1] == "[]", out
