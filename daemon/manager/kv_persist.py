"""Prompt caches that survive a stop (`[policy] persist_kv`): the engine's slots are saved
before every planned stop and restored at the next start, before the model is reported ready.

A long conversation then costs its prefill once: after an unload, an eviction, a `--replace`,
a restart for a changed profile or a restart of llmd itself, the next turn finds its prompt
cached. The files and their validity are `KvStore`'s (`llmd.daemon.engines.kv_store`); this
module talks to the engine, through the routes its driver's `KvPersistence` names.

Saving is bounded by the profile's `kv_save_timeout`, so that an eviction never waits long for
it: a slot whose save the last measured speed says would not fit in the time left is skipped,
and whatever is still running at the deadline is abandoned. Restoring checks each file's size
and digest first; a file that fails that check, or that the engine refuses, is dropped with a
warning and never served. Should restoring still make the engine exit, the loader starts it
again without that file (see `Loader._start_engine`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from llmd.drivers.base import Driver, KvPersistence, persists_kv

from llmd.daemon.engines.kv_store import KvStore, SavedSlot, file_sha256, launch_key
from llmd.daemon.engines.supervisor import EngineProcess
from llmd.daemon.errors import LlmdError
from llmd.daemon.manager.state import ENGINE_HOST, Instance
from llmd.daemon.models.profiles import Profile

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

log = logging.getLogger(__name__)

GIB = 1024**3
# How long the engine may take to list its slots before a stop saves them all blindly.
LIST_TIMEOUT = 2.0
# After a restore request failed: how long to wait for the engine's exit to show, if it died.
EXIT_SHOWS_SECONDS = 2.0
# Fields of a llama-server slot listing that tell how many tokens the slot holds.
_TOKEN_FIELDS = ("n_prompt_tokens", "n_past", "n_ctx_used")


@dataclass(frozen=True)
class SaveSpeed:
    """The last save measured for a model: what predicts whether the next one fits in time."""

    bytes_per_second: float
    bytes_per_token: float

    def seconds_for(self, tokens: int) -> float:
        return tokens * self.bytes_per_token / self.bytes_per_second


class KvPersist:
    """Saves and restores the manager's engines' prompt caches; owned by the Manager."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.store = KvStore(manager.config.server.state_dir / "kv")
        self._speed: dict[str, SaveSpeed] = {}
        # Tokens restored into each model's current engine, for `ps`.
        self._restored: dict[str, int] = {}
        # (tokens, bytes) saved per model, read from the manifests when first asked for.
        self._totals: dict[str, tuple[int, int]] | None = None

    # ----- reports -----

    def saved(self, model: str) -> tuple[int, int]:
        """(tokens, bytes) of the model's saved prompt cache on disk; (0, 0) when none."""
        if self._totals is None:
            self._totals = self.store.totals()
        return self._totals.get(model, (0, 0))

    def restored_tokens(self, model: str) -> int:
        """Tokens restored into the model's current engine when it started."""
        return self._restored.get(model, 0)

    # ----- before a launch -----

    def launch_dir(self, profile: Profile, driver: Driver, model_path: Path, command: list[str], ctx: int) -> Path | None:
        """Where the engine for this launch keeps its saved prompt cache, or None when the
        profile does not ask for it. Saves of earlier launches with other settings are deleted."""
        self._restored.pop(profile.name, None)
        if not profile.policy.persist_kv:
            freed = self.store.remove_model(profile.name)
            if freed:
                self._totals = None
                log.info("%s: deleted %.1f MB of saved prompt cache: its profile no longer sets persist_kv",
                         profile.name, freed / 1e6)
            return None
        if not persists_kv(driver):  # profiles are checked when loaded: a driver changed since
            raise LlmdError(f"{profile.name!r}: the {driver.name} engine cannot save and restore its prompt cache; "
                            "remove [policy] persist_kv from its profile")
        launch = profile.launch
        key = launch_key(
            engine=driver.name, command=command, model_path=model_path, ctx=ctx, slots=launch.parallel,
            cache_type=launch.cache_type, extra_args=launch.extra_args,
        )
        directory, invalidated = self.store.prepare(profile.name, key)
        if invalidated:
            self._totals = None
            log.warning("%s: dropped %.1f MB of saved prompt cache: its model file, engine or launch settings changed",
                        profile.name, invalidated / 1e6)
        return directory

    # ----- after the engine is ready -----

    async def restore(self, inst: Instance, engine: EngineProcess) -> bool:
        """Load the saved slots into the engine that just became ready. False when restoring
        made the engine exit (the file that did it is dropped); True otherwise, whatever was
        restored."""
        kv = inst.spec.kv if inst.spec is not None else None
        if kv is None:
            return True
        saved, bad = self.store.saved(kv.directory)
        for slot, problem in bad:
            self._dropped(inst.name, slot, problem)
        if not saved:
            return True
        inst.progress = "restoring the saved prompt cache"
        timeout = self.manager.config.server.ready_timeout
        async with _engine_client(engine, timeout) as client:
            for slot in saved:
                problem = await anyio.to_thread.run_sync(KvStore.verify, kv.directory, slot)
                if problem is None and slot.slot >= kv.slots:
                    problem = f"it is for slot {slot.slot}, and the engine has {kv.slots}"
                if problem is not None:
                    self.store.drop(kv.directory, slot.slot)
                    self._dropped(inst.name, slot, problem)
                    continue
                began = time.monotonic()
                reply, problem, answered = await _post(client, kv.restore_path.format(slot=slot.slot), slot.file)
                if problem is not None:
                    self.store.drop(kv.directory, slot.slot)
                    self._dropped(inst.name, slot, f"the engine could not restore it: {problem}")
                    if not answered and await _exited(engine):
                        return False
                    continue
                seconds = time.monotonic() - began
                tokens = _int(reply.get("n_restored"), slot.tokens)
                self.store.touch(kv.directory, slot.slot)
                self._restored[inst.name] = self._restored.get(inst.name, 0) + tokens
                self.manager.metrics.kv_restored(inst.name, tokens, slot.bytes, seconds)
                log.info("%s: restored %d tokens of a saved conversation into slot %d (%.1f MB in %.0f ms)",
                         inst.name, tokens, slot.slot, slot.bytes / 1e6, seconds * 1000)
        return True

    def _dropped(self, model: str, slot: SavedSlot, problem: str) -> None:
        self._totals = None
        self.manager.metrics.kv_not_restored(model, "dropped")
        log.warning("%s: dropped the saved prompt cache of slot %d (%s): %s", model, slot.slot, slot.file, problem)

    # ----- before a planned stop -----

    async def save(self, inst: Instance, engine: EngineProcess) -> None:
        """Save every slot of the engine that holds a prompt, within the profile's
        kv_save_timeout; then keep the saves on disk under `[server] kv_max_gib`. Never raises:
        a save that fails is logged, and the stop goes on."""
        kv = inst.spec.kv if inst.spec is not None else None
        if kv is None or inst.parked is not None or engine.returncode is not None:
            return
        limit = inst.profile.policy.kv_save_timeout_seconds
        deadline = time.monotonic() + limit
        # Shielded, so that a stop on the way out (llmd shutting down) still saves; bounded, so
        # that it never holds that stop, or an eviction, for longer than the limit.
        with anyio.CancelScope(shield=True), anyio.move_on_after(limit) as scope:
            async with _engine_client(engine, limit) as client:
                for slot, tokens in (await _slots_holding_prompts(client, kv)).items():
                    speed = self._speed.get(inst.name)
                    if speed is not None and tokens and speed.seconds_for(tokens) > deadline - time.monotonic():
                        self.manager.metrics.kv_not_saved(inst.name, "skipped")
                        log.warning("%s: not saving slot %d (%d tokens): at the last save's speed it would take "
                                    "longer than kv_save_timeout (%s)", inst.name, slot, tokens, inst.profile.policy.kv_save_timeout)
                        continue
                    await self._save_slot(inst, client, kv, slot)
        if scope.cancelled_caught:
            self.manager.metrics.kv_not_saved(inst.name, "skipped")
            log.warning("%s: saving the prompt cache took longer than kv_save_timeout (%s); the rest is not saved",
                        inst.name, inst.profile.policy.kv_save_timeout)
        self._totals = None
        for dropped in self.store.enforce_cap(int(self.manager.config.server.kv_max_gib * GIB)):
            log.info("dropped the saved prompt cache of %s slot %d (%.1f MB), the least recently used, "
                     "to stay within [server] kv_max_gib = %g", dropped.model, dropped.slot, dropped.bytes / 1e6,
                     self.manager.config.server.kv_max_gib)

    async def _save_slot(self, inst: Instance, client: httpx.AsyncClient, kv: KvPersistence, slot: int) -> None:
        name = self.store.new_file_name(slot)
        path = kv.directory / name
        began = time.monotonic()
        try:
            reply, problem, _ = await _post(client, kv.save_path.format(slot=slot), name)
            if problem is not None:
                self.manager.metrics.kv_not_saved(inst.name, "failed")
                log.warning("%s: could not save slot %d: %s", inst.name, slot, problem)
                path.unlink(missing_ok=True)
                return
            tokens = _int(reply.get("n_saved"), 0)
            if not tokens or not path.is_file():
                path.unlink(missing_ok=True)  # an empty slot: its earlier save, if any, stays
                return
            size = path.stat().st_size
            digest = await anyio.to_thread.run_sync(file_sha256, path)
        except BaseException:
            path.unlink(missing_ok=True)  # cut short by the deadline: the engine may still write it
            raise
        seconds = time.monotonic() - began
        now = time.time()
        self.store.record(kv.directory, SavedSlot(slot, name, size, digest, tokens, saved_at=now, used_at=now))
        self._speed[inst.name] = SaveSpeed(size / max(seconds, 1e-3), size / tokens)
        self.manager.metrics.kv_saved(inst.name, tokens, size, seconds)
        log.info("%s: saved %d tokens of slot %d (%.1f MB in %.0f ms)", inst.name, tokens, slot, size / 1e6, seconds * 1000)


def _engine_client(engine: EngineProcess, timeout: float) -> httpx.AsyncClient:
    # Not on the request path: a one-off client, as for sleep and wake.
    return httpx.AsyncClient(base_url=f"http://{ENGINE_HOST}:{engine.port}", trust_env=False, timeout=timeout)


async def _post(client: httpx.AsyncClient, path: str, file_name: str) -> tuple[dict[str, Any], str | None, bool]:
    """POST a save or restore of `file_name`: (the engine's JSON reply, None, True) on success,
    else ({}, what went wrong, whether the engine answered at all)."""
    try:
        response = await client.post(path, json={"filename": file_name})
    except httpx.HTTPError as exc:
        return {}, f"POST {path} failed: {exc!r}", False
    if not response.is_success:
        return {}, f"POST {path} answered {response.status_code}: {response.text[:200]}", True
    try:
        reply = response.json()
    except ValueError:
        reply = None
    return (reply if isinstance(reply, dict) else {}), None, True


async def _slots_holding_prompts(client: httpx.AsyncClient, kv: KvPersistence) -> dict[int, int | None]:
    """The engine's slots that hold a prompt, with its token count where the engine says it.
    When the engine cannot list them, every slot (an empty one saves nothing)."""
    every: dict[int, int | None] = {slot: None for slot in range(kv.slots)}
    if kv.slots_path is None:
        return every
    try:
        response = await client.get(kv.slots_path, timeout=LIST_TIMEOUT)
        listing = response.json() if response.is_success else None
    except (httpx.HTTPError, ValueError):
        listing = None
    if not isinstance(listing, list):
        return every
    held: dict[int, int | None] = {}
    for entry in listing:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or entry["id"] not in every:
            continue
        tokens = _held_tokens(entry)
        # A slot that never ran a task lists no task id and no token count: nothing to save.
        if tokens or (tokens is None and "id_task" in entry):
            held[entry["id"]] = tokens
    return held


def _held_tokens(entry: dict[str, Any]) -> int | None:
    for field in _TOKEN_FIELDS:
        value = entry.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    tokens = entry.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


async def _exited(engine: EngineProcess) -> bool:
    """Whether the engine has exited, waiting a moment for an exit under way to show."""
    with anyio.move_on_after(EXIT_SHOWS_SECONDS):
        await engine.wait_exit()
    return engine.returncode is not None
