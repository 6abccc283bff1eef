"""The package's layers hold: no import circles, and no import up a floor or across to a neighbour.
Read from the code (every import a module runs, lazy ones inside functions included; imports under
`if TYPE_CHECKING:` never run and are left out)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "soup_ui"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports when it runs."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    here = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    never = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in never:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level else node.module or ""
            named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]  # from . import soup
            targets = named + [base]  # `from PACKAGE import x` runs PACKAGE's __init__ first: an arrow to it too
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != me:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imported_modules(p, set(paths)) for m, p in paths.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# The floors, bottom up: a module imports from lower floors and from its own subpackage only.
FLOORS = {
    "soup_ui": 0, "soup_ui.errors": 0, "soup_ui.files": 0, "soup_ui.configs": 0,
    "soup_ui.maths": 1,
    "soup_ui.modelfiles": 2,
    "soup_ui.engine": 3, "soup_ui.training": 3,
    "soup_ui.serving": 4, "soup_ui.search": 4,
    "soup_ui.page": 5, "soup_ui.cli": 5, "soup_ui.__main__": 6,
}


def room(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up a floor or across to another room of the same floor."""
    out = []
    for module, targets in sorted(graph.items()):
        here = room(module)
        for target in sorted(targets):
            there = room(target)
            if there != here and FLOORS[there] >= FLOORS[here]:
                out.append(f"{module} -> {target}")
    return out


def test_the_reader_sees_lazy_imports_and_finds_a_circle():
    """The check itself: a lazy `from .b import x` inside a function is an arrow, and a -> b -> a is found."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert circles(graph) == [["p.a", "p.b"]]
    graph = import_graph()
    assert "soup_ui.engine.workflows" in graph["soup_ui.cli"]  # imported inside cmd_leave_one_out only
    assert "soup_ui.maths" in graph["soup_ui.maths.methods.merge"]  # `from .. import soup` runs the package's __init__


def test_the_package_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 20
    assert circles(graph) == []


def test_every_room_has_a_floor_and_no_import_goes_up_or_across():
    graph = import_graph()
    assert {room(m) for m in graph} <= set(FLOORS), {room(m) for m in graph} - set(FLOORS)
    assert wrong_way({"soup_ui.maths.soup": {"soup_ui.engine.studio"}, "soup_ui.search.run": {"soup_ui.serving.workers"}}) == [
        "soup_ui.maths.soup -> soup_ui.engine.studio", "soup_ui.search.run -> soup_ui.serving.workers"]
    assert wrong_way(graph) == []
    # The page never reaches the render workers itself: app.py wires the two.
    assert [m for m, targets in graph.items() if room(m) == "soup_ui.page" and any(room(t) == "soup_ui.serving" for t in targets)] == []


def test_no_function_over_120_lines_and_no_class_over_300():
    """Rooms a newcomer can read: the page is built from panels, Studio is a facade."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            size = node.end_lineno - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 120 or isinstance(node, ast.ClassDef) and size > 300:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({size} lines)")
    assert long == []


def test_each_subpackage_says_what_it_holds_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        if init.parent.name == "configs":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower() and len(doc) > 120, init
