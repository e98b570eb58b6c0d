"""The README's "Adding a worker" is true: its worker module and its test, taken from the README as they stand,
run (the module dropped into a worker package of its own, the test run against it)."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.registry import discover

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks() -> list[str]:
    section = README.read_text().split("## Adding a worker", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture
def package(tmp_path: Path) -> Iterator[str]:
    name = f"readme_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    yield name
    sys.path.remove(str(tmp_path))


def test_the_readme_worker_is_found_and_its_test_passes(package: str, tmp_path: Path) -> None:
    module, test = blocks()
    (tmp_path / package / "doorbell.py").write_text(module)
    assert list(discover([package])) == ["doorbell"]
    namespace: dict[str, object] = {}
    exec(compile(test.replace("from workers.doorbell", f"from {package}.doorbell"), "README", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert len(tests) == 1
    tests[0](tmp_path / "state")
