"""When the status document is checked: at once after I/O, at most once a second, and never on a wake-up of its own
for I/O that changed nothing (an idle worker's heartbeat). The loop's clock is injected; the link records."""

from __future__ import annotations

from contracts import Site
from supervisor.loop import Loop
from supervisor.status import StatusReporter

INTERVAL = 60.0


class RecordingLink:
    """The status's view of the MQTT link: what it publishes, by topic."""

    def __init__(self) -> None:
        self.connected = True
        self.reconnects = 0
        self.publish_errors = 0
        self.published: list[str] = []

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, expiry: int | None = None
    ) -> None:
        self.published.append(topic)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def started() -> tuple[StatusReporter, Loop, RecordingLink, Clock]:
    """A reporter whose first status is out and whose check is parked (a second without change), at t0 + 2 s."""
    clock = Clock()
    loop = Loop(clock=clock)
    link = RecordingLink()
    site = Site(base_topic="home/sup", node_id="box")
    reporter = StatusReporter(loop, link, {}, site, "1.0", lambda: 0, INTERVAL)
    reporter.start()
    for _ in range(2):
        clock.now += 1.0
        loop.run_once(max_wait=0)
    assert statuses(link) == 1
    return reporter, loop, link, clock


def statuses(link: RecordingLink) -> int:
    return link.published.count("home/sup/status")


def wakeup_with_io(loop: Loop, reporter: StatusReporter) -> None:
    """What the core does for a wake-up that read something: the loop counted it, then the end of the wake-up."""
    loop.io_wakeups += 1
    reporter.touch()


def test_an_unchanged_status_parks_its_check_until_the_interval() -> None:
    _, loop, _, _ = started()
    assert loop.next_due() == 1001.0 + INTERVAL  # the first check published at t0 + 1; nothing due before the interval


def test_a_heartbeat_wakeup_that_changes_nothing_schedules_no_wakeup_of_its_own() -> None:
    reporter, loop, link, clock = started()
    clock.now += 3.0
    wakeup_with_io(loop, reporter)  # a heartbeat: checked in this wake-up, found unchanged
    assert loop.next_due() == 1001.0 + INTERVAL
    assert statuses(link) == 1


def change_after_a_quiet_while(reporter: StatusReporter, loop: Loop, link: RecordingLink, clock: Clock) -> None:
    """Three seconds after the last check, a wake-up whose I/O changed the status (a reconnect); published at once."""
    clock.now += 3.0
    link.reconnects += 1
    wakeup_with_io(loop, reporter)
    assert statuses(link) == 2


def test_a_change_after_a_quiet_while_is_published_in_the_wakeup_that_brought_it() -> None:
    reporter, loop, link, clock = started()
    change_after_a_quiet_while(reporter, loop, link, clock)
    clock.now += 1.0
    loop.run_once(max_wait=0)  # a second on: unchanged, parked again
    assert loop.next_due() == clock.now - 1.0 + INTERVAL


def test_changes_are_published_at_most_once_a_second() -> None:
    reporter, loop, link, clock = started()
    change_after_a_quiet_while(reporter, loop, link, clock)
    clock.now += 0.25
    link.reconnects += 1
    wakeup_with_io(loop, reporter)
    assert statuses(link) == 2  # within the second: it waits for the next check
    assert loop.next_due() == clock.now - 0.25 + 1.0
    clock.now += 0.75
    loop.run_once(max_wait=0)
    assert statuses(link) == 3


def test_the_interval_publishes_an_unchanged_status() -> None:
    _, loop, link, clock = started()
    clock.now = 1001.0 + INTERVAL
    loop.run_once(max_wait=0)
    assert statuses(link) == 2
