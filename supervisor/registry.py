"""Worker discovery: finds every `Worker` subclass in the worker packages, with no list to edit."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from contracts import Worker
from supervisor.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def discover(
    packages: Sequence[str], broken: dict[str, str] | None = None, kept: dict[str, str] | None = None
) -> dict[str, type[Worker]]:  # type: ignore[type-arg]
    """Import every module of each package in `packages` and return its workers by name.

    Modules whose name starts with `_` are skipped. A module that fails to import, has no worker, or has a worker
    without a valid `name`, docstring or strict `Config` is an error (ConfigError); given `broken`, it is recorded
    there instead (module name -> the error, one line) and skipped, so that one half-written file stops nothing
    else. Two workers with one name are always an error.

    Given `kept` (a reload), a module whose file changed since it was imported is imported again; when its new
    version is broken, the error is recorded in `kept` instead and the version imported before stays in use.
    """
    found: dict[str, type[Worker]] = {}  # type: ignore[type-arg]
    for package_name in packages:
        for cls in _workers_in_package(package_name, broken, kept):
            other = found.get(cls.name)
            if other is not None and other is not cls:
                raise ConfigError(
                    "workers",
                    cls.name,
                    f"two workers share this name: {_where(other)} and {_where(cls)}; rename one",
                )
            found[cls.name] = cls
    return dict(sorted(found.items()))


def _workers_in_package(
    package_name: str, broken: dict[str, str] | None, kept: dict[str, str] | None
) -> list[type[Worker]]:  # type: ignore[type-arg]
    try:
        package = importlib.import_module(package_name)
    except ImportError as exc:
        raise ConfigError("supervisor.worker_packages", package_name, f"cannot import the package: {exc}") from exc
    paths = getattr(package, "__path__", None)
    if paths is None:
        raise ConfigError("supervisor.worker_packages", package_name, "expected a package (a directory), got a module")
    workers = []
    for info in sorted(pkgutil.iter_modules(paths), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module_name = f"{package_name}.{info.name}"
        try:
            workers += _workers_in_module(module_name, again=kept is not None)
        except ConfigError as exc:
            finder_path = getattr(info.module_finder, "path", "")
            path = Path(finder_path) / (info.name if info.ispkg else f"{info.name}.py")
            loaded_before = sys.modules.get(module_name)
            if kept is not None and loaded_before is not None and module_name in _good:
                kept[module_name] = f"{path}: {exc.problem}"
                workers += _workers_of(loaded_before)
            elif broken is not None:
                broken[module_name] = f"{path}: {exc.problem}"
            else:
                raise
    return workers


# Worker module -> the modification time (ns) of its file when the version in sys.modules was imported here; and
# when it was first imported here (what a forkserver, started with the supervisor, preloaded).
_loaded: dict[str, int] = {}
_first_loaded: dict[str, int] = {}
_good: set[str] = set()  # the worker modules whose version in sys.modules holds valid workers


def loaded_mtime(module_name: str, first: bool = False) -> int | None:
    """When the file of worker module `module_name` was last modified before this process imported it (None when
    unknown), or (`first`) before it first did: a worker process that finds it newer runs the module as it is now
    (see `worker_process`)."""
    return (_first_loaded if first else _loaded).get(module_name)


def source_mtime(module: object) -> int | None:
    """The modification time (ns) of `module`'s source file now, or None."""
    path = getattr(module, "__file__", None)
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def forget_bytecode(module: object) -> None:
    """Remove `module`'s cached bytecode, which Python would take for the source when the file was saved again
    within the same second at the same size."""
    path = getattr(module, "__file__", None)
    if path:
        with contextlib.suppress(OSError, ValueError):
            os.unlink(importlib.util.cache_from_source(path))


def changed_on_disk(module_name: str) -> bool:
    """True when worker module `module_name` was imported here and its file changed since (one stat)."""
    module = sys.modules.get(module_name)
    return module is not None and module_name in _loaded and source_mtime(module) != _loaded[module_name]


def _workers_in_module(module_name: str, again: bool) -> list[type[Worker]]:  # type: ignore[type-arg]
    """The workers of module `module_name`, imported now, or `again` when its file changed since it was. Raises
    ConfigError, leaving the version imported before (if any) in place."""
    before = sys.modules.get(module_name) if again and changed_on_disk(module_name) else None
    before_mtime = _loaded.get(module_name)
    if before is not None:
        del sys.modules[module_name]  # a fresh module object: the running workers' classes keep their old globals
        forget_bytecode(before)
    try:
        try:
            module = importlib.import_module(module_name)
        except (Exception, SystemExit) as exc:  # any error in a dropped-in module is that module's fault
            raise ConfigError(module_name, "", f"cannot import worker module: {type(exc).__name__}: {exc}") from exc
        mtime = source_mtime(module)
        if mtime is not None:  # imported: a change on disk is looked at again, even when it holds no valid worker
            _loaded[module_name] = mtime
            _first_loaded.setdefault(module_name, mtime)
        workers = _workers_of(module)
    except ConfigError:
        if before is not None:  # the version imported before stays, as good or bad as it was
            sys.modules[module_name] = before
            if before_mtime is not None:
                _loaded[module_name] = before_mtime
        else:
            _good.discard(module_name)
        raise
    _good.add(module_name)
    return workers


def _workers_of(module: object) -> list[type[Worker]]:  # type: ignore[type-arg]
    module_name = getattr(module, "__name__", "")
    workers = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, Worker) and cls is not Worker and cls.__module__ == module_name:
            _check_worker_class(cls)
            workers.append(cls)
    if not workers:
        raise ConfigError(module_name, "", "no contracts.Worker subclass in this module (name it _<name> to hide it)")
    return workers


def _check_worker_class(cls: type[Worker]) -> None:  # type: ignore[type-arg]
    name = getattr(cls, "name", None)
    where = _where(cls)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(where, "name", f"expected a lower-case identifier like 'scraper', got {name!r}")
    if name == "supervisor":
        raise ConfigError(where, "name", "'supervisor' is the supervisor's own name; pick another")
    if not (cls.__doc__ or "").strip():
        raise ConfigError(where, "", "a worker needs a docstring saying what it consumes, produces and touches")
    config_cls = cls.Config
    struct_config = getattr(config_cls, "__struct_config__", None)
    if struct_config is None or not struct_config.forbid_unknown_fields:
        raise ConfigError(
            where,
            "Config",
            "expected a msgspec.Struct with forbid_unknown_fields=True, so typos in config fail",
        )


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
