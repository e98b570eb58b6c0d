"""The import arrows point down: workers and contracts never import the supervisor or paho; only the MQTT link and
its paho client import paho."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top_level(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("package", ["workers", "contracts"])
def test_workers_and_contracts_import_neither_the_supervisor_nor_paho(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(top_level(imported_modules(path)) & {"supervisor", "paho"})
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_test_workers_import_only_contracts_too() -> None:
    for path in (ROOT / "tests" / "testworkers").rglob("*.py"):
        assert top_level(imported_modules(path)) & {"supervisor", "paho"} == set(), path


def test_only_the_mqtt_link_and_its_paho_client_import_paho() -> None:
    users = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "supervisor").rglob("*.py")
        if "paho" in top_level(imported_modules(p))
    )
    assert users == ["supervisor/fastpaho.py", "supervisor/mqtt.py"]


def package_map() -> list[str]:
    """The module names in the map at the top of supervisor/__init__.py, top to bottom."""
    text = (ROOT / "supervisor" / "__init__.py").read_text()
    lines = text.split("\n\n", 2)[2].split('"""')[0].splitlines()
    return [line.split()[0] for line in lines if line.startswith("    ") and not line.startswith("     ")]


def supervisor_imports(path: Path) -> set[str]:
    """The modules of `supervisor` that `path` imports (a name imported from the package itself counts if it is one)."""
    modules = {p.stem for p in (ROOT / "supervisor").glob("*.py")}
    found = {n.split(".")[1] for n in imported_modules(path) if n.startswith("supervisor.")}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "supervisor":
            found.update(alias.name for alias in node.names if alias.name in modules)
    return found


def test_the_package_map_names_every_module_and_imports_only_point_down_it() -> None:
    mapped = package_map()
    modules = sorted(p.stem for p in (ROOT / "supervisor").glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert sorted(mapped) == modules
    upward = {
        name: sorted(m for m in supervisor_imports(ROOT / "supervisor" / f"{name}.py") if mapped.index(m) < index)
        for index, name in enumerate(mapped)
    }
    assert {name: above for name, above in upward.items() if above} == {}
