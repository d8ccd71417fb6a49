"""The architecture, checked: the import graph of uwrt.runtime and uwrt.kernels has no cycle, every
import points down the layers README describes, the demo and the load generator are used only by
the CLI, and README's layout table names exactly the folders that exist."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

from tests.factories import ROOT

FOLDERS = {"runtime": "uwrt.runtime", "kernels": "uwrt.kernels", "bench": "uwrt.bench", "demo": "uwrt.demo"}

#: layer of a runtime module -> the layers it may import (its own included where listed)
FOUNDATION = ("config", "errors", "pb", "jsonl", "profiles")
ALLOWED = {
    "foundation": {"foundation"},
    "bundle": {"foundation", "bundle"},
    "featurize": {"foundation", "bundle"},
    "policy": {"foundation", "bundle"},
    "encoders": {"foundation", "bundle", "featurize", "encoders", "kernels"},
    "trees": {"foundation", "bundle", "trees"},
    "pipeline": {"foundation", "bundle", "featurize", "policy", "encoders", "trees", "kernels"},
    "monitoring": {"foundation", "bundle", "policy", "monitoring"},
    "records": {"foundation", "bundle", "records"},
    "serving": {"foundation", "bundle", "featurize", "policy", "encoders", "trees", "kernels", "pipeline", "records",
                "serving", "monitoring"},
    "cli": {"foundation", "bundle", "featurize", "policy", "encoders", "trees", "kernels", "pipeline", "records",
            "serving", "cli", "demo", "bench", "monitoring"},
    "kernels": {"kernels"},
}


def module_files() -> dict[str, pathlib.Path]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports_of(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """Every uwrt module `path` imports, lazily imported ones included."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub (its parent package is initialised
            # first, which is never a cycle); `from mod import name` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            # the longest known module that prefixes the target (a name imported from a module
            # counts as that module)
            parts = t.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in known:
                    if cand != name:
                        out.add(cand)
                    break
    return out


GRAPH = None


def graph() -> dict[str, set[str]]:
    global GRAPH
    if GRAPH is None:
        files = module_files()
        known = set(files)
        GRAPH = {m: imports_of(p, m, known) for m, p in files.items()}
    return GRAPH


def layer(mod: str) -> str:
    parts = mod.split(".")
    if parts[1] in ("kernels", "demo", "bench"):
        return parts[1]
    if len(parts) == 2:                     # uwrt.runtime itself
        return "foundation"
    top = parts[2]
    return "foundation" if top in FOUNDATION else top


def test_every_runtime_module_has_a_layer():
    unknown = {m for m in graph() if m.startswith("uwrt.runtime") and layer(m) not in ALLOWED}
    assert not unknown, f"modules outside the documented layers (add them to README and ALLOWED): {sorted(unknown)}"


def test_no_import_cycles():
    g = {m: {d for d in deps if d in graph()} for m, deps in graph().items()
         if m.startswith(("uwrt.runtime", "uwrt.kernels"))}
    # Tarjan's strongly connected components; a package importing its own submodules (its
    # __init__ re-exporting them) is not a cycle unless a submodule imports the package back.
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v: str, counter=[0]) -> None:  # noqa: B006 - a counter shared by the recursion
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not sccs, f"import cycles: {sccs}"


def test_imports_point_down_the_layers():
    bad = []
    for mod, deps in graph().items():
        if not mod.startswith(("uwrt.runtime", "uwrt.kernels")):
            continue
        allowed = ALLOWED[layer(mod)]
        bad += [f"{mod} -> {d}" for d in sorted(deps) if layer(d) not in allowed]
    assert not bad, "imports against the layering (README: Layout):\n" + "\n".join(bad)


def test_demo_and_bench_are_used_only_by_the_cli():
    bad = [f"{m} -> {d}" for m, deps in graph().items() if m.startswith(("uwrt.runtime", "uwrt.kernels"))
           for d in deps if layer(d) in ("demo", "bench") and layer(m) != "cli"]
    assert not bad, bad


def test_the_checker_sees_a_cycle_and_a_layer_violation(tmp_path):
    """The checks above can fail: a fake pair of modules importing each other, and a stage
    importing the server, are both caught."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from uwrt.runtime.trees import b\n")
    b.write_text("import uwrt.runtime.trees.a\nfrom uwrt.runtime.serving.server import Server\n")
    known = {"uwrt.runtime.trees.a", "uwrt.runtime.trees.b", "uwrt.runtime.serving.server"}
    ga = imports_of(a, "uwrt.runtime.trees.a", known)
    gb = imports_of(b, "uwrt.runtime.trees.b", known)
    assert ga == {"uwrt.runtime.trees.b"}
    assert gb == {"uwrt.runtime.trees.a", "uwrt.runtime.serving.server"}
    assert layer("uwrt.runtime.serving.server") not in ALLOWED["trees"]


def _readme_layout_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)`", section, flags=re.M)


def test_readme_layout_matches_the_folder_tree():
    listed = _readme_layout_paths()
    assert listed, "README has no Layout table"
    missing = [p for p in listed if not (ROOT / p).exists()]
    assert not missing, f"README's Layout lists paths that do not exist: {missing}"
    packages = sorted(str(p.parent.relative_to(ROOT)) + "/" for p in (ROOT / "runtime").rglob("__init__.py"))
    unlisted = [p for p in packages if p not in listed and p != "runtime/pb/"]
    assert not unlisted, f"README's Layout does not list these packages: {unlisted}"
    for top in ("runtime/", "kernels/", "proto/", "bench/", "tests/", "demo/", "uwrt/"):
        assert top in listed, f"README's Layout does not list {top}"


@pytest.mark.parametrize("name", ["runtime", "kernels", "bench"])
def test_no_generic_top_level_package_is_installed(name):
    """setup.py maps the folders under `uwrt`; nothing is installed under a generic name."""
    import runpy
    import sys
    argv = sys.argv
    try:
        sys.argv = ["setup.py", "--name"]
        ns = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")
    except SystemExit:
        ns = {}
    finally:
        sys.argv = argv
    packages = ns.get("PACKAGES") or []
    assert packages and all(p == "uwrt" or p.startswith("uwrt.") for p in packages), packages
    assert f"uwrt.{name}" in packages
