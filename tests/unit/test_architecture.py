"""The shape of the tree: the shared floor knows no service, and no module imports in a circle."""
import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("common", "config", "ingest_service", "metadata_service", "archive_service",
            "policy_service", "stats_service")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    # ``from common import registry`` names the module common.registry; keep only real modules.
    return {name for name in names if name in known}


def test_nothing_under_common_imports_or_names_a_service():
    offenders = []
    for name, path in modules().items():
        if not name.startswith("common"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # Not even as a string for import_module: the registry names the services.
                targets = [word for word in node.value.replace(":", " ").replace(".", " ").split()]
            else:
                continue
            if any(target.split(".")[0].endswith("_service") for target in targets):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], offenders


def test_there_is_no_import_circle():
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    # A package's __init__ is imported with each of its modules; an edge to it is not a circle
    # unless the package itself imports back.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == [], "\n".join(" -> ".join(cycle) for cycle in cycles)
