"""`llmctl doctor`: what is wrong with this host's llmd setup, and how to fix it.

Each check is one small function returning a `CheckResult` (ok, warn or fail, what was found,
and the fix). None of them needs a running daemon: the smoke test starts each engine itself,
through its driver and the supervisor, on a tiny generated model in a temporary directory, and
removes everything again.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import packages_distributions
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx
from llmd.drivers.base import Driver, GpuShare, LaunchRequest, Placement, load_progress

from llmd.daemon.config import DaemonConfig, split_host_port
from llmd.daemon.engines.commands import INSTALLABLE_ENGINES, resolve_command
from llmd.daemon.errors import AddressInUseError, ConfigError, EngineNotInstalledError, LlmdError
from llmd.daemon.placement.inventory import CpuOnlyInventory, open_inventory
from llmd.daemon.http.listeners import bind_tcp
from llmd.daemon.models.profiles import Launch, ModelSource, Profile, ProfileSet
from llmd.daemon.engines.provision import InstalledEngine, list_installed
from llmd.daemon.util.loopback import reachable_url
from llmd.daemon.util.units import format_mib

if TYPE_CHECKING:
    from llmd.daemon.engines.supervisor import EngineProcess

# The smoke test's parts (the tiny model writer with numpy and gguf, the estimator, the
# supervisor) are imported when it runs: `--no-smoke` and the checks alone do without them.

Status = Literal["ok", "warn", "fail"]
Progress = Callable[[str], None]

# The served name of the smoke test's model; also its LLMD_MODEL, so a leftover is recognisable.
SMOKE_MODEL = "llmd-doctor-smoke"
SMOKE_CTX = 512
SMOKE_MAX_TOKENS = 2
# How often the smoke test reports progress while an engine starts (vLLM takes a minute on a CPU).
PROGRESS_SECONDS = 1.0
# vLLM starts the tiny weightless model with random weights and no compilation.
_VLLM_SMOKE_ARGS = ["--load-format", "dummy", "--enforce-eager"]


@dataclass(frozen=True)
class CheckResult:
    """One line of the report. `fix` says what to do when the status is not ok."""

    check: str
    status: Status
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Users and permissions


@dataclass(frozen=True)
class User:
    """A local user as the kernel checks permissions for it: uid and every group it is in."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def current(cls) -> User:
        uid = os.getuid()
        return cls(_user_name(uid), uid, frozenset({os.getgid(), *os.getgroups()}))

    @classmethod
    def named(cls, name: str) -> User:
        """Raise LookupError naming the user when there is no such account."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise LookupError(f"no user named {name!r} on this host") from None
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))

    @classmethod
    def by_uid(cls, uid: int) -> User:
        try:
            return cls.named(pwd.getpwuid(uid).pw_name)
        except (KeyError, LookupError):
            return cls(str(uid), uid, frozenset())


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


READ, WRITE, EXEC = 4, 2, 1


def may(st: os.stat_result, user: User, want: int) -> bool:
    """Whether `user` has the `want` bits (READ|WRITE|EXEC) on a file with stat `st`.

    Worked out from the mode bits, as the kernel does, rather than with os.access, which only
    answers for the user running doctor; the daemon usually runs as another user. ACLs are not
    considered.
    """
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in user.gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def _describe(path: Path, st: os.stat_result) -> str:
    return f"{path} (owner {_user_name(st.st_uid)}:{_group_name(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o})"


def daemon_user(socket_path: Path, explicit: str | None) -> User:
    """Whom llmd runs as: `explicit`, else the owner of its socket (llmd creates it), else whoever runs doctor.

    Raise LookupError when `explicit` is not a user here.
    """
    if explicit:
        return User.named(explicit)
    try:
        return User.by_uid(socket_path.stat().st_uid)
    except OSError:
        return User.current()


# ---------------------------------------------------------------------------------------------
# Engines


def installed_engine(config: DaemonConfig, command: list[str]) -> InstalledEngine | None:
    """The `llmctl engines install` install that `command` runs, if it is one (for its version)."""
    for installed in list_installed(config.server.engines_dir):
        if command[: len(installed.command)] == installed.command:
            return installed
    return None


def _driver_package(driver: Driver) -> str:
    """"pkg 1.2" for the distribution that provides a third-party driver, or its module name."""
    module = type(driver).__module__
    dists = packages_distributions().get(module.split(".")[0], [])
    if not dists:
        return module
    return f"{dists[0]} {dist_version(dists[0])}"


def _install_fix(name: str) -> str:
    if name in INSTALLABLE_ENGINES:
        return f"run `llmctl engines install {name}` (add --cuda on a GPU host), or set [engines.{name}] command in llmd.toml"
    return f"install the program the {name!r} driver runs, or set [engines.{name}] command in llmd.toml"


@dataclass(frozen=True)
class FoundEngine:
    """An engine's command as one doctor run resolved it (once, for all its checks), or why
    it was not found."""

    driver: Driver
    command: list[str] | None
    missing: EngineNotInstalledError | None = None

    @classmethod
    def look_up(cls, config: DaemonConfig, driver: Driver) -> FoundEngine:
        try:
            return cls(driver, resolve_command(config, driver))
        except EngineNotInstalledError as exc:
            return cls(driver, None, exc)


def check_engine(config: DaemonConfig, found: FoundEngine, used_by: list[str], gpu_count: int) -> CheckResult:
    """Whether the engine can be found, which version it is, and whether it suits this host."""
    driver, command = found.driver, found.command
    label = f"engine {driver.name}"
    if command is None:
        if used_by:
            return CheckResult(label, "fail", f"{found.missing} (profiles {', '.join(used_by)} use it)", _install_fix(driver.name))
        return CheckResult(label, "warn", f"not installed, and no profile uses it: {found.missing}", _install_fix(driver.name))
    where = " ".join(command)
    installed = installed_engine(config, command)
    if driver.name not in INSTALLABLE_ENGINES:
        return CheckResult(label, "ok", f"third-party driver from {_driver_package(driver)}: {where}")
    if installed is None:
        return CheckResult(label, "ok", f"version unknown (not installed by `llmctl engines install`): {where}")
    build = f"{installed.version} ({installed.flavour} build): {where}"
    if installed.flavour == "cuda" and not gpu_count:
        return CheckResult(
            label, "warn", f"{build}; a CUDA build, but this host shows no NVIDIA GPU",
            f"run `llmctl engines install {driver.name}` for the CPU build",
        )
    return CheckResult(label, "ok", build)


def profiles_by_engine(profiles: ProfileSet) -> dict[str, list[str]]:
    """Engine name -> the valid profiles that use it."""
    used: dict[str, list[str]] = {}
    for name, profile in sorted(profiles.profiles.items()):
        used.setdefault(profile.engine, []).append(name)
    return used


# ---------------------------------------------------------------------------------------------
# GPUs


def check_gpus(config: DaemonConfig) -> tuple[CheckResult, int]:
    """The cards NVML (or the simulated snapshot) shows, and how many there are."""
    simulate = config.gpus.simulate
    try:
        inventory = open_inventory(simulate)
        cards = inventory.snapshot()
    except ConfigError as exc:
        return CheckResult("gpus", "fail", str(exc), "fix the snapshot file, or remove [gpus] simulate from llmd.toml"), 0
    except Exception as exc:  # noqa: BLE001  (an NVML error while reading the cards: report it, never crash)
        return CheckResult("gpus", "fail", f"NVML failed while reading the cards: {exc}",
                           "check `nvidia-smi`; a driver update usually needs a reboot"), 0
    listed = "; ".join(
        f"GPU {g.index} {g.name}: {format_mib(g.free_mib)} free of {format_mib(g.total_mib)}" for g in cards
    )
    if simulate is not None:
        return CheckResult(
            "gpus", "warn", f"simulated inventory from {simulate} ([gpus] simulate), not real cards: {listed or 'no cards'}",
            "remove [gpus] simulate from llmd.toml to place models on the real cards through NVML",
        ), len(cards)
    if isinstance(inventory, CpuOnlyInventory):
        note = inventory.note
        if note.startswith("no NVIDIA driver"):
            fix = ("nothing to fix if this host has no NVIDIA card: engines run on the CPU; otherwise install "
                   "the NVIDIA driver (`nvidia-smi` must list the card)")
        elif "reports no GPUs" in note:
            fix = "`nvidia-smi` should list the card: check that it is seated and powered, and that the driver matches it"
        else:
            fix = "run `nvidia-smi`; after a driver update, reboot so the kernel module and the library match"
        return CheckResult("gpus", "warn", f"no NVIDIA driver / CPU-only: {note}", fix), 0
    return CheckResult("gpus", "ok", f"{inventory.note}: {listed}"), len(cards)


# ---------------------------------------------------------------------------------------------
# State dir, socket, ports


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_dir(label: str, path: Path, user: User) -> CheckResult:
    """A directory llmd writes to: it exists (or can be created), and `user` may write to it."""
    if not path.exists():
        parent = _nearest_existing(path)
        if parent.is_dir() and may(parent.stat(), user, WRITE | EXEC):
            return CheckResult(label, "warn", f"{path} does not exist yet; llmd creates it when it starts",
                               "nothing to do, or create it now with `llmd init`")
        return CheckResult(
            label, "fail", f"{path} does not exist, and {user.name} cannot create it in {_describe(parent, parent.stat())}",
            f"sudo mkdir -p {path} && sudo chown {user.name} {path}",
        )
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        return CheckResult(label, "fail", f"{path} is not a directory", "move it away, or point [server] state_dir elsewhere")
    if not may(st, user, WRITE | EXEC):
        owner_fix = f"chmod u+rwx {path}" if st.st_uid == user.uid else f"sudo chown {user.name} {path} && sudo chmod u+rwx {path}"
        return CheckResult(label, "fail", f"{user.name} (llmd's user) cannot write to {_describe(path, st)}", owner_fix)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return CheckResult(label, "warn", f"{_describe(path, st)} is writable by every user, who could replace llmd's logs and pid ledger",
                           f"chmod o-w {path}")
    return CheckResult(label, "ok", f"{_describe(path, st)}, writable by {user.name}")


def check_state_dir(config: DaemonConfig, user: User) -> list[CheckResult]:
    """The state dir and the logs dir inside it (the one llmd writes to on every load)."""
    results = [check_dir("state dir", config.server.state_dir, user)]
    if config.logs_dir.exists():
        results.append(check_dir("logs dir", config.logs_dir, user))
    return results


def _searchable(path: Path, user: User) -> Path | None:
    """The first directory above `path` that `user` cannot enter, if any."""
    for parent in reversed(path.parents):
        try:
            if not may(parent.stat(), user, EXEC):
                return parent
        except OSError:
            return parent
    return None


def check_socket(socket_path: Path, me: User) -> CheckResult:
    """The management socket: whether llmctl (`me`) may use it, and whether llmd answers on it."""
    if not socket_path.exists():
        return CheckResult(
            "socket", "warn", f"no socket at {socket_path}: llmd is not running, or listens elsewhere",
            "start it (`llmd serve`, or `systemctl start llmd`), or name its socket with --socket / LLMD_SOCKET",
        )
    st = socket_path.stat()
    if not stat.S_ISSOCK(st.st_mode):
        return CheckResult("socket", "fail", f"{socket_path} is not a socket", f"remove {socket_path}; llmd creates the socket when it starts")
    blocked = _searchable(socket_path, me)
    if blocked is not None:
        return CheckResult("socket", "fail", f"{me.name} cannot enter {_describe(blocked, blocked.stat())}",
                           f"add {me.name} to that directory's group: sudo usermod -aG {_group_name(blocked.stat().st_gid)} {me.name}")
    if not may(st, me, READ | WRITE):
        group = _group_name(st.st_gid)
        if (st.st_mode >> 3) & 6 == 6:
            fix = f"sudo usermod -aG {group} {me.name}, then log in again"
        else:
            fix = "restart llmd: it creates its socket with mode 0660, for its group"
        return CheckResult("socket", "fail", f"{me.name} may not use {_describe(socket_path, st)}", fix)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=5) as client:
            models = client.get("http://llmd/v1/ps").json()["models"]
    except (httpx.HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
        return CheckResult(
            "socket", "warn", f"{_describe(socket_path, st)} exists but llmd does not answer on it ({type(exc).__name__})",
            "a daemon that died left it behind: start llmd again, it replaces the stale socket",
        )
    running = sum(1 for m in models if m.get("state") == "ready")
    problem = st.st_mode & 0o006
    if problem:
        return CheckResult("socket", "warn", f"{_describe(socket_path, st)}: every local user can load and unload models",
                           f"chmod o-rw {socket_path} (llmd creates it 0660)")
    return CheckResult("socket", "ok", f"llmd answers on {_describe(socket_path, st)}; {running} model(s) ready")


def _llmd_answers(host: str, port: int, path: str) -> bool:
    """Whether what listens on host:port is an llmd: its proxy or management API, recognised by its answers."""
    try:
        response = httpx.get(reachable_url(host, port) + path, timeout=5)
    except httpx.HTTPError:
        return False
    if response.status_code == 401:
        return 'realm="llmd"' in response.headers.get("www-authenticate", "")
    try:
        body = response.json()
    except ValueError:
        return False
    if path == "/v1/models":
        return isinstance(body, dict) and all(m.get("owned_by") == "llmd" for m in body.get("data", [{}]))
    return isinstance(body, dict) and isinstance(body.get("models"), list)


def _holder(port: int) -> str:
    """"pid 123 (nginx)" for whatever listens on `port`, or "" when it cannot be seen."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except psutil.Error:
        pass
    return ""


def check_port(setting: str, address: str, probe_path: str) -> CheckResult:
    """A configured listen address is free, or held by a running llmd that answers on it."""
    host, port = split_host_port(address)
    label = f"port {address}"
    try:
        bind_tcp(host, port, setting).close()
        return CheckResult(label, "ok", f"{setting} {address} is free")
    except AddressInUseError as exc:
        if _llmd_answers(host, port, probe_path):
            return CheckResult(label, "ok", f"{setting} {address} is held by a running llmd, which answers on it")
        holder = _holder(port)
        held = f" (held by {holder})" if holder else ""
        return CheckResult(label, "fail", f"{exc}{held}", f"stop what holds it, or choose another port for {setting} in llmd.toml")
    except ConfigError as exc:
        return CheckResult(label, "fail", str(exc), f"set {setting} in llmd.toml to an address of this host")


# ---------------------------------------------------------------------------------------------
# Smoke inference


def _smoke_model(engine: str, root: Path) -> tuple[Path, list[str]]:
    """A tiny model in the format the engine reads, and the launch flags it needs.

    vLLM reads a Hugging Face directory; llama.cpp, fastllm, and third-party engines (whose
    format llmd cannot know) get a GGUF file.
    """
    from llmd.daemon.models.tinymodel import write_tiny_gguf, write_tiny_hf_dir

    if engine == "vllm":
        return write_tiny_hf_dir(root / "tiny-hf", ctx=SMOKE_CTX * 4), list(_VLLM_SMOKE_ARGS)
    return write_tiny_gguf(root / "tiny.gguf", ctx=SMOKE_CTX * 4), []


def _smoke_placement(installed: InstalledEngine | None, config: DaemonConfig) -> Placement:
    """The CPU, except for a CUDA build, which goes on the card with the most free memory."""
    if installed is None or installed.flavour != "cuda" or config.gpus.simulate is not None:
        return Placement(ctx=SMOKE_CTX, reason="doctor smoke test")
    cards = open_inventory(None).snapshot()
    if not cards:
        return Placement(ctx=SMOKE_CTX, reason="doctor smoke test")
    card = max(cards, key=lambda g: g.free_mib)
    share = GpuShare(card.index, card.uuid, min(card.free_mib, 2048), card.total_mib)
    return Placement(gpus=(share,), ctx=SMOKE_CTX, reason="doctor smoke test")


def _phase(driver: Driver, lines: list[str]) -> str:
    """The latest loading phase the engine's log shows, from the driver's own reading of it."""
    for line in reversed(lines):
        phase = load_progress(driver, line)
        if phase:
            return phase
    return "starting"


async def _report_while_starting(engine: EngineProcess, driver: Driver, progress: Progress) -> None:
    started = time.monotonic()
    while True:
        await anyio.sleep(PROGRESS_SECONDS)
        lines = engine.log_tail(20)
        last = lines[-1].strip()[:100] if lines else ""
        progress(f"smoke {driver.name}: {_phase(driver, lines)} ({time.monotonic() - started:.0f}s)  | {last}")


async def _chat(port: int) -> tuple[int, float]:
    """One `max_tokens=2` chat; (completion tokens, seconds). Raise LlmdError with the engine's answer."""
    body = {"model": SMOKE_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": SMOKE_MAX_TOKENS}
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
    took = time.monotonic() - started
    if response.status_code != 200:
        raise LlmdError(f"the chat request got HTTP {response.status_code}: {response.text[:300]}")
    try:
        reply = response.json()
        reply["choices"][0]["message"]
        tokens = int((reply.get("usage") or {}).get("completion_tokens", 0))
    except (ValueError, KeyError, IndexError, TypeError):
        raise LlmdError(f"the chat reply is not an OpenAI chat completion: {response.text[:300]}") from None
    return tokens, took


async def _start_and_ask(
    config: DaemonConfig, driver: Driver, command: list[str], root: Path, progress: Progress, spawned: list[EngineProcess]
) -> str:
    """Start the engine on a tiny model in `root`, send one chat; a line saying how it went."""
    from llmd.daemon.engines.supervisor import free_port, spawn_engine
    from llmd.daemon.placement.estimate import launch_estimator

    model, extra_args = _smoke_model(driver.name, root)
    profile = Profile(engine=driver.name, model=ModelSource(path=model), launch=Launch(ctx=SMOKE_CTX, extra_args=extra_args))
    profile.name = SMOKE_MODEL
    placement = _smoke_placement(installed_engine(config, command), config)
    port = free_port()
    # The engine's own temporary files (vLLM's IPC sockets and compile caches) go in `root` too,
    # so removing it leaves nothing behind.
    scratch = root / "t"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch), **config.engine(driver.name).env}
    request = LaunchRequest(profile=profile, placement=placement, model_path=model, host="127.0.0.1", port=port,
                            command=command, env=env, estimator=launch_estimator(profile, model))
    spec = driver.launch(request)
    # The temp dir is the owner mark: no daemon's leftover reaping ever claims this engine.
    engine = spawn_engine(SMOKE_MODEL, spec, port, root / "engine.log", owner=str(root))
    spawned.append(engine)
    started = time.monotonic()
    failed: LlmdError | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_report_while_starting, engine, driver, progress)
        try:
            await engine.wait_ready(spec, config.server.ready_timeout)
        except LlmdError as exc:  # raised below, outside the task group, so it is not wrapped in a group
            failed = exc
        finally:
            tg.cancel_scope.cancel()
    if failed is not None:
        raise failed
    ready_s = time.monotonic() - started
    progress(f"smoke {driver.name}: ready in {ready_s:.1f}s, sending one chat request")
    tokens, took = await _chat(port)
    where = "CPU" if placement.cpu_only else f"GPU {placement.gpus[0].index}"
    return f"ready in {ready_s:.1f}s on the {where}; a {SMOKE_MAX_TOKENS}-token chat answered in {took:.2f}s ({tokens} tokens)"


def _failure_detail(exc: LlmdError, engine: EngineProcess | None) -> str:
    """The error without the log path (the temp dir is removed), and the log's last lines instead."""
    text = str(exc).split(". Last lines of ", 1)[0]
    if engine is not None:
        tail = "\n".join(f"  | {line}" for line in engine.log_tail(12))
        if tail:
            text += f"\n  last log lines:\n{tail}"
    return text


def _smoke_failed(driver: Driver, error: LlmdError, engine: EngineProcess | None) -> CheckResult:
    """A built-in engine that cannot answer is a failure; a third-party one only a warning, since
    it gets a GGUF model whether or not it reads that format."""
    detail = _failure_detail(error, engine)
    if driver.name in INSTALLABLE_ENGINES:
        return CheckResult(f"smoke {driver.name}", "fail", detail,
                           f"see the log lines above; `llmctl engines install {driver.name}` reinstalls it")
    return CheckResult(f"smoke {driver.name}", "warn", detail,
                       "third-party engines are tried on a GGUF model, which this one may not read; try it with `llmctl load`")


async def smoke_engine(config: DaemonConfig, found: FoundEngine, progress: Progress) -> CheckResult:
    """Start the engine through its driver and the supervisor on a tiny generated model, send one
    chat, stop it, and remove the model and its log. Ctrl-C stops the engine too, then re-raises."""
    from llmd.daemon.engines.supervisor import group_alive

    driver, command = found.driver, found.command
    label = f"smoke {driver.name}"
    if command is None:
        return CheckResult(label, "warn", "skipped: the engine is not installed", _install_fix(driver.name))
    root = Path(tempfile.mkdtemp(prefix="llmd-doctor-"))
    spawned: list[EngineProcess] = []
    interrupted = False
    result = CheckResult(label, "fail", "interrupted")
    try:
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        interrupted = True
                        tg.cancel_scope.cancel()

            tg.start_soon(stop_on_signal)
            try:
                detail = await _start_and_ask(config, driver, command, root, progress, spawned)
                result = CheckResult(label, "ok", detail)
            except (LlmdError, OSError, ValueError) as exc:
                error = exc if isinstance(exc, LlmdError) else LlmdError(f"{type(exc).__name__}: {exc}")
                result = _smoke_failed(driver, error, spawned[-1] if spawned else None)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for engine in spawned:
                await engine.stop(config.server.stop_grace)
                if group_alive(engine.pid):
                    engine.kill_now()
        shutil.rmtree(root, ignore_errors=True)
    if interrupted:
        raise KeyboardInterrupt
    return result
