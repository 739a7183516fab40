"""The package's shape (issue 13): sub-packages, modules small enough to read in one sitting,
no import cycle (imports inside functions included), and every module named in the README.

Static checks over the source with ``ast``: nothing here imports the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "step3_jax"
MAX_LINES = 420  # "~400 lines": one sitting; the few just past 400 are named in the README
SUBPACKAGES = {"model", "runtime", "checkpoint", "analysis", "training", "serving", "cli"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("step3_jax")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.startswith("step3_jax"):
            for a in node.names:  # `from pkg import module` names the module, else the package
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_subpackage_inits_import_nothing():
    """A sub-package ``__init__`` that imported its modules would make every module of the
    sub-package import all the others (and hide cycles behind the package)."""
    graph = _graph()
    for name in SUBPACKAGES:
        assert graph[f"step3_jax.{name}"] == set(), name


def test_the_model_does_not_depend_on_what_drives_it():
    """Layering: the model imports no runtime, checkpoint, analysis, training or CLI module;
    checkpoints import no runtime or CLI module."""
    for name, deps in _graph().items():
        if name.startswith("step3_jax.model"):
            bad = {d for d in deps if d.split(".")[1] in SUBPACKAGES - {"model"}}
            assert not bad, (name, bad)
        if name.startswith("step3_jax.checkpoint"):
            bad = {d for d in deps if d.split(".")[1] in {"runtime", "analysis", "training",
                                                           "cli"}}
            assert not bad, (name, bad)


def test_modules_are_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def _readme_modules() -> set[str]:
    """Module paths the README's package table names: ``| `pkg/` | `a.py`, `b.py` | ... |``
    rows, an empty package cell continuing the row above (top-level modules have none)."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| package | module | concept |"):].split("\n\n")[0]
    named, package = set(), ""
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0]:
            package = cells[0].strip("`")
        named |= {package + m.strip().strip("`") for m in cells[1].split(",")}
    return named


def test_readme_names_every_module():
    modules = {str(p.relative_to(PACKAGE)) for p in _modules().values()
               if p.name != "__init__.py" or p.parent == PACKAGE}
    assert sorted(modules - _readme_modules()) == []
    assert sorted(_readme_modules() - modules) == []
