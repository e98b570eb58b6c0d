"""The supervisor's exception types. Each keeps its facts as attributes so callers can label metrics with them."""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of the supervisor's own errors."""


class ConfigError(SupervisorError):
    """Raised when the config file, an environment override or a worker module cannot be used as given.

    The message is one line: the source (file or environment variable), the dotted key, what was expected and
    what was found. The CLI prints it and exits with status 2.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


class WrongPackageError(SupervisorError):
    """Raised when the import name `supervisor` resolves to another project (PyPI's supervisord owns that name)."""

    def __init__(self, found_at: str) -> None:
        self.found_at = found_at
        super().__init__(
            f"the import name 'supervisor' resolves to another project at {found_at}, not mqtt-home-supervisor; "
            "PyPI's `supervisor` package (supervisord) uses the same name: run this from its own virtual "
            "environment (`make run` creates one) or `pip uninstall supervisor` there"
        )


class StartupError(SupervisorError):
    """Raised when the supervisor cannot start on this host as configured: its message is one line naming the
    cause and the path (a state directory it cannot write, an outbox it cannot use, a port it cannot listen on).
    The CLI prints it and exits with status 1."""


class OutboxInUseError(StartupError):
    """Raised when another process holds the outbox: two supervisors were given one state directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"the outbox {path} is in use by another process (a second supervisor with the same state_dir?); "
            "give each supervisor its own [supervisor] state_dir"
        )


class StateBrokenError(SupervisorError):
    """Raised when the supervisor can no longer keep its promises (its outbox cannot be written): the loop stops and
    the supervisor exits with status 1, so the service manager starts it afresh."""


class ChannelClosed(SupervisorError):
    """Raised when the other end of a worker's channel cannot be written to, or sent a frame this end cannot read."""


class ControlError(SupervisorError):
    """Raised when a control request cannot be carried out; its message is the reply's `error`."""
