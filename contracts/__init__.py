"""Data and interfaces shared by the supervisor and the workers.

Nothing here runs anything: `envelopes` holds the Structs that cross the pipe between the supervisor and a worker
process, `worker` holds the `Worker` base class, the `Context` protocol a worker talks to, and `Subscription`;
`homeassistant` the typed entity declarations, `status` the status document, `ai` the ai_analyzer's requests and
replies, `topics` MQTT topic-filter matching, `state` atomic writes of a worker's state files.
Workers import only this package.
"""

from contracts.envelopes import (
    EntitiesDeclared,
    ErrorReported,
    Handled,
    Heartbeat,
    Inbound,
    LimitReached,
    Logged,
    LogLine,
    Message,
    Outbound,
    Publish,
    Started,
    StartFailed,
    StatusReported,
    Stop,
    Subscribe,
)
from contracts.status import Trigger, WorkerFacts
from contracts.worker import RESTART_COMMAND, Command, Context, NoConfig, Site, Subscription, Timer, Worker

__all__ = [
    "RESTART_COMMAND",
    "Command",
    "Context",
    "EntitiesDeclared",
    "ErrorReported",
    "Handled",
    "Heartbeat",
    "Inbound",
    "LimitReached",
    "LogLine",
    "Logged",
    "Message",
    "NoConfig",
    "Outbound",
    "Publish",
    "Site",
    "StartFailed",
    "Started",
    "StatusReported",
    "Stop",
    "Subscribe",
    "Subscription",
    "Timer",
    "Trigger",
    "Worker",
    "WorkerFacts",
]
