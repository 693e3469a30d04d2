"""Watching ready engines: an exit is seen at once (pidfd), a hang through a health probe; a
crashed engine is restarted with backoff until it has failed too often in a row."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

from llmd.daemon.engines.liveness import activity
from llmd.daemon.engines.supervisor import EngineProcess, ProbeNotMade, http_ok, process_tree
from llmd.daemon.manager.hang import HangWatch, Progress
from llmd.daemon.manager.state import ENGINE_HOST, MAX_ATTEMPTS, Instance, State, backoff_seconds, close_client

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

log = logging.getLogger(__name__)

# How long a model must stay up for earlier failures to be forgiven.
STABLE_SECONDS = 60.0
# A ready engine is probed this often. A probe unanswered within HEALTH_TIMEOUT is a failure,
# but failures alone do not make an engine hung: see `hang` for what does.
HEALTH_INTERVAL = 1.0
HEALTH_TIMEOUT = 1.5
# Before probing again after a failed probe.
HEALTH_RETRY_PAUSE = 0.5


class Supervision:
    """Watches the manager's ready engines and restarts crashed ones."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    async def watch(self, inst: Instance, engine: EngineProcess) -> None:
        """Watch a ready engine until it stops: an exit is seen at once (pidfd), a hang (a
        stopped or stuck process, see `hang`) within about HEALTH_INTERVAL + HEALTH_WINDOW +
        HEALTH_TIMEOUT."""
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
        # An engine whose RPC device went away dies with it: say which one.
        what = await manager.remote_devices.explain_exit(inst, what)
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
        watch = HangWatch()
        unprobed = False  # the last probe could not be made
        while True:
            if not watch.failures:
                with anyio.move_on_after(HEALTH_INTERVAL):
                    await inst.probe_now.wait()
            else:  # failing: probe again soon, to tell a hang from a late answer
                await anyio.sleep(HEALTH_RETRY_PAUSE)
            if inst.probe_now.is_set():
                inst.probe_now = anyio.Event()
            if inst.state is State.SLEEPING:
                watch.answered()  # not probed while asleep: the count starts over when it wakes
                continue  # asleep or falling asleep: an exit is still seen at once, through the pidfd
            sent_at = time.monotonic()
            try:
                ok = await http_ok(engine.port, inst.spec.readiness.path, HEALTH_TIMEOUT)
            except ProbeNotMade as exc:
                # llmd itself is short of descriptors (a flood of client connections, say): no sign
                # of a hung engine, and killing it would only make things worse.
                if not unprobed:
                    log.warning("%s: %s; not counted against the engine", inst.name, exc)
                unprobed = True
                continue
            if unprobed:
                log.info("%s: its health probe can be made again", inst.name)
                unprobed = False
            if ok:
                watch.answered()
                continue
            if engine.returncode is not None:
                return  # it exited: the exit watcher reports that, with its code
            # Busy, or waking up (still parked): it may be slow to answer, but not forever.
            busy = bool(inst.in_flight) or inst.parked is not None
            reason = watch.unanswered(sent_at, _progress(inst, engine), busy)
            if reason is not None:
                hung.append(f"was hung: {reason} ({url})")
                log.error("%s (pid %d) is hung: %s; killing it", inst.name, engine.pid, reason)
                await engine.stop(grace=0.1)  # a hung process will not act on SIGTERM
                return
            if watch.failures == 1:
                log.info("%s (pid %d) did not answer its health probe within %.1fs; watching it", inst.name,
                         engine.pid, HEALTH_TIMEOUT)


def _progress(inst: Instance, engine: EngineProcess) -> Progress:
    """What the engine has done so far: its processes' CPU time and state, and the bytes its
    proxied requests have received from it."""
    processes = activity(process_tree(engine.pid))
    received = inst.client.received if inst.client is not None else 0
    return Progress(time.monotonic(), processes.cpu_seconds, processes.stopped, received)
