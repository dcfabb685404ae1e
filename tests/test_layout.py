"""The code's shape (issue 23): no import circle in app/, function-level imports included; the
folders tell a run's story (few top-level modules); no source file grows past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app"
MAX_LINES = 600
MAX_TOP_LEVEL = 8


def _modules() -> dict[str, Path]:
    found = {}
    for path in APP.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every app module this one imports, anywhere in it, and the packages that importing
    runs (importing app.x.y runs app/x/__init__.py)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    wanted: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            wanted |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            wanted.add(module)
            wanted |= {f"{module}.{a.name}" for a in node.names}
    edges = set()
    for module in wanted:
        parts = module.split(".")
        for k in range(2, len(parts) + 1):  # the module and every package above it but app
            if ".".join(parts[:k]) in known:
                edges.add(".".join(parts[:k]))
    edges.discard(name)
    return {e for e in edges if not name.startswith(e + ".")}  # a package's own parents


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle_in_app():
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    assert _circles(graph) == []


def test_the_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_app_keeps_few_top_level_modules():
    top = sorted(p.name for p in APP.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def test_no_source_file_over_600_lines():
    sources = [
        *APP.rglob("*.py"),
        *(ROOT / "static").rglob("*.js"),
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
    ]
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# The floors of app/, lowest first: a folder (or top-level module) imports only from floors
# below its own. Folders on one floor import nothing from each other.
FLOORS = [
    {"refusal", "settings"},  # the domain's refusal, the limits from the environment
    {"ops"},  # each op's forward, manual backward and trace
    {"lab"},  # the learner's formulas and statements, on Traced ops
    {"engine"},  # a run's tensors, its network, traces, data; following one element
    {"check"},  # autograd, the tolerance, the recheck rule, suspects, diagnosis, fd
    {"schemas"},  # request and response models
    {"views"},  # tensors -> heatmaps
    {"cost"},  # plans, bytes, seconds, a run's admission
    {"runs"},  # a run end to end, compare, training: the orchestration
    {"programs"},  # programs: dry run, admission, run, check, training
    {"export", "notebook", "sandbox"},  # files to take home, the notebook, worker processes
    {"server"},  # how the app survives the world
    {"api"},  # thin routes: the web at the edge
    {"main", "__main__"},  # create_app, the command line
]


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "app"


def _folder_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        source = _folder(name)
        graph.setdefault(source, set())
        for target in _imports(name, path, set(modules)):
            if _folder(target) not in (source, "app"):
                graph[source].add(_folder(target))
    return graph


def test_floors_run_one_way():
    floor = {folder: level for level, folders in enumerate(FLOORS) for folder in folders}
    graph = _folder_graph()
    unplaced = sorted(set(graph) - set(floor) - {"app"})
    assert not unplaced, f"put these folders on a floor in FLOORS: {unplaced}"
    upward = sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor[b] >= floor[a]
    )
    assert not upward, f"imports that do not run down the floors: {upward}"
    assert _circles(graph) == []


def test_the_floor_check_sees_an_arrow_upward():
    """The check above is not vacuous: app/check is known to import app/engine, so that
    arrow exists, and it runs down."""
    graph = _folder_graph()
    assert "engine" in graph["check"] and "check" not in graph["engine"]
