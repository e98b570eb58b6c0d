"""Data and interfaces shared by the supervisor and the workers.

Nothing here runs anything: `envelopes` holds the Structs that cross the pipe between the supervisor and a worker
process, `worker` holds the `Worker` base class, the `Context` protocol a worker talks to, and `Subscription`.
Workers import only this package.
"""

from contracts.envelopes import (
    ErrorReported,
    Handled,
    Heartbeat,
    Inbound,
    Message,
    Outbound,
    Publish,
    Started,
    Stop,
)
from contracts.worker import Context, NoConfig, Subscription, Timer, Worker

__all__ = [
    "Context",
    "ErrorReported",
    "Handled",
    "Heartbeat",
    "Inbound",
    "Message",
    "NoConfig",
    "Outbound",
    "Publish",
    "Started",
    "Stop",
    "Subscription",
    "Timer",
    "Worker",
]
