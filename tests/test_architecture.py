"""The structure the code promises, checked on the source: one builder of runs, a leaf config package, no import
cycles, no library module importing the developer tools (``datkit.bench``, ``datkit.netemu``) (function-level
imports included; ``if TYPE_CHECKING:`` blocks are annotations only, not imports)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "datkit").rglob("*.py"), *(REPO / "backends").rglob("*.py")])


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "backends":  # installed as datkit.backends
        parts = ["datkit", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module(p): p for p in SOURCES}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str) -> set[str]:
    """Modules of datkit that module ``name`` imports anywhere (top level or inside functions)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = {id(n) for t in ast.walk(tree) if _is_type_checking(t) for n in ast.walk(t)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base_parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for t in targets:
            if t in MODULES and t != name and not name.startswith(t + "."):  # a package's own parents are not edges
                out.add(t)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle() -> None:
    GRAPH["datkit.config.validate"].add("datkit.data.checks")  # data.checks imports datkit.config: a cycle
    try:
        assert any({"datkit.config.validate", "datkit.data.checks"} <= set(c) for c in _cycles())
    finally:
        GRAPH["datkit.config.validate"].discard("datkit.data.checks")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("datkit.config")))
def test_config_is_a_leaf(module: str) -> None:
    outside = sorted(t for t in GRAPH[module] if not t.startswith("datkit.config"))
    assert not outside, f"{module} imports {outside}: datkit.config must import no other part of datkit"


@pytest.mark.parametrize("pattern", [r"Trainer\.__new__", r"_average_gradients", r"getattr\(self, \"position\""])
def test_no_assembly_outside_the_builder(pattern: str) -> None:
    hits = [f"{p.relative_to(REPO)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(pattern, line)]
    assert not hits, hits


# --- developer tools apart from the library ---------------------------------------------------------------------
# datkit.bench (benchmarks) and datkit.netemu (emulated hosts) ship inside the package, so that `python -m datkit.bench`
# and `python -m datkit.netemu` work from any install, but they are developer tools, not library API: they may use
# the library, the library never uses them.
TOOLS = ("datkit.bench", "datkit.netemu")


def _is_tool(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLS)


LIBRARY = sorted(m for m in MODULES if not _is_tool(m))


def _dynamic_imports(name: str) -> set[str]:
    """Modules named by a constant string in ``importlib.import_module(...)`` / ``__import__(...)`` calls."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and ast.unparse(node.func).split(".")[-1] in ("import_module", "__import__")):
            out.add(node.args[0].value)
    return out


def _tool_imports(name: str) -> list[str]:
    return sorted(t for t in GRAPH[name] | _dynamic_imports(name) if _is_tool(t))


def test_the_tools_are_found() -> None:
    assert {"datkit.bench", "datkit.bench.network", "datkit.netemu", "datkit.netemu.hosts"} <= set(MODULES)
    assert "datkit.train" in LIBRARY and "datkit.backends.base" in LIBRARY and "datkit.bench.step" not in LIBRARY


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_does_not_import_the_developer_tools(module: str) -> None:
    hits = _tool_imports(module)
    assert not hits, (f"{module} imports {hits}: datkit.bench and datkit.netemu are developer tools, not library API; "
                      "move what the library needs out of them")


def test_the_tool_check_finds_a_tool_import() -> None:
    GRAPH["datkit.train"].add("datkit.netemu.hosts")  # function-level imports are edges of GRAPH too
    try:
        assert _tool_imports("datkit.train") == ["datkit.netemu.hosts"]
    finally:
        GRAPH["datkit.train"].discard("datkit.netemu.hosts")


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tool_says_it_is_a_developer_tool(tool: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[tool].read_text())) or ""
    assert "developer tool, not library API" in " ".join(doc.split()), f"{tool}'s docstring"


# --- small files --------------------------------------------------------------------------------------------------
MAX_LINES = 300


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in SOURCES if not p.is_symlink()))
def test_no_library_file_over_300_lines(path: str) -> None:
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines (> {MAX_LINES}): split it by concept, one concept per file"


# --- backends/: a small abstract class composed of parts (issue 21) ----------------------------------------------
BACKENDS_DIR = REPO / "backends"


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_the_backend_abc_is_small() -> None:
    assert _lines(BACKENDS_DIR / "base.py") < 120, "backends/base.py: the Backend ABC stays under 120 lines"


def _classes_called(tree: ast.AST) -> set[str]:
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _methods(tree: ast.AST) -> set[str]:
    return {f.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body
            if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("module", ["torch_dist.py", "deepspeed_backend.py"])
def test_torch_and_deepspeed_share_one_collectives_class(module: str) -> None:
    tree = ast.parse((BACKENDS_DIR / module).read_text())
    assert "DistCollectives" in _classes_called(tree), f"{module} builds no collectives.DistCollectives"
    own = _methods(tree) & {"all_reduce", "all_gather", "all_to_all", "broadcast", "barrier"}
    assert not own, f"{module} defines its own collectives {sorted(own)}: they live in collectives.DistCollectives"
    assert "class DistCollectives(" in (BACKENDS_DIR / "collectives.py").read_text()


def test_nothing_outside_backends_compares_backend_names() -> None:
    pattern = re.compile(r"""(==|!=)\s*["'](torch|horovod|deepspeed)["']|["'](torch|horovod|deepspeed)["']\s*(==|!=)""")
    core = [p for p in SOURCES
            if p.relative_to(REPO).parts[0] == "datkit" and "backends" not in p.relative_to(REPO).parts]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in core for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits
