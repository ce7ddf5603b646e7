"""The package's layers, checked on the source (no import runs): mrsfm_model's subpackages only
import downwards, the science never imports the federation, the two ends of the federation
never import each other, first-party imports sit at module top, and no module imports itself
back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mrsfm_model", "server", "client")
# lower number = lower layer; a module may import its own layer and below
LAYERS = {
    "mrsfm_model.config": 0, "mrsfm_model.errors": 0, "mrsfm_model.logs": 0, "mrsfm_model.files": 0,
    "mrsfm_model.data": 1,  # reading, canonical grid, simulation, spectrogram, streams
    "mrsfm_model.reports": 2,  # figures
    "mrsfm_model.model": 3,  # MAE, encoder export and registry, weights on disk and on the wire
    "mrsfm_model.training": 4,  # the one Trainer, its DP collaborator, central pretraining
    "mrsfm_model.evaluation": 5,  # benchmark tasks, fine-tuning, studies, baselines, prediction
    "mrsfm_model.cli": 6,
    "server": 7, "client": 7,
}
# function-level first-party imports allowed: command dispatch, the site launcher and the ClientApp
# stay fast to start (a command's modules load when it runs; a `query` answers without torch);
# matplotlib only when a figure is drawn
LAZY_OK_IN = {"mrsfm_model.cli", "server.commands", "client.__main__", "client.app"}
LAZY_OK_TARGETS = {"mrsfm_model.reports.plots"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[str, int, bool]]:
    """(imported first-party module, line, at module top) for each import in the file."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import module` names a module when pkg/module.py exists
            targets = [f"{mod}.{a.name}" if _exists(f"{mod}.{a.name}", root) else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] in PACKAGES:
                out.append((t, node.lineno, id(node) in top or _in_type_checking(tree, node)))
    return out


def _exists(mod: str, root: Path) -> bool:
    p = root.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            if any(node is m for m in ast.walk(n)):
                return True
    return False


def layer(mod: str) -> int:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{mod}: in no layer of tests/test_architecture.py")
    return LAYERS[best]


def problems(root: Path) -> list[str]:
    """Every broken rule under `root`, one line each (file:line: what)."""
    files = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    graph: dict[str, set[str]] = {}
    out = []
    for path in files:
        src = module_name(path, root)
        graph.setdefault(src, set())
        where = path.relative_to(root)
        for dst, line, at_top in imports(path, root):
            if dst == src:
                continue
            graph[src].add(dst)
            s_top, d_top = src.split(".")[0], dst.split(".")[0]
            if s_top == "mrsfm_model" and d_top != "mrsfm_model":
                out.append(f"{where}:{line}: the science package imports the federation ({dst})")
            elif {s_top, d_top} == {"server", "client"}:
                out.append(f"{where}:{line}: {s_top} imports {dst} (server and client meet only in mrsfm_model)")
            elif layer(dst) > layer(src):
                out.append(f"{where}:{line}: {src} (layer {layer(src)}) imports upwards {dst} (layer {layer(dst)})")
            if not at_top and src not in LAZY_OK_IN and dst not in LAZY_OK_TARGETS:
                out.append(f"{where}:{line}: {dst} imported inside a function (first-party imports go at the top)")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            w = _module_of(w, graph)
            if w is None:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _module_of(name: str, graph: dict[str, set[str]]) -> str | None:
    """The graph's module for an imported name (`pkg.mod.attr` -> `pkg.mod`)."""
    while name and name not in graph:
        name = name.rpartition(".")[0]
    return name or None


def test_the_package_keeps_its_layers():
    assert problems(ROOT) == []


@pytest.mark.parametrize("files,expected", [
    ({"mrsfm_model/data/a.py": "from mrsfm_model.data.b import x\n",
      "mrsfm_model/data/b.py": "def f():\n    from mrsfm_model.data.a import y\n"},
     ["mrsfm_model/data/b.py:2: mrsfm_model.data.a imported inside a function (first-party imports go at the top)",
      "import cycle: mrsfm_model.data.a -> mrsfm_model.data.b"]),
    ({"mrsfm_model/data/a.py": "from mrsfm_model.model.mae import MAE\n", "mrsfm_model/model/mae.py": ""},
     ["mrsfm_model/data/a.py:1: mrsfm_model.data.a (layer 1) imports upwards mrsfm_model.model.mae (layer 3)"]),
    ({"mrsfm_model/evaluation/demo.py": "import server.local\n", "server/local.py": "",
      "client/app.py": "from server.wire import encode\n", "server/wire.py": ""},
     ["client/app.py:1: client imports server.wire (server and client meet only in mrsfm_model)",
      "mrsfm_model/evaluation/demo.py:1: the science package imports the federation (server.local)"]),
])
def test_the_checker_finds_what_the_old_layout_had(tmp_path, files, expected):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert sorted(problems(tmp_path)) == sorted(expected)
