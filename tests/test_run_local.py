"""`make run` as a person runs it in a terminal: one Ctrl-C stops everything cleanly and make exits 0."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import ROOT, TESTS
from support import MqttProbe, free_port, process_gone, toml

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (a supervisor of this test, and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes() and not process_gone(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def read_until(fd: int, pattern: str, output: bytearray, timeout: float) -> re.Match[str]:
    """Read the terminal until `pattern` appears in what it showed; fail saying what it showed."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, output.decode(errors="replace"))
        if found:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            shown = output.decode(errors="replace")[-3000:]
            raise AssertionError(f"timed out after {timeout} s waiting for {pattern!r}; the terminal showed:\n{shown}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                output += os.read(fd, 65536)
            except OSError:  # the other end closed: the program ended
                raise AssertionError(
                    f"the program ended before {pattern!r}:\n{output.decode(errors='replace')[-3000:]}"
                ) from None


def test_one_ctrl_c_under_make_run_stops_every_worker_cleanly_and_make_exits_0(tmp_path: Path, prefix: str) -> None:
    config = tmp_path / "config.toml"
    port = free_port()  # nothing listens there: run-local starts its throwaway mosquitto
    config.write_text(
        toml(
            {
                "supervisor": {
                    "base_topic": f"{prefix}/sup",
                    "state_dir": str(tmp_path / "state"),
                    "worker_packages": ["testworkers"],
                },
                "mqtt": {"host": "127.0.0.1", "port": port, "client_id": f"run-local-{port}"},
                "metrics": {"port": 0},
                "workers": {
                    "echo": {"topics": [f"{prefix}/in/#"], "out": f"{prefix}/out"},
                    "ticker": {"out": f"{prefix}/t", "interval_seconds": 1.0},
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "MAKE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    pid, fd = pty.fork()
    if pid == 0:  # the child: `make run` on a terminal of its own, as in a shell
        os.chdir(ROOT)
        os.execvpe(
            "make", ["make", "--no-print-directory", "run", f"CONFIG={config}", f"PY={ROOT}/.venv/bin/python"], env
        )
    output = bytearray()
    try:
        found = read_until(fd, r"started a local mosquitto .*\(pid (\d+), in (\S+)\)", output, 60)
        broker_pid, workdir = int(found.group(1)), Path(found.group(2))
        probe = MqttProbe(port)
        probe.subscribe(f"{prefix}/sup/availability")
        probe.wait_for(f"{prefix}/sup/availability", lambda m: m.text == "online", timeout=30)
        read_until(fd, r"worker ticker running", output, 30)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
        _, status = os.waitpid(pid, 0)
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
        for leftover in processes_mentioning(str(config)):  # a failed run must leave nothing behind
            os.kill(leftover, signal.SIGKILL)
    with contextlib.suppress(OSError):  # the rest of what the terminal showed, until it closes
        while select.select([fd], [], [], 0.5)[0] and (chunk := os.read(fd, 65536)):
            output += chunk
    os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    assert "worker echo stopped: exit code 0" in text and "worker ticker stopped: exit code 0" in text, text[-3000:]
    assert "supervisor stopped (exit code 0)" in text
    assert [m.text for m in probe.received(f"{prefix}/sup/availability")][-1] == "offline"  # before the broker went
    probe.client.loop_stop()
    assert process_gone(broker_pid)
    assert not workdir.exists()
    assert processes_mentioning(str(config)) == []
