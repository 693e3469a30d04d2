"""`daemon/` has no import cycle: every module can be read (and imported) after the ones it needs.

Imports inside functions count too: a lazy import only hides a cycle until the function runs.
Imports under `if TYPE_CHECKING:` do not, since they never run.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
PACKAGE = "llmd.daemon"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(DAEMON).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement in `tree` may load, outside TYPE_CHECKING blocks."""
    names: set[str] = set()
    pending = [tree]
    while pending:
        node = pending.pop()
        for child in ast.iter_child_nodes(node):
            if _is_type_checking_block(child):
                pending.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names)
            pending.append(child)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the `llmd.daemon` modules it imports."""
    paths = {_module_name(path): path for path in DAEMON.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported = _imported_names(ast.parse(path.read_text(), str(path)), package)
        graph[module] = {name for name in imported if name in paths and name != module}
    return graph


def test_the_graph_sees_imports() -> None:
    graph = import_graph()
    assert "llmd.daemon.manager.core" in graph["llmd.daemon.http.proxy"]
    assert "llmd.daemon.config" in graph["llmd.daemon.main"]


def test_daemon_has_no_import_cycle() -> None:
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise AssertionError("import cycle in daemon/: " + " -> ".join(cycle)) from None


def test_a_cycle_is_found(tmp_path: Path) -> None:
    """The check itself: two modules importing each other, one of them lazily, form a cycle."""
    first = ast.parse("from llmd.daemon.b import x\n")
    second = ast.parse("def f():\n    from . import a\n")
    graph = {
        "llmd.daemon.a": _imported_names(first, "llmd.daemon") & {"llmd.daemon.b"},
        "llmd.daemon.b": _imported_names(second, "llmd.daemon") & {"llmd.daemon.a"},
    }
    assert graph == {"llmd.daemon.a": {"llmd.daemon.b"}, "llmd.daemon.b": {"llmd.daemon.a"}}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("a two-module cycle was not reported")
