"""Worker discovery: a module dropped into a worker package is found with nothing registered anywhere else."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config import load
from supervisor.errors import ConfigError
from supervisor.registry import discover

GOOD = '''
"""{name}: consumes nothing, produces nothing, touches nothing."""
import msgspec
from contracts import Worker

class Config(msgspec.Struct, forbid_unknown_fields=True):
    greeting: str = "hi"

class W(Worker):
    """A worker."""
    name = "{name}"
    Config = Config
'''


@pytest.fixture
def package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An empty worker package on sys.path under a unique name."""
    name = f"dropin_{uuid.uuid4().hex[:8]}"
    directory = tmp_path / name
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    yield name, directory
    sys.path.remove(str(tmp_path))
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_a_dropped_in_module_is_discovered(package: tuple[str, Path]) -> None:
    name, directory = package
    (directory / "greeter.py").write_text(GOOD.format(name="greeter"))
    (directory / "_private.py").write_text("raise RuntimeError('never imported')")
    found = discover([name])
    assert list(found) == ["greeter"]
    assert found["greeter"].__module__ == f"{name}.greeter"


def test_the_shipped_and_test_packages_are_discovered() -> None:
    found = discover(["workers", "testworkers"])
    assert {"echo", "broken_start"} <= set(found)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            GOOD.format(name="Bad Name"),
            r"\.W: name: expected a lower-case identifier like 'scraper', got 'Bad Name'$",
        ),
        (GOOD.format(name="ok").replace('"""A worker."""', "pass"), r"\.W: a worker needs a docstring"),
        (
            GOOD.format(name="ok").replace("forbid_unknown_fields=True", ""),
            r"\.W: Config: expected a msgspec.Struct with forbid_unknown_fields=True",
        ),
        ("import not_a_module_anywhere", r": cannot import worker module: ModuleNotFoundError: "),
    ],
)
def test_a_bad_worker_module_is_a_clear_error(package: tuple[str, Path], source: str, message: str) -> None:
    name, directory = package
    (directory / "broken.py").write_text(textwrap.dedent(source))
    with pytest.raises(ConfigError, match=rf"^{name}\.broken{message}"):
        discover([name])


def test_two_workers_with_one_name_are_an_error(package: tuple[str, Path]) -> None:
    name, directory = package
    (directory / "a.py").write_text(GOOD.format(name="twin"))
    (directory / "b.py").write_text(GOOD.format(name="twin"))
    with pytest.raises(ConfigError, match=r"^workers: twin: two workers share this name: "):
        discover([name])


def test_a_missing_worker_package_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^supervisor.worker_packages: no_such_package_xyz: cannot import"):
        discover(["no_such_package_xyz"])


def test_a_config_field_named_like_a_supervision_key_is_an_error_at_load(
    package: tuple[str, Path], tmp_path: Path
) -> None:
    # In the worker's section, `restart` would be taken by the supervisor: the worker would never see its value.
    name, directory = package
    (directory / "clash.py").write_text(GOOD.format(name="clash").replace("greeting: str", "restart: str"))
    path = tmp_path / "config.toml"
    path.write_text(f'[supervisor]\nworker_packages = ["{name}"]\n')
    assert load(path, {}).workers == ()  # found but used by no section: it stops nothing
    path.write_text(f'[supervisor]\nworker_packages = ["{name}"]\n[workers.clash]\n')
    with pytest.raises(ConfigError, match=r"Config: field\(s\) restart have the names of the supervisor's keys"):
        load(path, {})


def test_a_broken_module_no_section_enables_is_reported_and_stops_nothing(
    package: tuple[str, Path], tmp_path: Path
) -> None:
    name, directory = package
    (directory / "good.py").write_text(GOOD.format(name="good"))
    (directory / "half.py").write_text("def half_written(:\n")  # saved in the middle of an edit
    (directory / "plain.py").write_text("VALUE = 1\n")  # no worker in it
    path = tmp_path / "config.toml"
    path.write_text(f'[supervisor]\nworker_packages = ["{name}"]\n[workers.good]\n')
    settings = load(path, {})
    assert [w.name for w in settings.workers] == ["good"]
    assert sorted(settings.broken_modules) == [f"{name}.half", f"{name}.plain"]
    assert settings.broken_modules[f"{name}.half"].startswith(
        f"{directory / 'half.py'}: cannot import worker module: SyntaxError: "
    )
    assert (
        settings.broken_modules[f"{name}.plain"]
        == f"{directory / 'plain.py'}: no contracts.Worker subclass in this module (name it _<name> to hide it)"
    )
    # A section that enables the broken one is an error that names it (a disabled one is skipped).
    path.write_text(f'[supervisor]\nworker_packages = ["{name}"]\n[workers.half]\n')
    with pytest.raises(
        ConfigError,
        match=r"^\S+config\.toml: \[workers\.half\]: its worker 'half' cannot be loaded: "
        r"\S+half\.py: cannot import worker module: SyntaxError",
    ):
        load(path, {})
    path.write_text(f'[supervisor]\nworker_packages = ["{name}"]\n[workers.half]\nenabled = false\n')
    assert load(path, {}).workers == ()
