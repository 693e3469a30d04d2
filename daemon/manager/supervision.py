"""Watching ready engines: an exit is seen at once (pidfd), a hang through a health probe; a
crashed engine is restarted with backoff until it has failed too often in a row."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

from llmd.daemon.engines.supervisor import EngineProcess, http_ok
from llmd.daemon.manager.state import ENGINE_HOST, MAX_ATTEMPTS, Instance, State, backoff_seconds, close_client

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

log = logging.getLogger(__name__)

# How long a model must stay up for earlier failures to be forgiven.
STABLE_SECONDS = 60.0
# An idle engine is probed this often; this many failed probes in a row mark it hung.
HEALTH_INTERVAL = 1.0
HEALTH_TIMEOUT = 0.45
HEALTH_FAILURES = 2
# Before probing again after a failed probe. An engine that dies closes its port a moment before
# it can be reaped: the pause lets the exit be reported as one, not as a hang.
HEALTH_RETRY_PAUSE = 0.05
# A busy engine may answer its probe slowly; it still must answer, or its requests would hang.
BUSY_HEALTH_TIMEOUT = 5.0


class Supervision:
    """Watches the manager's ready engines and restarts crashed ones."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def watch(self, inst: Instance, engine: EngineProcess) -> None:
        """Watch a ready engine until it stops: an exit is seen at once (pidfd), a hang within
        about HEALTH_INTERVAL × HEALTH_FAILURES + HEALTH_TIMEOUT while idle."""
        manager = self.manager
        hung: list[str] = []
        async with anyio.create_task_group() as tg:

            async def exited() -> None:
                await engine.wait_exit()
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            tg.start_soon(self._probe_health, inst, engine, hung)
        if inst.engine is not engine or inst.state not in (State.READY, State.SLEEPING):
            return  # an ordinary stop, or a wake that will see the engine gone
        code = engine.returncode
        tail = "\n".join(engine.log_tail())
        what = hung[0] if hung else f"exited unexpectedly with code {code}"
        if inst.state is State.SLEEPING:
            # Nobody was using it: no restart, the next request starts it afresh.
            log.warning("%s died while parked (%s)", inst.name, what)
            manager.begin_stop(inst)
            await manager.finish_stop(inst, "it died while parked")
            return
        inst.state = State.STOPPING
        await close_client(inst)
        with anyio.CancelScope(shield=True):
            await engine.stop(grace=1.0)  # the leader is gone or hung: nothing it forked may stay
        manager.clear(inst, State.FAILED)
        inst.error = f"engine {what}. Last lines of {engine.log_path}:\n{tail}"
        log.error("%s: %s", inst.name, inst.error)
        self._after_crash(inst, engine)

    def _after_crash(self, inst: Instance, engine: EngineProcess) -> None:
        """Restart with backoff, unless it keeps failing."""
        if time.monotonic() - engine.started_monotonic > STABLE_SECONDS:
            inst.failures = 0  # it ran fine for a while: this is a new problem, not a crash loop
        inst.failures += 1
        if inst.failures >= MAX_ATTEMPTS:
            log.error("%s failed %d times in a row; not restarting it on its own", inst.name, inst.failures)
            return
        delay = backoff_seconds(inst.failures)
        log.info("restarting %s in %.0fs (attempt %d of %d)", inst.name, delay, inst.failures + 1, MAX_ATTEMPTS)
        self.manager.loader.begin_load(inst, delay)

    async def _probe_health(self, inst: Instance, engine: EngineProcess, hung: list[str]) -> None:
        assert inst.spec is not None
        url = f"http://{ENGINE_HOST}:{engine.port}{inst.spec.readiness.path}"
        failed = 0
        while True:
            if not failed:
                with anyio.move_on_after(HEALTH_INTERVAL):
                    await inst.probe_now.wait()
            else:  # after a failed probe, probe again almost at once
                await anyio.sleep(HEALTH_RETRY_PAUSE)
            if inst.probe_now.is_set():
                inst.probe_now = anyio.Event()
            if inst.state is State.SLEEPING:
                continue  # asleep or falling asleep: an exit is still seen at once, through the pidfd
            # Busy, or waking up (still parked): it may answer slowly, but it must answer.
            timeout = BUSY_HEALTH_TIMEOUT if inst.in_flight or inst.parked is not None else HEALTH_TIMEOUT
            ok = await http_ok(engine.port, inst.spec.readiness.path, timeout)
            if not ok and engine.returncode is not None:
                return  # it exited: the exit watcher reports that, with its code
            failed = 0 if ok else failed + 1
            if failed >= HEALTH_FAILURES:
                hung.append(f"stopped answering its health probe ({url})")
                log.error("%s (pid %d) stopped answering %s; killing it", inst.name, engine.pid, url)
                await engine.stop(grace=0.1)  # a hung process will not act on SIGTERM
                return
