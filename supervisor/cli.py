"""The command line: `python -m supervisor --config PATH [--check-config] [--version] [--log-level LEVEL]`, and
`python -m supervisor --config PATH ctl ACTION [WORKER]` to ask the running supervisor (`supervisor.ctl`).

Exit codes: 0 clean stop (or a valid config with --check-config), 2 bad command line or config, 1 fatal error at
run time (for ctl, see `supervisor.ctl`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import ModuleType

import supervisor
from supervisor.errors import ConfigError, StartupError, WrongPackageError

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2
_DISTRIBUTION = "mqtt-home-supervisor"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        check_package_identity(supervisor)
    except WrongPackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from supervisor import config, secrets  # after the identity check: another `supervisor` has no such module
    from supervisor.core import Supervisor
    from supervisor.worker_process import name_process

    environ = dict(os.environ) | secrets.take_handover(os.environ)
    if args.command == "ctl":
        from supervisor import ctl

        try:
            settings = config.load(args.config, environ, connection_only=True)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return ctl.run(settings, args.action, args.worker, args.timeout, args.lines)
    try:
        # Running, a worker whose module is broken is failed and the others run; --check-config fails on it.
        settings = config.load(args.config, environ, strict=args.check_config)
        if argv is None and not args.check_config:  # no secret may stay in the environment block workers inherit
            secrets.reexec_without(settings.secret_variables, dict(os.environ))
        supervisor_ = Supervisor(settings)  # validates every worker's subscriptions too
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for error in settings.broken_modules.values():  # reported and skipped: they stop nothing else
        logging.getLogger("supervisor").warning("skipped a worker module that cannot be used: %s", error)
    if args.check_config:
        enabled = ", ".join(w.name for w in settings.workers) or "none"
        found = ", ".join(settings.available_workers) or "none"
        print(f"{args.config}: OK; workers enabled: {enabled}; workers found: {found}")
        return EXIT_OK
    name_process("mqtt-supervisor")  # in top; the workers name themselves after their worker
    try:
        return supervisor_.run()
    except StartupError as exc:  # the host cannot give what start-up needs: one line, nothing left running
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except Exception:  # policy: anything unexpected at run time is fatal, reported once with its traceback
        logging.getLogger("supervisor").critical("fatal error", exc_info=True)
        return EXIT_FATAL


def check_package_identity(module: ModuleType) -> None:
    """Raise WrongPackageError unless `module` (what `import supervisor` gave) is this project's package."""
    if getattr(module, "__distribution__", None) != _DISTRIBUTION:
        raise WrongPackageError(str(getattr(module, "__file__", None) or getattr(module, "__path__", "?")))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor",
        description="Run home-automation workers behind one MQTT connection.",
    )
    parser.add_argument("--config", required=True, metavar="PATH", help="the TOML config file")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config and every enabled worker's section, then exit",
    )
    parser.add_argument(
        "--version", action="version", version=f"{_DISTRIBUTION} {getattr(supervisor, '__version__', '?')}"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="log level (default INFO)",
    )
    commands = parser.add_subparsers(dest="command", metavar="ctl")
    ctl = commands.add_parser(
        "ctl", help="ask the running supervisor (status, restart, stop, start, reload, republish, tail)"
    )
    ctl.add_argument("action", choices=["status", "restart", "stop", "start", "reload", "republish", "tail"])
    ctl.add_argument("worker", nargs="?", help="the worker, for restart, stop, start and tail")
    ctl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    ctl.add_argument("--lines", type=int, default=None, help="tail: stop after this many lines (default: Ctrl-C)")
    return parser
