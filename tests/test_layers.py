"""The import rules of the package docstring hold for every import statement (function-local ones included)."""

import ast
import re
from pathlib import Path

import bsharedrag

PACKAGE = Path(bsharedrag.__file__).parent
_ROW = re.compile(r"^\s{4}(\w+):\s+([\w ]+?)\s+->\s+([\w ]+)$")


def layer_table() -> tuple[dict[str, str], dict[str, set[str]]]:
    """(top-level module -> layer, layer -> the top-level modules it may import), from the docstring."""
    rows = [_ROW.match(line) for line in bsharedrag.__doc__.splitlines()]
    rows = [row.groups() for row in rows if row]
    layer_of = {module: layer for layer, modules, _ in rows for module in modules.split()}
    members = {layer: set(modules.split()) for layer, modules, _ in rows}
    allowed = {}
    for layer, modules, imports in rows:
        names = set() if imports.strip() == "nothing" else set(imports.split())
        unknown = names - set(members) - set(layer_of)
        assert not unknown, f"the layer table names {unknown}, which are neither layers nor modules"
        allowed[layer] = set(members[layer]).union(*(members.get(name, {name}) for name in names))
    return layer_of, allowed


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The top-level project modules (`run`, `model`, ...) that the file at `path` imports."""
    here = _module_name(path).split(".") if _module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "bsharedrag":
                target = node.module.split(".")[1:]
            else:
                continue
            if not target:  # `from .. import __version__`, or a name of the package root
                names = [alias.name for alias in node.names]
                target = [names[0]] if names != ["__version__"] else []
            if target:
                found.add(target[0])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("bsharedrag.")}
    return found


def test_the_layer_table_covers_every_module():
    layer_of, _ = layer_table()
    top_level = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    top_level |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert top_level - set(layer_of) == set(), "a module is missing from the layer table of the package docstring"


def test_every_import_follows_the_layer_table():
    layer_of, allowed = layer_table()
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if not name:
            continue
        layer = layer_of[name.split(".")[0]]
        for target in sorted(project_imports(path) - allowed[layer]):
            broken.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {target} ({layer_of.get(target)})")
    assert broken == []


def test_only_the_pipeline_trains_and_only_the_cli_and_compare_build():
    importers = {"train": set(), "pipeline": set()}
    for path in PACKAGE.rglob("*.py"):
        top = _module_name(path).split(".")[0]
        for target in project_imports(path) & set(importers):
            if top != target:
                importers[target].add(top)
    assert importers["train"] == {"pipeline"}
    assert importers["pipeline"] <= {"cli", "compare"}


def test_the_checker_sees_relative_local_and_absolute_imports():
    module = PACKAGE / "serving" / "routes" / "qa.py"
    assert "rag" in project_imports(module)  # from ...rag import Answer
    assert project_imports(PACKAGE / "serving" / "app.py") >= {"rag", "run", "config"}  # function-local and typing
