"""The command line: exit codes 0 / 2, one-line errors without tracebacks, and the package identity check."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.errors import WrongPackageError

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, python_path: tuple[Path, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`python -m supervisor ARGS` to its end, the test workers (and `python_path`) importable, no MQTT_ override
    from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, python_path), str(ROOT / "tests"), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
    )


def test_version_prints_the_distribution_and_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "mqtt-home-supervisor 0.1.0"


def test_check_config_accepts_the_shipped_config() -> None:
    result = run("--config", "deploy/config.toml", "--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deploy/config.toml: OK")


def test_check_config_validates_enabled_worker_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[supervisor]\nworker_packages = ["testworkers"]\n[workers.echo]\ntopics = ["a/+"]\nout = "o"\n')
    result = run("--config", str(path), "--check-config")
    assert result.returncode == 0, result.stderr
    assert "workers enabled: echo" in result.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[mqtt]\nport = 'x'\n", '[mqtt] port: expected int, got "x"'),
        ("[mqtt]\nbogus = 1\n", "[mqtt] bogus: unknown key"),
        (
            '[supervisor]\nworker_packages = ["testworkers"]\n[workers.echo]\ntopics = ["a/#/b"]\nout = "o"\n',
            "worker echo: subscriptions(): invalid topic filter 'a/#/b': '#' must be the last level",
        ),
    ],
)
def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    result = run("--config", str(path), "--check-config")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}/nope.toml: no such file; pass an existing file with --config"


def test_bad_command_line_exits_2() -> None:
    assert run().returncode == 2
    assert run("--config", "deploy/config.toml", "--log-level", "LOUD").returncode == 2


def test_another_projects_supervisor_package_is_refused() -> None:
    supervisord = types.ModuleType("supervisor")
    supervisord.__file__ = "/usr/lib/python3/dist-packages/supervisor/__init__.py"
    with pytest.raises(
        WrongPackageError,
        match=r"^the import name 'supervisor' resolves to another project at "
        r"/usr/lib/python3/dist-packages/supervisor/__init__.py",
    ):
        cli.check_package_identity(supervisord)
    import supervisor

    cli.check_package_identity(supervisor)  # ours passes
