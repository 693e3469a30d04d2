"""Discover drivers: built-ins first, then the `llmd.drivers` entry point group.

A broken third-party plugin is logged and skipped; it never stops the daemon.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from . import hookspecs
from .base import Driver

log = logging.getLogger(__name__)


def _builtin_plugins() -> dict[str, ModuleType]:
    from . import fastllm, llama_cpp, vllm

    return {"llama-cpp": llama_cpp, "fastllm": fastllm, "vllm": vllm}


def load_drivers(extra_plugins: list[object] | None = None) -> dict[str, Driver]:
    """All drivers by engine name. `extra_plugins` lets tests register a plugin object directly."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    for name, module in _builtin_plugins().items():
        manager.register(module, name=name)
    for entry in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if manager.get_plugin(entry.name) is not None:
            continue
        try:
            manager.register(entry.load(), name=entry.name)
        except Exception as exc:  # a third-party import error must not take the daemon down
            log.error("driver plugin %r (%s) failed to load: %s", entry.name, entry.value, exc)
    for plugin in extra_plugins or []:
        manager.register(plugin)

    drivers: dict[str, Driver] = {}
    # pluggy calls the last registered plugin first; reverse so built-ins win name clashes.
    for provided in reversed(manager.hook.llmd_drivers()):
        for driver in provided:
            if driver.name in drivers:
                log.error("driver %r is provided twice; keeping the first one", driver.name)
                continue
            drivers[driver.name] = driver
    return drivers
