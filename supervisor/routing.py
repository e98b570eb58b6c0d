"""Routing: each message from the broker to the workers (and the control API) it is for.

A message goes to every worker whose topic filter matches it, found by the `Router`; with MQTT 5 subscription
identifiers (sent only while two filters overlap: they cost paho a properties parse per message) the broker says
which filters each copy is for. Bad input is counted against the worker it was meant for and dropped: a payload
over `[mqtt] max_payload_bytes`, a retained message on a command topic, a message from the broker on a local-only
topic. A restart press (`<base>/cmd/<worker>/restart`) arrives through the worker's command filter and goes to the
control API instead. QoS >= 1 is acknowledged to the broker once every receiver is done with it (`Deliveries`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping

import msgspec

from contracts import Message, Site, Subscription
from supervisor import control
from supervisor.config import Settings, WorkerSettings
from supervisor.control import ControlAPI
from supervisor.dedupe import Deduplicator
from supervisor.delivery import Deliveries
from supervisor.errors import ConfigError
from supervisor.mqtt import Incoming, MqttLink
from supervisor.router import InvalidTopicFilter, Router, covers, matches
from supervisor.slot import Offer, WorkerSlot

log = logging.getLogger("supervisor")


def worker_subscriptions(settings: WorkerSettings, site: Site) -> list[Subscription]:
    """The subscriptions of the worker described by `settings`, validated, with its command topic (its buttons);
    raises ConfigError."""
    try:
        worker = settings.worker_class()
        worker.config = settings.config
        worker.site = site
        subscriptions = worker.subscriptions()
    except Exception as exc:  # a worker's bug, found at start: said as what it is
        raise ConfigError(f"worker {settings.name}", "subscriptions()", f"{type(exc).__name__}: {exc}") from None
    for subscription in subscriptions:
        try:
            Router().add(settings.name, [subscription.topic_filter])
        except InvalidTopicFilter as exc:
            raise ConfigError(f"worker {settings.name}", "subscriptions()", str(exc)) from None
        if subscription.qos not in (0, 1, 2):
            raise ConfigError(
                f"worker {settings.name}",
                "subscriptions()",
                f"expected qos 0, 1 or 2, got {subscription.qos}",
            )
    group = settings.share_group
    if group is not None:  # this worker's input is shared with the same worker on other supervisors
        subscriptions = [
            s
            if s.commands or s.local or s.topic_filter.startswith("$share/")
            else msgspec.structs.replace(s, topic_filter=f"$share/{group}/{s.topic_filter}")
            for s in subscriptions
        ]
    return [*subscriptions, Subscription(site.command_topic(settings.name, "+"), qos=1, commands=True)]


class Routing:
    """Routes what the broker sends to the workers' slots; also takes what workers publish to each other."""

    def __init__(
        self,
        settings: Settings,
        site: Site,
        link: MqttLink,
        router: Router,
        slots: Mapping[str, WorkerSlot],
        deliveries: Deliveries,
        control_api: ControlAPI,
        ids: Iterator[int],
        clock: Callable[[], float],
    ) -> None:
        """Route to every worker in `slots` the topic filters it subscribes to, and subscribe the link to them all;
        raises ConfigError for a worker's invalid subscription. `ids` numbers messages (shared with the publisher's
        local deliveries)."""
        self.settings = settings
        self.site = site
        self.link = link
        self.router = router
        self.slots = slots
        self.deliveries = deliveries
        self.control = control_api
        self.ids = ids
        self.clock = clock
        self.dedupe: Deduplicator | None = None  # set once opened, when a worker deduplicates
        self.stopping = False
        # Broker filter -> the workers its retained messages are for, after it was subscribed again while connected
        # for a worker new to it (the others had them already); a filter not here: every worker it routes to.
        self._retained_for: dict[str, set[str]] = {}
        self._subscribed: set[str] = set()  # the filters the link was last given
        self.reroute(remove=[], add=[slot.settings for slot in slots.values()])
        self.router.add(control.NAME, control_api.filters, qos=1, commands=True)
        self._resubscribe()

    def reroute(self, remove: list[str], add: list[WorkerSettings]) -> None:
        """Route nothing more to the workers named in `remove`, then route to each worker in `add` what it
        subscribes to (a reload: a worker changed is in both), and give the link the subscriptions that needs, in
        one go: a filter both before and after stays subscribed throughout. Raises ConfigError for an invalid
        subscription, before changing anything."""
        subscriptions = [(worker.name, worker_subscriptions(worker, self.site)) for worker in add]
        had = {name: self.router.filters_of(name) for name in remove}
        for name in remove:
            self.router.remove(name)
        new = [
            (name, s.topic_filter)
            for name, its in subscriptions
            for s in its
            if not s.local and s.topic_filter not in had.get(name, set())
        ]
        for name, its in subscriptions:
            for s in its:
                self.router.add(name, [s.topic_filter], s.qos, commands=s.commands, local=s.local)
        self._resubscribe(new)

    def link_connected(self) -> None:
        """The link (re)connected and subscribed to every filter: retained messages are for every worker again."""
        self._retained_for.clear()

    def _resubscribe(self, new: Iterable[tuple[str, str]] = ()) -> None:
        """Give the link the subscriptions the routes need now (it sends only what changed). Under MQTT 5 they
        carry subscription ids while two filters overlap; under 3.1.1 a filter another covers is left out.

        `new`: (worker, filter) routed now that the worker did not have: the worker must get the filter's retained
        messages, which the others on it had. The broker filter that takes it is subscribed again for them if it was
        there before (under MQTT 5 the others' are not asked again), and its retained messages go to those workers
        only from then on (under 3.1.1 without subscription ids, the others on another filter matching a retained
        topic may get a copy again)."""
        with_ids = self.settings.mqtt.protocol == 5 and self.router.overlapping()
        filters = self.router.broker_filters(with_ids=with_ids)
        again = set()
        for worker, topic_filter in new:
            for broker_filter, _, _ in filters:
                if broker_filter == topic_filter or covers(broker_filter, topic_filter):
                    self._retained_for.setdefault(broker_filter, set()).add(worker)
                    if broker_filter in self._subscribed:
                        again.add(broker_filter)
        for broker_filter in [f for f in self._retained_for if f not in {f for f, _, _ in filters}]:
            del self._retained_for[broker_filter]
        self._subscribed = {f for f, _, _ in filters}
        self.link.subscribe(filters, with_ids, frozenset(again) if self.link.connected else frozenset())

    def message_received(self, message: Incoming) -> None:
        """Route a message from the broker. QoS >= 1 is acknowledged once every receiver has finished it."""
        if self.stopping:
            return  # not acknowledged: the broker sends it again after the restart
        receivers = self._receivers(message)
        pressed = self.site.restart_pressed(message.topic)
        if pressed in receivers:  # a restart press comes through the worker's command filter; it is ours
            receivers.remove(pressed)
            receivers.append(control.NAME)
        if control.NAME in receivers:
            receivers.remove(control.NAME)
            self._for_the_supervisor(message)
        message_id = next(self.ids)
        if message.qos > 0:
            self.deliveries.expect_inbound(message_id, message.mid, message.qos, len(receivers))
        if not receivers:
            return
        routed = Message(
            id=message_id,
            topic=message.topic,
            payload=message.payload,
            qos=message.qos,
            retain=message.retain,
            response_topic=message.response_topic,
            correlation_data=message.correlation_data,
            publication_id=message.publication_id,
        )
        for name in receivers:
            self.offer(name, routed)

    def offer(self, name: str, message: Message) -> None:
        """Hand `message` to worker `name` (or to the supervisor's control API, when a worker sent a request); one
        `done` follows for it, unless the supervisor is stopping. A copy of a publication that a deduplicating
        worker has handled (or holds) already is dropped and counted instead."""
        if name == control.NAME:
            self.control.handle(message)
            self.deliveries.done(message.id)
            return
        slot = self.slots.get(name)
        if slot is None:  # removed by a reload that came in the same wake-up (a control request) as this message
            self.done(name, message, handled=False)
            return
        dedupe = self.dedupe if message.publication_id is not None else None
        if dedupe is not None and dedupe.deduplicates(name):
            assert message.publication_id is not None
            if not dedupe.admit(name, message.publication_id):
                slot.duplicates += 1
                log.debug("dropped a copy of publication %s for worker %s", message.publication_id, name)
                self.deliveries.done(message.id)
                return
        if slot.offer(message, self.clock()) in (Offer.REFUSED, Offer.DROPPED):
            self.done(name, message, handled=False)

    def done(self, name: str, message: Message, handled: bool) -> None:
        """Worker `name` is done with `message`: it handled it, or (not `handled`) it never will."""
        self.deliveries.done(message.id)
        if message.publication_id is not None and self.dedupe is not None and self.dedupe.deduplicates(name):
            self.dedupe.finished(name, message.publication_id, handled)

    def subscribe(self, worker: str, topic_filter: str, qos: int) -> None:
        """Route `topic_filter` to `worker` too (a worker's own subscription, made while it runs)."""
        if not self.router.routes_to(worker, topic_filter):
            self.router.add(worker, [topic_filter], qos)
            log.info("worker %s subscribed to %s", worker, topic_filter)
            self._resubscribe(new=[(worker, topic_filter)])

    def _for_the_supervisor(self, message: Incoming) -> None:
        """A message for the supervisor itself: a control request or a restart button press."""
        request = Message(
            id=0,
            topic=message.topic,
            payload=message.payload,
            response_topic=message.response_topic,
            correlation_data=message.correlation_data,
        )
        self.control.handle(request)

    def _receivers(self, message: Incoming) -> list[str]:
        """The workers `message` goes to: bad input is counted against each worker it was meant for, and dropped."""
        routes = self.router.route(message.topic)
        if message.subscription_ids:  # this copy is for these subscriptions only; other copies cover the rest
            routes = tuple((worker, sub_id) for worker, sub_id in routes if sub_id in message.subscription_ids)
        if message.retain and self._retained_for:
            routes = self._retained_routes(message.topic, routes)
        commands = self.site.commands_prefix
        receivers = []
        for worker, sub_id in routes:
            if self.router.is_local(worker, sub_id):
                log.warning("dropped a message from the broker on %s: it is local to the supervisor", message.topic)
            elif len(message.payload) > self.settings.mqtt.max_payload_bytes:
                self._bad_input(worker, "oversized", message.topic, f"{len(message.payload)} bytes")
            elif message.retain and self.router.is_command(worker, sub_id):
                self._bad_input(worker, "retained_command", message.topic, "a retained message on a command topic")
            elif not message.payload and message.topic.startswith(commands):
                # Clearing a retained button press (`mosquitto_pub -r -n`) reaches live subscribers as an empty
                # message without the retain flag: not a press, and not an error either.
                log.info("ignored an empty message on command topic %s (a retained press being cleared)", message.topic)
            else:
                receivers.append(worker)
        return receivers

    def _retained_routes(self, topic: str, routes: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
        """The routes a retained message on `topic` takes: sent again for the workers new to a filter, it is theirs."""
        wanted = [workers for f, workers in self._retained_for.items() if matches(f, topic)]
        if not wanted:
            return routes
        return tuple((worker, sub_id) for worker, sub_id in routes if any(worker in w for w in wanted))

    def _bad_input(self, worker: str, kind: str, topic: str, detail: str) -> None:
        if worker in self.slots:
            self.slots[worker].errors[kind] += 1
        log.warning("dropped a message on %s for worker %s: %s", topic, worker, detail)
