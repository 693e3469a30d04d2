"""The driver contract.

A driver plugin is a module (or object) with `@hookimpl` functions. llmd's built-in drivers
register exactly like third-party ones: through the `llmd.drivers` entry point group, e.g.

    [project.entry-points."llmd.drivers"]
    my-engine = "my_package.llmd_driver"

where `my_package/llmd_driver.py` defines

    from llmd.drivers.hookspecs import hookimpl

    @hookimpl
    def llmd_drivers():
        return [MyEngineDriver()]

and `MyEngineDriver` follows `llmd.drivers.base.Driver`: a `name` (the `engine` value profiles
use), a `default_command` argv prefix, and `launch(request) -> LaunchSpec`, which turns a
profile plus a placement into the argv, env and readiness probe for a given host and port.
"""

from __future__ import annotations

import pluggy

PROJECT = "llmd"
ENTRY_POINT_GROUP = "llmd.drivers"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def llmd_drivers() -> list:  # list[llmd.drivers.base.Driver]
    """Return the engine drivers this plugin provides.

    Called once at startup. Each driver's `name` must be unique across all plugins; a later
    plugin naming an engine already taken is rejected with a logged error, so a third-party
    package cannot silently replace a built-in driver.
    """
