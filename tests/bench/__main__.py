"""`make bench`: the supervisor against a plain paho echo client, measured side by side in one run.

The baseline is what a user writes instead (`plain_echo.py`: paho's own loop thread, TCP_NODELAY, `on_message`
publishing back); the supervisor runs the equivalent echo worker (`relay`). Starts its own Mosquitto on a free
loopback port and measures, each as the median of several runs: routed throughput (QoS 1 and QoS 0, with loss),
CPU time per message at paced home rates (100 and 1000 msg/s, QoS 0 and 1: the supervisor and its worker together
against the plain client), idle CPU, fan-out to 1/4/16 workers, memory (PSS) of the four shipped workers against one
process per service, recovery after `kill -9` of a worker and after broker outages of several lengths; and
round-trip latency at a fixed rate, pooled over many short turns that alternate between the two systems. The load
comes from `rawmqtt` (raw sockets, so the driver is not what limits the systems measured; its own CPU per message is
reported). Prints a table, then one JSON object with every figure as the last line. Every run is bounded.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from support import Broker, descendants, toml, wait_until  # noqa: E402

from .rawmqtt import LoadGen  # noqa: E402

RUNS = 3
MESSAGES = 20_000
WINDOW = 500  # echoes outstanding from the load generator: a sustained rate, not a test of queue depths
PAYLOAD_BYTES = 150
LATENCY_RATE = 1000
LATENCY_MESSAGES = 500  # per turn: half a second
LATENCY_TURNS = 40  # per system, alternating: 20,000 round trips each (the tail needs many bursts of noise to average)
FLOOD_MESSAGES = 50_000
CPU_RATES = {100: 300, 1000: 3000}  # paced rate -> messages per turn (3 s each)
CPU_TURNS = 2  # per system and rate, alternating
IDLE_SECONDS = 10.0
OUTAGES = (0.2, 0.7, 1.5, 3.0, 6.0)  # broker down this long: the retry cycle is met at different points
RUN_TIMEOUT = 60.0
# The bench broker: queues deep enough that a QoS 0 loss is the system's, not the broker's default 1000 limit.
BROKER_ACCESS = "allow_anonymous true\nmax_queued_messages 100000\n"


# Systems under test -------------------------------------------------------------------------------------------------


@contextmanager
def supervisor(broker: Broker, workdir: Path, workers: dict[str, dict[str, Any]]) -> Iterator[subprocess.Popen[bytes]]:
    """The supervisor running `workers`, connected and with every worker running before the body runs."""
    tag = uuid.uuid4().hex[:8]
    config = workdir / f"bench-{tag}.toml"
    config.write_text(
        toml(
            {
                "supervisor": {
                    "base_topic": f"bench/{tag}",
                    "state_dir": str(workdir / "state"),
                    "worker_packages": ["testworkers", "workers"],
                },
                "mqtt": {"port": broker.port, "client_id": f"bench-{tag}"},
                "metrics": {"port": 0},
                "workers": workers,
            }
        )
    )
    log_path = workdir / f"bench-{tag}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--config", str(config)], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        wait_until(
            lambda: _ready(log_path.read_text(), len(workers)),
            20,
            f"the supervisor to connect and start its workers (log {log_path})",
        )
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(log_text: str, workers: int) -> bool:
    return "subscribed to" in log_text and log_text.count(" running (pid ") >= workers


Processes = AbstractContextManager[list[subprocess.Popen[str]]]


@contextmanager
def ready_processes(commands: list[list[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    """Baseline processes, each of which prints "ready" once subscribed; all ready before the body runs."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for command in commands]
    try:
        for process, command in zip(processes, commands, strict=True):
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a baseline process did not start: {command[1:3]}")
        yield processes
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def baselines(broker: Broker, topics: list[tuple[str, str]], qos: int) -> Processes:
    """One plain paho echo client per (in topic, out prefix)."""
    script = str(Path(__file__).with_name("plain_echo.py"))
    return ready_processes(
        [
            [sys.executable, script, str(broker.port), in_topic, f"{out_topic}/plain", str(qos)]
            for in_topic, out_topic in topics
        ]
    )


def relays(count: int, topics: Callable[[int], list[str]], qos: int) -> dict[str, dict[str, Any]]:
    return {f"relay{i}": {"worker": "relay", "topics": topics(i), "out": "bench/out", "qos": qos} for i in range(count)}


# Measurements -------------------------------------------------------------------------------------------------------


def throughput(
    load: LoadGen, topics: list[str], qos: int, echoes_per_message: int = 1, messages: int = MESSAGES
) -> tuple[float, int]:
    """Echoes per second, and how many of the expected echoes never came, publishing with a bounded window."""
    started = time.perf_counter_ns()
    arrivals = load.run(
        topics,
        qos,
        messages,
        echoes_per_message=echoes_per_message,
        window=WINDOW,
        size=PAYLOAD_BYTES,
        timeout=RUN_TIMEOUT,
    )
    expected = messages * echoes_per_message
    if not arrivals:
        return 0.0, expected
    return len(arrivals) / ((arrivals[-1][2] - started) / 1e9), expected - len(arrivals)


def round_trips(load: LoadGen, topic: str) -> tuple[list[float], int]:
    """Round-trip times in ms of one turn at a fixed LATENCY_RATE, QoS 1, and how many echoes never came."""
    arrivals = load.run([topic], 1, LATENCY_MESSAGES, rate=LATENCY_RATE, size=PAYLOAD_BYTES, timeout=RUN_TIMEOUT)
    return [(arrived - sent) / 1e6 for _, sent, arrived in arrivals], LATENCY_MESSAGES - len(arrivals)


def percentiles(rtts: list[float], lost: int) -> dict[str, float]:
    rtts = sorted(rtts)
    return {
        "p50_ms": round(rtts[len(rtts) // 2], 3),
        "p99_ms": round(rtts[int(len(rtts) * 0.99)], 3),
        "max_ms": round(rtts[-1], 3),
        "lost": lost,
    }


def cpu_ns(pids: list[int]) -> int:
    """CPU time (ns) of every thread of `pids` so far, from schedstat (nanoseconds, where /proc/<pid>/stat counts
    10 ms ticks: too coarse for an idle process)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # a thread that just ended
                continue
    return total


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss in /proc/{pid}/smaps_rollup")


def worker_pids(supervisor_pid: int) -> list[int]:
    """The worker processes below the supervisor: all but multiprocess's forkserver and resource tracker."""
    return [pid for pid in descendants(supervisor_pid) if not _is_helper(pid)]


def _is_helper(pid: int) -> bool:
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return b"forkserver" in command or b"resource_tracker" in command


def median(values: list[float]) -> float:
    return statistics.median(values)


def mib(value: int) -> float:
    return round(value / 2**20, 1)


def log(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# The benchmark ------------------------------------------------------------------------------------------------------


def main() -> None:
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir, access=BROKER_ACCESS)
        broker.start()
        try:
            run_all(broker, workdir, results)
        finally:
            broker.stop()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets_met"] = targets_met(results)
    print_table(results)
    print(json.dumps(results, sort_keys=True))


def run_all(broker: Broker, workdir: Path, results: dict[str, Any]) -> None:
    load = LoadGen(broker.port, "bench/out/#")
    try:
        for qos in (1, 0):
            rate, lost = measure_throughput(
                functools.partial(supervisor, broker, workdir, relays(1, lambda i: ["bench/in"], qos)), load, qos
            )
            base_rate, base_lost = measure_throughput(
                functools.partial(baselines, broker, [("bench/in", "bench/out")], qos), load, qos
            )
            results[f"qos{qos}"] = {
                "supervisor_msg_s": round(rate),
                "supervisor_lost": lost,
                "baseline_msg_s": round(base_rate),
                "baseline_lost": base_lost,
                "ratio": round(rate / base_rate, 3),
            }
            log(f"QoS {qos}: supervisor {rate:.0f} msg/s (lost {lost}), baseline {base_rate:.0f} (lost {base_lost})")
        results["latency"] = measure_latency(broker, workdir, load)
        results["cpu"] = measure_cpu(broker, workdir, load)
        results["idle"] = measure_idle(broker, workdir)
        results["fanout"] = measure_fanout(broker, workdir, load)
    finally:
        load.close()
    results["memory"] = measure_memory(broker, workdir)
    results["flood"] = measure_flood(broker, workdir)
    results["recovery"] = measure_recovery(broker, workdir)


def measure_throughput(system: Callable[[], Any], load: LoadGen, qos: int) -> tuple[float, int]:
    with system():
        runs = [throughput(load, ["bench/in"], qos) for _ in range(RUNS)]
    return median([rate for rate, _ in runs]), max(lost for _, lost in runs)


def measure_latency(broker: Broker, workdir: Path, load: LoadGen) -> dict[str, Any]:
    """Both systems run at once on their own topics and take many short turns; each one's round trips are pooled.

    The machine's noise comes in bursts of up to seconds (a run's p99 measured anywhere from 0.6 to 8.8 ms here):
    half-second turns spread the bursts over both systems alike, where a few long runs each would catch them unevenly.
    """
    samples: dict[str, tuple[list[float], list[int]]] = {"supervisor": ([], []), "baseline": ([], [])}
    with (
        supervisor(broker, workdir, relays(1, lambda i: ["bench/lat/supervisor"], 1)),
        baselines(broker, [("bench/lat/baseline", "bench/out")], 1),
    ):
        for _ in range(LATENCY_TURNS):
            for system, (rtts, losses) in samples.items():
                turn, lost = round_trips(load, f"bench/lat/{system}")
                rtts.extend(turn)
                losses.append(lost)
    figures: dict[str, Any] = {system: percentiles(rtts, sum(losses)) for system, (rtts, losses) in samples.items()}
    figures["p99_ratio"] = round(figures["supervisor"]["p99_ms"] / figures["baseline"]["p99_ms"], 3)
    log(f"latency at {LATENCY_RATE}/s: supervisor {figures['supervisor']}, baseline {figures['baseline']}")
    return figures


def measure_cpu(broker: Broker, workdir: Path, load: LoadGen) -> dict[str, Any]:
    """CPU time per message (the supervisor and its worker together, against the plain client) at paced rates: what
    a message costs at home, where per-wake-up work weighs more than under a flood. Alternating turns, both running."""
    figures: dict[str, Any] = {}
    for qos in (0, 1):
        with (
            supervisor(broker, workdir, relays(1, lambda i: ["bench/cpu/supervisor"], qos)) as process,
            baselines(broker, [("bench/cpu/baseline", "bench/out")], qos) as plain,
        ):
            pids = {"supervisor": [process.pid, *worker_pids(process.pid)], "baseline": [p.pid for p in plain]}
            for rate, messages in CPU_RATES.items():
                used, handled, load_ns = dict.fromkeys(pids, 0), dict.fromkeys(pids, 0), 0
                for _ in range(CPU_TURNS):
                    for system, its in pids.items():
                        before, load_before = cpu_ns(its), time.thread_time_ns()
                        arrivals = load.run(
                            [f"bench/cpu/{system}"], qos, messages, rate=rate, size=PAYLOAD_BYTES, timeout=RUN_TIMEOUT
                        )
                        load_ns += time.thread_time_ns() - load_before
                        used[system] += cpu_ns(its) - before
                        handled[system] += len(arrivals)
                us = {system: used[system] / max(handled[system], 1) / 1000 for system in pids}
                figures[f"qos{qos}_{rate}"] = {
                    "supervisor_us": round(us["supervisor"], 1),
                    "baseline_us": round(us["baseline"], 1),
                    "ratio": round(us["supervisor"] / us["baseline"], 3),
                    "load_generator_us": round(load_ns / max(sum(handled.values()), 1) / 1000, 1),
                    "lost": CPU_TURNS * messages * 2 - sum(handled.values()),
                }
                log(f"CPU per message, QoS {qos} at {rate}/s: {figures[f'qos{qos}_{rate}']}")
    return figures


def idle_ms_per_s(pids: list[int]) -> float:
    before = cpu_ns(pids)
    time.sleep(IDLE_SECONDS)
    return (cpu_ns(pids) - before) / 1e6 / IDLE_SECONDS


def measure_idle(broker: Broker, workdir: Path) -> dict[str, Any]:
    """CPU while nothing happens (heartbeats, timers, status and metrics bookkeeping): the supervisor with one worker
    against one plain client, measured over the same seconds."""
    with (
        supervisor(broker, workdir, relays(1, lambda i: ["bench/idle/supervisor"], 1)) as process,
        baselines(broker, [("bench/idle/baseline", "bench/out")], 1) as plain,
    ):
        time.sleep(1.0)  # past the start
        pids = {"supervisor": [process.pid, *worker_pids(process.pid)], "baseline": [p.pid for p in plain]}
        before = {system: cpu_ns(its) for system, its in pids.items()}
        time.sleep(IDLE_SECONDS)
        ms = {system: (cpu_ns(its) - before[system]) / 1e6 / IDLE_SECONDS for system, its in pids.items()}
    figures = {
        "supervisor_ms_per_s": round(ms["supervisor"], 3),
        "baseline_ms_per_s": round(ms["baseline"], 3),
        "ratio": round(ms["supervisor"] / ms["baseline"], 3),
    }
    log(f"idle CPU: {figures}")
    return figures


def measure_fanout(broker: Broker, workdir: Path, load: LoadGen) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for count in (1, 4, 16):
        topics = [f"bench/in/{i}" for i in range(count)]
        with supervisor(broker, workdir, relays(count, lambda i: [f"bench/in/{i}", "bench/all"], 0)):
            one = median([throughput(load, topics, 0, messages=MESSAGES // 2)[0] for _ in range(RUNS)])
            every = median(
                [throughput(load, ["bench/all"], 0, count, messages=MESSAGES // (2 * count))[0] for _ in range(RUNS)]
            )
        figures[f"workers_{count}"] = {"each_to_one_msg_s": round(one), "each_to_all_deliveries_s": round(every)}
        log(f"fan-out {count}: each message to one worker {one:.0f}/s, to all {every:.0f} deliveries/s")
    return figures


# The four shipped workers, idle: no reachable web page or model (nothing to fetch while measured).
SHIPPED: dict[str, dict[str, Any]] = {
    "scraper": {
        "sources": [
            {"name": "idle", "url": "http://127.0.0.1:9/", "items": "li", "fields": {"title": "h3", "date": "t"}}
        ],
        "retries": 0,
        "short_names": False,
    },
    "ai_analyzer": {"base_url": "http://127.0.0.1:9/v1"},
    "batch_scheduler": {"record_topics": ["bench/idle/home/+/+/state"], "use_ai": False},
    "ha_responder": {"devices_prefix": "bench/idle/home", "feedback_topic": "bench/idle/responses/#"},
}


def services(broker: Broker) -> Processes:
    """The shipped workers run the way the supervisor replaces: one process each, with its own paho connection."""
    script = str(Path(__file__).with_name("baseline_service.py"))
    return ready_processes(
        [
            [sys.executable, script, str(broker.port), f"workers.{name}", json.dumps(table)]
            for name, table in SHIPPED.items()
        ]
    )


def measure_memory(broker: Broker, workdir: Path) -> dict[str, Any]:
    """PSS of the supervisor with the four shipped workers, against each run as its own process with paho."""
    with supervisor(broker, workdir, SHIPPED) as process:
        time.sleep(1.0)  # let start-up settle
        workers = worker_pids(process.pid)
        helpers = [pid for pid in descendants(process.pid) if pid not in workers]
        supervisor_pss = pss_bytes(process.pid)
        helper_pss = sum(pss_bytes(pid) for pid in helpers)
        worker_pss = [pss_bytes(pid) for pid in workers]
        idle = idle_ms_per_s([process.pid, *workers])
    with services(broker) as processes:
        time.sleep(1.0)
        baseline_pss = [pss_bytes(p.pid) for p in processes]
        baseline_idle = idle_ms_per_s([p.pid for p in processes])
    total = supervisor_pss + helper_pss + sum(worker_pss)
    figures = {
        "supervisor_mib": mib(supervisor_pss),
        "helpers_mib": mib(helper_pss),
        "worker_mib": [mib(p) for p in worker_pss],
        "total_mib": mib(total),
        "baseline_process_mib": [mib(p) for p in baseline_pss],
        "baseline_total_mib": mib(sum(baseline_pss)),
        "ratio": round(total / sum(baseline_pss), 3),
        "idle_ms_per_s": round(idle, 3),
        "baseline_idle_ms_per_s": round(baseline_idle, 3),
    }
    log(f"memory: {figures}")
    return figures


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def measure_flood(broker: Broker, workdir: Path) -> dict[str, Any]:
    """A QoS 0 flood at a worker that handles 500 messages a second: the supervisor's memory must stay bounded."""
    workers = relays(1, lambda i: ["bench/flood"], 0)
    workers["relay0"] |= {"delay_seconds": 0.002, "max_queued": 1000}
    load = LoadGen(broker.port, "bench/out/#")
    try:
        with supervisor(broker, workdir, workers) as process:
            before = rss_bytes(process.pid)
            peak = before
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.wait(0.05):
                    peak = max(peak, rss_bytes(process.pid))

            sampler = threading.Thread(target=sample)
            sampler.start()
            arrivals = load.run(
                ["bench/flood"], 0, FLOOD_MESSAGES, window=FLOOD_MESSAGES, timeout=RUN_TIMEOUT, quiet_seconds=3.0
            )
            stop.set()
            sampler.join()
    finally:
        load.close()
    figures = {
        "messages": FLOOD_MESSAGES,
        "handled": len(arrivals),
        "dropped": FLOOD_MESSAGES - len(arrivals),
        "rss_before_mib": mib(before),
        "rss_peak_mib": mib(peak),
        "growth_mib": mib(peak - before),
    }
    log(f"QoS 0 flood: {figures}")
    return figures


def measure_recovery(broker: Broker, workdir: Path) -> dict[str, Any]:
    worker_ms, broker_ms = [], []
    # stable_after_seconds is short so that each kill, a second apart, is a first crash (restarted at once)
    # rather than one in a series, which backs off by design.
    workers = relays(1, lambda i: ["bench/in"], 1)
    workers["relay0"]["stable_after_seconds"] = 0.5
    load = LoadGen(broker.port, "bench/out/#")
    try:
        with supervisor(broker, workdir, workers) as process:
            for _ in range(5):
                time.sleep(1.0)
                worker_ms.append(_worker_recovery(load, process.pid))
    finally:
        load.close()
    for outage in OUTAGES:
        with supervisor(broker, workdir, relays(1, lambda i: ["bench/in"], 1)):
            broker_ms.append(_broker_recovery(broker, outage))
    figures = {
        "worker_kill_to_first_message_ms": round(median(worker_ms), 1),
        "worker_runs_ms": [round(v, 1) for v in worker_ms],
        "broker_back_to_flowing_ms": round(median(broker_ms), 1),
        "broker_back_max_ms": round(max(broker_ms), 1),
        "broker_outages_s": list(OUTAGES),
        "broker_runs_ms": [round(v, 1) for v in broker_ms],
    }
    log(f"recovery: {figures}")
    return figures


def _worker_recovery(load: LoadGen, supervisor_pid: int) -> float:
    """ms from kill -9 of the worker to the first echo of a message sent after the kill (one message per ms)."""
    (worker,) = worker_pids(supervisor_pid)
    arrivals: list[tuple[int, int, int]] = []
    sender = threading.Thread(target=lambda: arrivals.extend(load.run(["bench/in"], 1, 1500, rate=1000)))
    sender.start()
    time.sleep(0.5)
    killed_at = time.perf_counter_ns()
    os.kill(worker, signal.SIGKILL)
    sender.join()
    after = [arrived for _, sent, arrived in arrivals if sent > killed_at]
    if not after:
        raise RuntimeError("no message handled after the worker was killed")
    wait_until(lambda: len(worker_pids(supervisor_pid)) == 1, 5, "the worker to be back")
    return (min(after) - killed_at) / 1e6


def _broker_recovery(broker: Broker, outage: float) -> float:
    """ms from the broker accepting connections again (after `outage` seconds) to the first echo through the
    supervisor."""
    broker.stop()
    time.sleep(outage)
    broker.start()
    back = time.perf_counter_ns()
    load = LoadGen(broker.port, "bench/out/#")
    try:
        arrivals = load.run(["bench/in"], 1, 5000, rate=1000, first_only=True, timeout=10)
    finally:
        load.close()
    if not arrivals:
        raise RuntimeError("no echo within 10 s of the broker coming back")
    return (arrivals[0][2] - back) / 1e6


def targets_met(r: dict[str, Any]) -> dict[str, bool]:
    """Each of the issue's targets, judged on this run's figures."""
    lat, rec = r["latency"], r["recovery"]
    return {
        "qos1": r["qos1"]["ratio"] >= 1.3 and r["qos1"]["supervisor_lost"] == 0,
        "qos0": r["qos0"]["ratio"] >= 1.3,
        "latency": lat["p99_ratio"] <= 1.5 and lat["supervisor"]["p99_ms"] < 5.0,
        **{f"cpu_{key}": cpu["ratio"] <= 1.2 for key, cpu in r["cpu"].items()},
        "idle": r["idle"]["ratio"] <= 2.0,
        "memory": r["memory"]["ratio"] <= 0.6,
        "worker_back": rec["worker_kill_to_first_message_ms"] <= 20.0,
        "broker_back": rec["broker_back_max_ms"] <= 50.0,
    }


def print_table(r: dict[str, Any]) -> None:
    lat, mem, rec = r["latency"], r["memory"], r["recovery"]

    def flow(q: dict[str, Any], side: str) -> str:
        return f"{q[f'{side}_msg_s']} msg/s, lost {q[f'{side}_lost']}"

    def ms(d: dict[str, float]) -> str:
        return f"{d['p50_ms']} / {d['p99_ms']} / {d['max_ms']} ms"

    met = {key: "yes" if ok else "NO" for key, ok in r["targets_met"].items()}
    rows = [
        (
            "routed QoS 1 throughput",
            flow(r["qos1"], "supervisor"),
            flow(r["qos1"], "baseline"),
            f"{r['qos1']['ratio']}x",
            ">= 1.3x, lost 0",
            met["qos1"],
        ),
        (
            "routed QoS 0 throughput",
            flow(r["qos0"], "supervisor"),
            flow(r["qos0"], "baseline"),
            f"{r['qos0']['ratio']}x",
            ">= 1.3x",
            met["qos0"],
        ),
        (
            f"latency p50 / p99 / max at {LATENCY_RATE}/s",
            ms(lat["supervisor"]),
            ms(lat["baseline"]),
            f"p99 {lat['p99_ratio']}x",
            "p99 <= 1.5x and < 5 ms",
            met["latency"],
        ),
        *[
            (
                f"CPU per message, QoS {key[3]} at {key.split('_')[1]}/s",
                f"{cpu['supervisor_us']} us",
                f"{cpu['baseline_us']} us",
                f"{cpu['ratio']}x",
                "<= 1.2x",
                met[f"cpu_{key}"],
            )
            for key, cpu in r["cpu"].items()
        ],
        (
            "idle CPU, one service",
            f"{r['idle']['supervisor_ms_per_s']} ms/s",
            f"{r['idle']['baseline_ms_per_s']} ms/s",
            f"{r['idle']['ratio']}x",
            "<= 2x",
            met["idle"],
        ),
        (
            "memory, 4 idle services (PSS)",
            f"{mem['total_mib']} MiB",
            f"{mem['baseline_total_mib']} MiB (4 processes)",
            f"{mem['ratio']}x",
            "<= 0.6x",
            met["memory"],
        ),
        (
            "idle CPU, the 4 shipped workers",
            f"{mem['idle_ms_per_s']} ms/s",
            f"{mem['baseline_idle_ms_per_s']} ms/s (4 processes)",
            "",
            "",
            "",
        ),
        (
            "kill -9 worker -> first message",
            f"{rec['worker_kill_to_first_message_ms']} ms",
            "",
            "",
            "<= 20 ms",
            met["worker_back"],
        ),
        (
            f"broker back -> flowing, outages {', '.join(f'{o:g}' for o in rec['broker_outages_s'])} s",
            f"median {rec['broker_back_to_flowing_ms']}, max {rec['broker_back_max_ms']} ms",
            "",
            "",
            "<= 50 ms",
            met["broker_back"],
        ),
    ]
    for count in (1, 4, 16):
        f = r["fanout"][f"workers_{count}"]
        rows.append(
            (
                f"fan-out to {count} worker(s), QoS 0",
                f"each to one: {f['each_to_one_msg_s']}/s; to all: {f['each_to_all_deliveries_s']} deliveries/s",
                "",
                "",
                "",
                "",
            )
        )
    header = ("measure", "supervisor (+ its workers)", "baseline: plain paho client", "ratio", "target", "met")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print(f"\nmake bench, {r['date']}, {r['machine']}, {r['seconds']} s")
    load_us = {key: cpu["load_generator_us"] for key, cpu in r["cpu"].items()}
    print(f"load generator (rawmqtt, one thread) CPU per message: {load_us} us")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print(
        f"memory: supervisor {mem['supervisor_mib']} MiB, forkserver and resource tracker {mem['helpers_mib']} MiB, "
        f"workers {mem['worker_mib']} MiB; baseline processes {mem['baseline_process_mib']} MiB"
    )
    flood = r["flood"]
    print(
        f"QoS 0 flood of {flood['messages']} messages at a worker handling 500/s (max_queued 1000): "
        f"{flood['handled']} handled, {flood['dropped']} dropped and counted; supervisor RSS "
        f"{flood['rss_before_mib']} -> peak {flood['rss_peak_mib']} MiB (+{flood['growth_mib']})"
    )


if __name__ == "__main__":
    main()
