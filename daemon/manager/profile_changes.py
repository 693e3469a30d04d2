"""What an edited profile means for its model's engine: nothing, a change llmd applies in place,
or a restart.

Only what reaches the engine needs a restart: its command line and environment, which the
driver builds from the profile's engine, model, `[launch]` and `[placement]`. The policy llmd
reads each time it uses it (the idle TTL, priority, pinning, the request queue) and the profile's
description never reach the engine. Aliases usually do not either: the proxy sends every request
to the engine under the profile's name. Some drivers pass them on all the same (vLLM's
`--served-model-name`, so that the engine's own /v1/models lists them): whether an alias change
needs a restart is decided by building the engine's command line again with the new aliases.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

from llmd.drivers.base import Driver, LaunchRequest, LaunchSpec

from llmd.daemon.models.profiles import Profile

log = logging.getLogger(__name__)

# `[policy]` keys llmd reads when it uses them (never passed to an engine). A key not listed
# here (persist_kv: it decides where the engine keeps its prompt cache) restarts the engine.
LIVE_POLICY = frozenset({"ttl", "pinned", "priority", "autostart", "max_concurrency", "max_queue", "kv_save_timeout"})
# Top-level keys that never reach an engine.
LIVE_KEYS = frozenset({"description"})


class Change(StrEnum):
    NONE = "none"
    IN_PLACE = "in place"
    RESTART = "restart"


def engine_settings(profile: Profile) -> dict[str, Any]:
    """The part of `profile` a change to which restarts the engine (aliases aside)."""
    data = profile.model_dump()
    for key in (*LIVE_KEYS, "aliases"):
        data.pop(key, None)
    data["policy"] = {key: value for key, value in data["policy"].items() if key not in LIVE_POLICY}
    return data


def classify(old: Profile, new: Profile, aliases_reach_engine: Callable[[Sequence[str]], bool]) -> Change:
    """What changing `old` to `new` takes; `aliases_reach_engine(new_aliases)` says whether the
    running engine would be started differently with the new aliases."""
    if old.model_dump() == new.model_dump():
        return Change.NONE
    if engine_settings(old) != engine_settings(new):
        return Change.RESTART
    if list(old.aliases) != list(new.aliases) and aliases_reach_engine(new.aliases):
        return Change.RESTART
    return Change.IN_PLACE


def aliases_reach_engine(driver: Driver, request: LaunchRequest | None, spec: LaunchSpec | None, aliases: Sequence[str]) -> bool:
    """Whether `driver` would start the engine it started for `request` (as `spec`) with another
    command line or environment if the profile had `aliases`. Without the launch to compare
    with, or if the driver fails on it, the answer is yes: a restart is always safe."""
    if request is None or spec is None:
        return True
    profile = request.profile
    if not isinstance(profile, Profile):
        return True
    renamed = profile.model_copy(update={"aliases": list(aliases)})
    renamed.name = profile.name
    try:
        relaunched = driver.launch(dataclasses.replace(request, profile=renamed))
    except Exception:  # noqa: BLE001 - a third-party driver may fail any way: restart then
        log.warning("%s: cannot tell whether its engine sees its aliases; restarting it", profile.name, exc_info=True)
        return True
    return relaunched.argv != spec.argv or relaunched.env != spec.env
