"""Engine processes: spawn in their own process group, wait for readiness, stop the whole group.

Each engine runs in a new session (so it leads its own process group) with PR_SET_PDEATHSIG,
so the kernel kills it if llmd dies. Stopping signals the group, not the pid: engines such as
vLLM fork workers that would otherwise outlive their parent and keep holding memory.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from llmd.drivers.base import LaunchSpec

from llmd.daemon.util import loopback
from llmd.daemon.util.log_tail import read_tail
from llmd.daemon.errors import EngineStartError
from llmd.daemon.engines.reaper import Reaper, reaper_for
from llmd.daemon.engines.engine_env import engine_environment
from llmd.daemon.util.redact import mask_argv
from llmd.daemon.util.rotating_log import LogLimits, RotatingLog, copy_into

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# libc's prctl, looked up once here in the parent. The child runs `_die_with_parent` between
# fork and exec, where loading a library (dlopen, malloc) can deadlock on a lock another
# thread of the parent held at the fork; there it only makes the call.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int
# And sched_setaffinity, for the same reason: the child confines itself to its cores with a mask
# the parent built (os.sched_setaffinity would allocate one between fork and exec).
_sched_setaffinity = ctypes.CDLL(None, use_errno=True).sched_setaffinity
_sched_setaffinity.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p)
_sched_setaffinity.restype = ctypes.c_int

# Readiness is probed this often: fast enough that llmd adds next to nothing to a cold start.
READY_POLL_SECONDS = 0.01
# How often an engine's exit is looked for when no pidfd can be opened (out of descriptors).
EXIT_POLL_SECONDS = 0.1
# Errors of this side's own making: no descriptor, buffer, memory or local port for a probe.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})
LOG_TAIL_LINES = 20


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _cpu_set(cores: tuple[int, ...]) -> ctypes.Array[ctypes.c_ulong]:
    """A cpu_set_t holding `cores`, at least the C library's 1024 bits."""
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    words = (ctypes.c_ulong * max(1024 // bits, max(cores) // bits + 1))()
    for core in cores:
        words[core // bits] |= 1 << (core % bits)
    return words


def _child_setup(cpu_cores: tuple[int, ...]) -> Callable[[], None]:
    """What the child runs between fork and exec: die with llmd, and when the placement gave
    the engine cores of its own, run on those only (its threads inherit the set). Everything
    it needs is built here, in the parent."""
    if not cpu_cores:
        return _die_with_parent
    mask = _cpu_set(cpu_cores)
    size = ctypes.sizeof(mask)

    def setup() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _sched_setaffinity(0, size, mask)  # a core gone offline since: the engine runs unconfined

    return setup


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port that a bind just proved free, and that no engine of ours holds."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if not taken or port not in taken:
            return port
    raise OSError("no free port found")


def tail_lines(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a log (none for 0), reading only its end; [] if there is no log."""
    try:
        data, _ = read_tail(path, lines)
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()


class ProbeNotMade(Exception):
    """llmd could not make a probe (out of descriptors, say): it says nothing about the engine."""


async def http_ok(port: int, path: str, timeout: float) -> bool:
    """GET `path` on a fresh loopback connection, closed right after: True on a 200; ProbeNotMade
    when this side could not even try (`_LOCAL_ERRNOS`).

    A probe never leaves an idle keep-alive connection behind: llama-server takes about 100 ms
    longer to exit on SIGTERM while a client holds one. Plain sockets also keep the probe cheap
    enough to run every second per engine, and every 10 ms while one loads.

    An answer that arrived by the deadline counts even when the event loop gets to it later: on
    a saturated machine the daemon, not the engine, may be the one that is late.
    """
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    deadline = anyio.current_time() + timeout
    head = b""
    try:
        with anyio.fail_after(timeout):
            sock = await loopback.connect("127.0.0.1", port)
        with sock:
            with anyio.move_on_at(deadline):
                await loop.sock_sendall(sock, request)
                while b"\r\n" not in head and len(head) < 256:
                    data = await loop.sock_recv(sock, 256)
                    if not data:
                        return False
                    head += data
            if b"\r\n" not in head:
                head += _waiting_bytes(sock)
    except OSError as exc:
        if exc.errno in _LOCAL_ERRNOS:
            raise ProbeNotMade(f"cannot probe 127.0.0.1:{port}: {exc.strerror or exc}") from None
        return False
    except TimeoutError:
        return False
    status = head.split(b"\r\n", 1)[0].split(b" ")
    return len(status) >= 2 and status[1] == b"200"


def _waiting_bytes(sock: socket.socket) -> bytes:
    """What the (non-blocking) socket has received and nobody has read yet, without waiting."""
    try:
        return sock.recv(256)
    except BlockingIOError:
        return b""


async def _ready(port: int, path: str) -> bool:
    """Whether a starting engine answers its readiness probe; not yet, while none can be made."""
    try:
        return await http_ok(port, path, timeout=2.0)
    except ProbeNotMade:
        await anyio.sleep(EXIT_POLL_SECONDS)
        return False


def process_tree(pid: int) -> set[int]:
    """`pid` and all its descendants (vLLM's workers, for one, hold VRAM of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False if the group is already gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class EngineProcess:
    """One running engine: its process, where it listens and where it logs."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    # Stops what is left of the engine's group should llmd die (see `reaper`).
    reaper: Reaper | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        return tail_lines(self.log_path, lines)

    async def wait_exit(self) -> int:
        """Wait for the main process to exit, without a thread, through a pidfd; while none can be
        opened (no descriptor left), by looking every EXIT_POLL_SECONDS."""
        said = False
        while self.popen.poll() is None:
            try:
                fd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                return self.popen.wait()
            except OSError as exc:
                if not said:
                    log.warning("cannot watch engine %s (pid %d) through a pidfd (%s); polling it instead",
                                self.name, self.pid, exc.strerror or exc)
                    said = True
                await anyio.sleep(EXIT_POLL_SECONDS)
                continue
            try:
                while self.popen.poll() is None:
                    await anyio.wait_readable(fd)
            finally:
                os.close(fd)
        return self.popen.returncode

    async def wait_ready(self, spec: LaunchSpec, timeout: float) -> None:
        """Return once the readiness probe answers 200; raise EngineStartError if the engine exits or times out."""
        outcome: list[BaseException | None] = []

        async def probe() -> None:
            while not await _ready(self.port, spec.readiness.path):
                await anyio.sleep(READY_POLL_SECONDS)
            outcome.append(None)

        async def watch_exit() -> None:
            code = await self.wait_exit()
            outcome.append(self._start_error(f"exited with code {code} before it was ready"))

        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:

                async def first(fn) -> None:  # type: ignore[no-untyped-def]
                    await fn()
                    tg.cancel_scope.cancel()

                tg.start_soon(first, probe)
                tg.start_soon(first, watch_exit)
        if not outcome:
            raise self._start_error(f"was not ready after {timeout:.0f}s (raise [server] ready_timeout if it needs longer)")
        if outcome[0] is not None:
            raise outcome[0]

    def _start_error(self, what: str) -> EngineStartError:
        tail = "\n".join(f"  | {line}" for line in self.log_tail())
        return EngineStartError(
            f"engine for {self.name!r} (pid {self.pid}) {what}. Last lines of {self.log_path}:\n{tail}"
        )

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the group, wait up to `grace`, then SIGKILL the group. Returns the exit code."""
        pgid = self.pid  # the engine leads its own session, so its pid is its group id
        if signal_group(pgid, signal.SIGTERM):
            with anyio.move_on_after(grace):
                await self.wait_exit()
                # Children may linger after the leader exits; give them the rest of the grace.
                while group_alive(pgid):
                    await anyio.sleep(0.05)
        if signal_group(pgid, signal.SIGKILL):
            log.warning("engine %s (pgid %d) ignored SIGTERM for %.0fs; killed", self.name, pgid, grace)
        with anyio.move_on_after(5):
            await self.wait_exit()
        self._forget_group()
        return self.popen.returncode

    def kill_now(self) -> None:
        """Last resort on the way out: SIGKILL the whole group, synchronously."""
        signal_group(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._forget_group()

    def _forget_group(self) -> None:
        """Tell the reaper the group is gone; one that lingers stays its to stop."""
        if self.reaper is not None and not group_alive(self.pid):
            self.reaper.forget(self.pid)


# Set in every engine's environment, so a process left behind can be traced to its daemon.
OWNER_ENV = "LLMD_OWNER"
MODEL_ENV = "LLMD_MODEL"


def spawn_engine(
    name: str, spec: LaunchSpec, port: int, log_path: Path, owner: str, log_limits: LogLimits | None = None,
    cpu_cores: tuple[int, ...] = (),
) -> EngineProcess:
    """Start `spec.argv` directly (never through a shell), output appended to `log_path`.

    `owner` (the daemon's state dir) is recorded in the engine's environment. With `log_limits`,
    the engine writes into a pipe that a thread copies into the log, rotating it at the cap (see
    `rotating_log`); without, straight into the file. With `cpu_cores`, the engine (and every
    process and thread it starts) runs on those cores only: its share of the CPU.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Not the daemon's whole environment: its secrets (HF_TOKEN, say) are for downloads only.
    env = engine_environment({**spec.env, OWNER_ENV: owner, MODEL_ENV: name})
    header = f"\n===== llmd: starting {name} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {mask_argv(spec.argv)}\n".encode()
    if log_limits is None:
        with log_path.open("ab") as log_file:
            log_file.write(header)
            log_file.flush()
            popen = _popen(name, spec, env, log_file.fileno(), cpu_cores)
    else:
        target = RotatingLog(log_path, log_limits)
        target.write(header)
        read_end, write_end = os.pipe()
        try:
            popen = _popen(name, spec, env, write_end, cpu_cores)
        except BaseException:
            os.close(read_end)
            target.close()
            raise
        finally:
            os.close(write_end)  # the engine holds it now: the pipe ends when the engine's side closes
        copy_into(read_end, target, name)
    # The kernel kills the engine with llmd; the reaper kills what the engine started.
    reaper = reaper_for(OWNER_ENV, owner)
    reaper.watch(popen.pid)
    return EngineProcess(name=name, argv=list(spec.argv), port=port, log_path=log_path, popen=popen, reaper=reaper)


def _popen(name: str, spec: LaunchSpec, env: dict[str, str], output: int,
           cpu_cores: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start the engine in a session of its own, its stdout and stderr on `output`."""
    try:
        return subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_child_setup(cpu_cores),
            close_fds=True,
        )
    except OSError as exc:
        reason = "not found" if exc.errno == errno.ENOENT else exc.strerror
        raise EngineStartError(f"cannot start engine for {name!r}: {spec.argv[0]}: {reason}") from None
