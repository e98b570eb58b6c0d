"""Publications: what workers publish, delivered to the other local subscribers and to the broker.

QoS 0 goes straight out (best effort). QoS >= 1 is stored in the outbox first and stays there until the broker has
confirmed it and every local subscriber has handled it (see `supervisor.delivery`); what a previous run left there
is delivered again at start-up. Under MQTT 3.1.1 (no No Local) a publication that also goes to the broker comes
back from it, and local subscribers get it from there instead.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from contracts import Message, Publish, Site
from contracts.topics import publish_topic_problem
from supervisor.config import Settings
from supervisor.delivery import Deliveries
from supervisor.mqtt import MqttLink
from supervisor.outbox import Outbox
from supervisor.router import Router

log = logging.getLogger("supervisor")

Offer = Callable[[str, Message], None]  # hand a message to the named worker (exactly one `done` follows)


class Publisher:
    """Delivers publications; owns the outbox."""

    def __init__(
        self,
        settings: Settings,
        site: Site,
        router: Router,
        link: MqttLink,
        deliveries: Deliveries,
        offer: Offer,
        ids: Iterator[int],
    ) -> None:
        self.settings = settings
        self.site = site
        self.router = router
        self.link = link
        self.deliveries = deliveries
        self.offer = offer
        self.ids = ids
        self.outbox: Outbox | None = None
        self._confirming: dict[int, int] = {}  # packet id of a publication to the broker -> its message id
        self._local_first = settings.mqtt.protocol == 5

    def open(self) -> None:
        """Open the outbox (and take its lock: one supervisor per state directory)."""
        sync = self.settings.supervisor.outbox_sync.upper()
        self.outbox = Outbox(self.settings.state_dir / "outbox.sqlite3", sync)

    def replay(self) -> None:
        """Deliver again what a previous run stored and had not finished delivering."""
        assert self.outbox is not None
        pending = self.outbox.pending()
        if pending:
            log.info("replaying %d publication(s) left in the outbox by the previous run", len(pending))
        for row, source, publication, publication_id in pending:
            receivers = self._local_receivers(source, publication)
            parts = len(receivers) + (0 if publication.local_only else 1)
            if parts == 0:
                self.outbox.remove(row)  # nobody left to take it
                continue
            message_id = next(self.ids)
            self.deliveries.expect_outbound(message_id, row, parts)
            self._deliver(message_id, receivers, publication, publication_id or self.link.new_publication_id())

    def publish(self, source: str, publication: Publish) -> bool:
        """Deliver what worker `source` published; False when its topic cannot be published to (refused, logged,
        never stored: a broker drops the connection of a client that publishes to such a topic)."""
        problem = publish_topic_problem(publication.topic)
        if problem is None and not publication.local_only:
            problem = self.link.size_problem(publication.topic, publication.payload)
        if problem is not None:
            log.warning("refused a publication of %s: %s", source, problem)
            return False
        if publication.qos > 0:
            self._publish_durably(source, publication)
            return True
        receivers = self._local_receivers(source, publication)
        publication_id = self.link.new_publication_id()
        if receivers:
            message = Message(
                id=next(self.ids), topic=publication.topic, payload=publication.payload, publication_id=publication_id
            )
            for name in receivers:
                self.offer(name, message)
        if not publication.local_only:
            self._send(publication, publication_id)
        return True

    def dead_letter(self, worker: str, message: Message, last_exit: str | None) -> None:
        """Publish `message`, which kept killing `worker`, on `<base>/dead_letter`, durably."""
        log.error(
            "worker %s died %d times handling message %d on %s; sent to the dead-letter topic",
            worker,
            message.crashes,
            message.id,
            message.topic,
        )
        try:
            text, encoded = message.payload.decode(), None
        except UnicodeDecodeError:
            text, encoded = None, base64.b64encode(message.payload).decode()
        record = {
            "worker": worker,
            "host": self.site.host,  # several supervisors may run this worker (`share_group`)
            "supervisor": self.site.node_id,
            "topic": message.topic,
            "payload": text,
            "payload_base64": encoded,
            "attempts": message.attempt,
            "crashes": message.crashes,
            "last_exit": last_exit,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        topic = self.site.dead_letter_topic
        self._publish_durably("supervisor", Publish(topic=topic, payload=json.dumps(record).encode(), qos=1))

    def confirmed(self, mid: int, failure: str | None) -> None:
        """The broker confirmed (or refused) publication `mid`."""
        message_id = self._confirming.pop(mid, None)
        if message_id is None:
            return  # a QoS 0 publication, or one of the link's own (birth, will)
        if failure is not None:
            row = self.deliveries.row_of(message_id)
            if row is not None and self.outbox is not None:
                self.outbox.quarantine(row, failure)
            log.warning("the broker refused publication %d: %s; kept aside in the outbox's quarantine", mid, failure)
        self.deliveries.done(message_id)

    def forget(self, row: int) -> None:
        """Nobody waits for outbox row `row` any more."""
        assert self.outbox is not None
        self.outbox.remove(row)

    def commit(self) -> None:
        """Make this wake-up's publications durable (before any of their bytes leave)."""
        assert self.outbox is not None
        self.outbox.commit()

    def tidy(self) -> None:
        """The outbox's housekeeping, which nothing waits for (after this wake-up's bytes have left)."""
        assert self.outbox is not None
        self.outbox.tidy()

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()

    @property
    def backlog(self) -> int:
        return self.outbox.backlog if self.outbox is not None else 0

    def _publish_durably(self, source: str, publication: Publish) -> None:
        assert self.outbox is not None
        receivers = self._local_receivers(source, publication)
        parts = len(receivers) + (0 if publication.local_only else 1)
        if parts == 0:
            return
        message_id = next(self.ids)
        publication_id = self.link.new_publication_id()
        self.deliveries.expect_outbound(message_id, self.outbox.add(source, publication, publication_id), parts)
        self._deliver(message_id, receivers, publication, publication_id)

    def _deliver(self, message_id: int, receivers: list[str], publication: Publish, publication_id: str) -> None:
        if receivers:
            message = Message(
                id=message_id,
                topic=publication.topic,
                payload=publication.payload,
                qos=publication.qos,
                publication_id=publication_id,
            )
            for name in receivers:
                self.offer(name, message)
        if not publication.local_only:
            mid = self._send(publication, publication_id)
            if mid is None:
                self.deliveries.done(message_id)  # refused by paho outright: counted as a publish error
            else:
                self._confirming[mid] = message_id

    def _local_receivers(self, source: str, publication: Publish) -> list[str]:
        """Workers (other than the publisher) that get `publication` straight from the supervisor."""
        if publication.local_only:
            return [name for name in self.router.workers(publication.topic) if name != source]
        if not self._local_first:
            return []
        return [name for name in self.router.locally(publication.topic) if name != source]

    def _send(self, publication: Publish, publication_id: str) -> int | None:
        expiry = publication.expiry
        if expiry is None and not publication.retain:
            expiry = self.settings.mqtt.message_expiry_seconds
        p = publication
        return self.link.publish(p.topic, p.payload, p.qos, p.retain, expiry, publication_id=publication_id)
