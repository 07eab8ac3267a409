"""The package's import graph, read from the source (no module is imported): no cycle between modules or
between folders, no upward import, internal imports at the top of each module; and scanpy-style public
signatures (data first, options keyword-only)."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "hist_st"

#: Top-level units (a module or a folder under hist_st/), lowest first: a unit may import only units
#: listed before it. ``hist_st`` is the package's own ``__init__``.
LAYERS = [
    "errors", "slide", "jsonio", "runtime", "memory", "outputs", "hist_st", "wsi", "lattice", "model", "harmonise",
    "cohort", "io", "tissue", "encoders", "stain", "embed", "metrics", "pl", "train", "methods", "data", "sources",
    "prepared", "prepare", "pp", "tl", "predict_image", "evaluate", "bench", "experiments", "demo", "cli",
]  # fmt: skip

#: Modules whose internal imports may sit inside functions, and why: `hist-st --help` and argument errors
#: answer without loading torch, scanpy and the rest.
LATE_IMPORTS_ALLOWED = {
    "hist_st.cli": "CLI start-up", "hist_st.cli.bench": "CLI start-up", "hist_st.cli.experiments": "CLI start-up",
    "hist_st.cli.train": "CLI start-up",
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute name of a ``from ... import`` (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_pkg = (PKG.parent / Path(*base) / "__init__.py").is_file()
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """Module -> internal modules it imports (anywhere); module -> (imported, line) imports inside functions."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    late: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(name, node)
                # ``from pkg import sub`` imports the submodule pkg.sub when there is one
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            else:
                continue
            for t in targets:
                if not t.startswith("hist_st"):
                    continue
                while t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    edges[name].add(t)
                    if id(node) not in top:
                        late[name].append((t, node.lineno))
    return {m: edges.get(m, set()) for m in modules}, late


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hist_st"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_cycle_between_modules():
    graph, _ = _graph()
    # a package's __init__ re-exports its submodules; an edge from a submodule to its own package would be a cycle
    assert _cycles(graph) == []


def test_no_cycle_between_folders_and_no_upward_import():
    graph, _ = _graph()
    units = {_unit(m) for m in graph}
    assert units <= set(LAYERS), f"units missing from LAYERS: {sorted(units - set(LAYERS))}"
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = sorted({(a, b) for a, targets in graph.items() for b in targets
                     if _unit(a) != _unit(b) and rank[_unit(b)] > rank[_unit(a)]})  # fmt: skip
    assert upward == [], "upward imports (module -> module of a later layer): " + ", ".join(f"{a} -> {b}" for a, b in upward)
    folder_graph: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        folder_graph[_unit(a)].update(_unit(b) for b in targets if _unit(b) != _unit(a))
    assert _cycles(dict(folder_graph)) == []


def test_internal_imports_sit_at_module_top():
    _, late = _graph()
    found = {m: v for m, v in late.items() if m not in LATE_IMPORTS_ALLOWED}
    assert found == {}, "imports inside functions: " + "; ".join(
        f"{m}: " + ", ".join(f"{t} (line {line})" for t, line in v) for m, v in sorted(found.items()))


def test_the_graph_sees_real_imports():
    """The reader is not vacuous: known edges and a known cycle are found."""
    graph, _ = _graph()
    assert "hist_st.methods.base" in graph["hist_st.methods.hist"]
    assert "hist_st.evaluate.plan" in graph["hist_st.evaluate.cv"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: The functions behind the commands: data (cohorts, folders, plans, slides) first, every option keyword-only.
PUBLIC_API = [
    ("hist_st.evaluate", ["make_plan", "run_cv", "cross_validate"], 3),
    ("hist_st.experiments", ["run_accuracy", "run_ablation", "run_stain", "run_token_analysis", "run_efficiency",
                             "run_scaling", "build_report"], 3),
    ("hist_st.train", ["train", "predict_folder"], 3),
    ("hist_st.pl", ["plot_genes"], 3),
    ("hist_st.pp", ["embed", "lattice"], 2),
    ("hist_st.tl", ["predict"], 2),
]  # fmt: skip

#: The AnnData API: ``adata`` first, ``key_added`` and ``copy`` keyword-only, every key written named in Returns.
ANNDATA_API = [("hist_st.pp", ["embed", "lattice"]), ("hist_st.tl", ["predict"])]


@pytest.mark.parametrize(("module", "names", "max_positional"), PUBLIC_API)
def test_public_signatures_are_scanpy_like(module, names, max_positional):
    mod = importlib.import_module(module)
    for name in names:
        fn = getattr(mod, name)
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert len(positional) <= max_positional, f"{module}.{name}: {len(positional)} positional parameters"
        with_default = [p.name for p in positional if p.default is not p.empty]
        assert with_default == [], f"{module}.{name}: options {with_default} should be keyword-only"
        assert fn.__doc__ and "Args:" in fn.__doc__ and "Returns:" in fn.__doc__, f"{module}.{name}: docstring"


@pytest.mark.parametrize(("module", "names"), ANNDATA_API)
def test_anndata_functions_follow_scanpy(module, names):
    import hist_st

    mod = importlib.import_module(module)
    assert getattr(hist_st, module.rsplit(".", 1)[1]) is mod  # exported by the package
    for name in names:
        fn = getattr(mod, name)
        assert name in mod.__all__
        params = inspect.signature(fn).parameters
        assert next(iter(params)) == "adata", f"{module}.{name}: adata first"
        for key, default in (("key_added", None), ("copy", False)):
            assert key in params and params[key].kind is inspect.Parameter.KEYWORD_ONLY, f"{module}.{name}: {key}"
            assert default is None or params[key].default is default
        returns = fn.__doc__.split("Returns:", 1)[1]
        assert "key_added" in returns and "copy=True" in returns, f"{module}.{name}: Returns names what it writes"
