"""The loop's timers: aligned ones run on the clock's multiples of their period plus the loop's phase, or from the
multiple on in a wake-up that comes anyway (I/O); others at their time, never before. The clock is injected; the
I/O is a real socket pair."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from supervisor.loop import Loop


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Awake = tuple[Loop, Clock, socket.socket, list[object]]


@pytest.fixture
def awake() -> Iterator[Awake]:
    """A loop (phase 50 ms) that notes what it reads from a socket, the clock at 101 s, and the socket to write to."""
    a, b = socket.socketpair()
    clock = Clock(101.0)
    loop = Loop(clock=clock, phase=0.05)
    ran: list[object] = []
    loop.add_reader(b, lambda: ran.append(f"read {b.recv(100).decode()}"))
    yield loop, clock, a, ran
    a.close()
    b.close()


def test_an_aligned_timer_runs_on_the_next_multiple_plus_the_phase() -> None:
    clock = Clock(101.0)
    loop = Loop(clock=clock, phase=0.05)
    ran: list[float] = []
    loop.call_later(5.0, lambda: ran.append(clock.now), aligned=True)
    assert loop.next_due() == pytest.approx(105.05)
    clock.now = 104.99
    loop.run_once(max_wait=0)  # a wake-up before its multiple
    assert ran == []
    clock.now = 105.05  # when the loop wakes for it, if nothing else comes
    loop.run_once(max_wait=0)
    assert ran == [105.05]


def periodic(loop: Loop, clock: Clock, ran: list[float], period: float) -> None:
    ran.append(clock.now)
    loop.call_later(period, lambda: periodic(loop, clock, ran, period), aligned=True)


@pytest.mark.parametrize("late", [0.0, 0.0003, 0.05, 0.2])
def test_a_periodic_task_runs_once_per_period_however_late_in_it_the_loop_wakes(late: float) -> None:
    clock = Clock(100.0)
    loop = Loop(clock=clock, phase=0.05)
    ran: list[float] = []
    loop.call_later(5.0, lambda: periodic(loop, clock, ran, 5.0), aligned=True)
    for multiple in (105.0, 110.0, 115.0, 120.0):
        clock.now = multiple + late
        loop.run_once(max_wait=0)
        loop.run_once(max_wait=0)  # a second wake-up in the same period runs nothing
    assert ran == pytest.approx([105.0 + late, 110.0 + late, 115.0 + late, 120.0 + late])


def test_an_aligned_timer_runs_early_in_an_io_wakeup_after_its_multiple(awake: Awake) -> None:
    loop, clock, a, ran = awake
    loop.call_later(5.0, lambda: ran.append("periodic"), aligned=True)
    clock.now = 104.99
    a.send(b"before")
    loop.run_once(max_wait=1)
    assert ran == ["read before"]  # before the multiple: not yet
    clock.now = 105.001
    a.send(b"heartbeat")
    loop.run_once(max_wait=1)
    assert ran == ["read before", "read heartbeat", "periodic"]  # one wake-up for both


def test_a_timer_that_is_not_aligned_never_runs_early(awake: Awake) -> None:
    loop, clock, a, ran = awake
    loop.call_later(4.0, lambda: ran.append("timer"))
    clock.now = 104.99
    a.send(b"x")
    loop.run_once(max_wait=1)
    assert ran == ["read x"]
    clock.now = 105.0
    loop.run_once(max_wait=0)
    assert ran == ["read x", "timer"]


def test_without_a_phase_an_aligned_timer_runs_on_the_multiple() -> None:
    clock = Clock(101.0)
    loop = Loop(clock=clock)
    ran: list[float] = []
    loop.call_later(2.5, lambda: ran.append(clock.now), aligned=True)
    assert loop.next_due() == 102.5
    clock.now = 102.5
    loop.run_once(max_wait=0)
    assert ran == [102.5]


def test_an_aligned_timer_that_ran_early_comes_back_at_the_next_multiple(awake: Awake) -> None:
    loop, clock, a, ran = awake
    clock.now = 100.0
    times: list[float] = []
    loop.call_later(5.0, lambda: periodic(loop, clock, times, 5.0), aligned=True)
    clock.now = 105.001
    a.send(b"heartbeat")
    loop.run_once(max_wait=1)
    assert ran == ["read heartbeat"]
    assert times == [105.001]
    assert loop.next_due() == pytest.approx(110.05)


def test_a_timer_that_sets_itself_again_early_runs_once_per_wakeup() -> None:
    # What the liveness check does while a stuck worker's deadline comes near: run early, find nothing yet, set again.
    clock = Clock(100.0)
    loop = Loop(clock=clock)
    ran: list[float] = []

    def check() -> None:
        ran.append(clock.now)
        loop.call_at(110.0, check, earliest=109.5)

    loop.call_at(110.0, check, earliest=109.5)
    clock.now = 109.4
    loop.run_once(max_wait=0)
    assert ran == []
    clock.now = 109.6
    loop.run_once(max_wait=0)
    assert ran == [109.6]
    clock.now = 109.7
    loop.run_once(max_wait=0)
    assert ran == [109.6, 109.7]
