"""Delivery bookkeeping: which messages are still owed to someone, and what to do once nobody waits for them.

Two kinds of message are tracked by id:
- inbound QoS >= 1 messages from the broker, acknowledged once every worker they were routed to has finished them.
  MQTT wants acknowledgements in the order the messages arrived, so a finished message waits for all earlier ones.
  A message from an earlier connection is never acknowledged on a later one: its packet id means nothing there,
  and the broker sends it again anyway (the session is persistent);
- outbound QoS >= 1 publications of workers, removed from the outbox once the broker has confirmed them and every
  local subscriber has handled them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Inbound:
    remaining: int
    mid: int
    qos: int
    connection: int


class Deliveries:
    """Counts, per message id, the receivers it still waits for."""

    def __init__(self, acknowledge: Callable[[int, int], None], forget: Callable[[int], None]) -> None:
        self._acknowledge = acknowledge  # (mid, qos): send the broker its acknowledgement
        self._forget = forget  # (outbox row): nobody waits for this publication any more
        self._inbound: OrderedDict[int, _Inbound] = OrderedDict()
        self._outbound: dict[int, list[int]] = {}  # message id -> [remaining, outbox row]
        self._connection = 0

    def expect_inbound(self, message_id: int, mid: int, qos: int, receivers: int) -> None:
        """An inbound message was routed to `receivers` workers (0: it is finished already)."""
        self._inbound[message_id] = _Inbound(receivers, mid, qos, self._connection)

    def expect_outbound(self, message_id: int, row: int, parts: int) -> None:
        """A stored publication waits for `parts` confirmations (the broker's and each local subscriber's)."""
        self._outbound[message_id] = [parts, row]

    def done(self, message_id: int) -> None:
        """One receiver (a worker, or the broker for a publication) has finished message `message_id`."""
        inbound = self._inbound.get(message_id)
        if inbound is not None:
            inbound.remaining -= 1
            return
        outbound = self._outbound.get(message_id)
        if outbound is not None:
            outbound[0] -= 1
            if outbound[0] <= 0:
                del self._outbound[message_id]
                self._forget(outbound[1])

    def row_of(self, message_id: int) -> int | None:
        """The outbox row of publication `message_id`, while it is owed to someone."""
        outbound = self._outbound.get(message_id)
        return outbound[1] if outbound is not None else None

    def connection_lost(self) -> None:
        """Acknowledgements owed on the connection that just ended will never be sent."""
        self._connection += 1

    def release(self) -> None:
        """Acknowledge, in arrival order, every finished inbound message not held back by an unfinished one."""
        inbound = self._inbound
        while inbound:
            message_id, head = next(iter(inbound.items()))
            if head.remaining > 0:
                return
            del inbound[message_id]
            if head.connection == self._connection:
                self._acknowledge(head.mid, head.qos)

    @property
    def unacknowledged(self) -> int:
        return len(self._inbound)
