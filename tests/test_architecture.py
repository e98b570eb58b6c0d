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
            if node.module == "supervisor":  # `from supervisor import control` imports the module supervisor.control
                names.update(f"supervisor.{alias.name}" for alias in node.names if not alias.name.startswith("_"))
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


def test_the_module_map_lists_every_module_and_imports_point_down_it() -> None:
    import supervisor

    doc = supervisor.__doc__ or ""
    listed = [line.split()[0] for line in doc.splitlines() if line.startswith("    ") and line.split()]
    modules = sorted(p.stem for p in (ROOT / "supervisor").glob("*.py") if not p.stem.startswith("__"))
    assert sorted(listed) == modules
    for position, module in enumerate(listed):
        imported = imported_modules(ROOT / "supervisor" / f"{module}.py")
        ours = {n.split(".")[1] for n in imported if n.startswith("supervisor.")}
        assert ours <= set(listed[position + 1 :]), f"{module} imports {sorted(ours - set(listed[position + 1 :]))}"
