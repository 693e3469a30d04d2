"""What the measurements run against: generated models, llama-server started directly,
`llmd serve` as a subprocess with a temporary config, and nginx with a generated config.

Everything listens on 127.0.0.1 on ports picked free at start; nothing needs the network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from llmd.daemon.config import default_engines_dir
from llmd.daemon.engines.supervisor import free_port
from llmd.daemon.models.tinymodel import write_tiny_gguf

from .httpclient import get_status

LOCALHOST = "127.0.0.1"
# Ready probes of the direct baselines: finer than llmd's own (10 ms), so that llmd's polling
# shows up as overhead rather than hiding in the baseline, and on a raw socket, so that the
# probing takes next to no CPU from the engine that is loading.
DIRECT_POLL_SECONDS = 0.002


class BenchError(Exception):
    """The suite cannot go on: the message says what failed, or what is missing and how to get it."""


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelShape:
    """A generated random-weight model: the `write_tiny_gguf` arguments and what the shape is for."""

    name: str
    purpose: str
    n_layers: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    # The context the model says it was trained for: llama-server serves no longer prompts.
    ctx: int = 2048

    @property
    def file_name(self) -> str:
        trained = f"-C{self.ctx}" if self.ctx != 2048 else ""
        return f"{self.name}-L{self.n_layers}-E{self.n_embd}-F{self.n_ff}-H{self.n_head}{trained}.gguf"

    def ensure(self, directory: Path) -> Path:
        """The model file in `directory`, written first if it is not there yet (the writer is
        deterministic, so a file with the right name holds the right model)."""
        path = directory / self.file_name
        if not path.exists():
            write_tiny_gguf(
                path, n_layers=self.n_layers, n_embd=self.n_embd, n_ff=self.n_ff, n_head=self.n_head, n_head_kv=self.n_head,
                ctx=self.ctx,
            )
        return path


def default_models_dir() -> Path:
    """Where generated models are kept between runs (the larger ones take seconds to write)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmd" / "bench-models"


# ---------------------------------------------------------------------------------------------
# Binaries


def find_llama_server(explicit: Path | None = None) -> Path:
    candidates: list[Path | None] = [explicit]
    if os.environ.get("LLMD_LLAMA_SERVER"):
        candidates.append(Path(os.environ["LLMD_LLAMA_SERVER"]))
    from llmd.daemon.engines.provision import find_installed_binary

    candidates.append(find_installed_binary(default_engines_dir(), "llama-cpp"))
    on_path = shutil.which("llama-server")
    candidates.append(Path(on_path) if on_path else None)
    for candidate in candidates:
        if candidate is not None and candidate.exists():
            return candidate
    raise BenchError(
        "llama-server is not installed: run `.venv/bin/llmctl engines install llama-cpp` "
        "(or pass --llama-server PATH, or set LLMD_LLAMA_SERVER)"
    )


def find_nginx() -> Path | None:
    """nginx from PATH or the Debian location (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin")
    return Path(found) if found else None


NGINX_MISSING = (
    "nginx is not installed, so the nginx baselines are skipped and goals that compare with nginx "
    "cannot be judged; install it with `apt-get install nginx` (Debian/Ubuntu) and run again"
)


def _llmd_command() -> list[str]:
    script = Path(sys.executable).parent / "llmd"
    if script.exists():
        return [str(script)]
    found = shutil.which("llmd")
    if found:
        return [found]
    raise BenchError("the `llmd` command is not installed in this environment: run `pip install -e .`")


# ---------------------------------------------------------------------------------------------
# Small helpers


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_listening(popen: subprocess.Popen[bytes], port: int, what: str, log: Path | None = None) -> None:
    """Wait until `what`, run as `popen`, accepts connections on `port`; BenchError (with the
    tail of `log`) if it exits first."""

    def up() -> bool:
        if popen.poll() is not None:
            tail = f":\n{_log_tail(log)}" if log is not None else ""
            raise BenchError(f"{what} exited with {popen.returncode}{tail}")
        return _tcp_open(port)

    wait_until(up, 15, f"{what} to listen")


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """CPU time process `pid` has used so far, all its live threads together.

    Read from the scheduler's nanosecond counters (/proc/PID/task/*/schedstat) where the kernel
    has them: the clock-tick figures (/proc/PID/stat, psutil) come in 10 ms steps, too coarse for
    an idle daemon over a few seconds.
    """
    total, found = 0, False
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
                found = True
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        pass
    if found:
        return total / 1e9
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


CLOCK_TICK_SECONDS = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the process's name (field 3 is index 0); OSError if
    the process is gone."""
    # The name is in parentheses and may hold spaces or parentheses itself: split after the last.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def user_system_seconds(pid: int) -> tuple[float, float]:
    """CPU time process `pid` has spent in user space and in the kernel, all its threads together.

    The kernel keeps these two in clock ticks (/proc/PID/stat), sampled rather than counted, so
    they say how a proxy's CPU divides over many batches, not what one batch cost."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) * CLOCK_TICK_SECONDS, int(fields[12]) * CLOCK_TICK_SECONDS


def started_at(pid: int) -> float:
    """When process `pid` started, in seconds on CLOCK_BOOTTIME, the clock the kernel stamps it
    with. The kernel keeps it in clock ticks (10 ms): this is the middle of its tick, within
    half a tick of the truth. OSError if the process is gone."""
    return (int(_stat_fields(pid)[19]) + 0.5) * CLOCK_TICK_SECONDS  # field 22, `starttime`


def stop_process(popen: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Send `sig` to `popen` and wait for it; kill it if it is still there after `timeout` seconds."""
    if popen.poll() is None:
        popen.send_signal(sig)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


# ---------------------------------------------------------------------------------------------
# llama-server, started directly


def argv_with_port(argv: list[str], port: int) -> list[str]:
    """`argv` (an engine command line as llmd built it) listening on `port` instead."""
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    return argv


@dataclass
class DirectEngine:
    """llama-server run by the suite itself, the baseline for cold starts and swaps."""

    argv: list[str]
    log_path: Path
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Spawn the engine and wait until /health answers 200; return the seconds that took."""
        self.port = free_port()
        argv = argv_with_port(self.argv, self.port)
        with self.log_path.open("ab") as log:
            started = time.perf_counter()
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        while get_status(LOCALHOST, self.port, "/health") != 200:
            if self.popen.poll() is not None:
                raise BenchError(f"llama-server exited with {self.popen.returncode}:\n{_log_tail(self.log_path)}")
            if time.perf_counter() - started > 300:
                raise BenchError(f"llama-server was not ready after 300s:\n{_log_tail(self.log_path)}")
            time.sleep(DIRECT_POLL_SECONDS)
        return time.perf_counter() - started

    def stop(self) -> float:
        """SIGTERM the engine and wait for it to exit; return the seconds that took."""
        started = time.perf_counter()
        if self.popen is not None:
            stop_process(self.popen)
            self.popen = None
        return time.perf_counter() - started

    def close(self) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# llmd


@dataclass
class Profile:
    name: str
    model: Path
    ctx: int = 512
    parallel: int = 1
    extra_args: tuple[str, ...] = ()
    vram_mib: int | None = None
    ttl: str = "never"
    # Keep the prompt cache across stops (saved before, restored after).
    persist_kv: bool = False

    def toml(self) -> str:
        text = textwrap.dedent(
            f"""\
            engine = "llama-cpp"
            [model]
            path = {json.dumps(str(self.model))}
            [launch]
            ctx = {self.ctx}
            parallel = {self.parallel}
            extra_args = {json.dumps(list(self.extra_args))}
            [policy]
            ttl = "{self.ttl}"
            persist_kv = {json.dumps(self.persist_kv)}
            """
        )
        if self.vram_mib is not None:
            text += f"[placement]\nvram_mib = {self.vram_mib}\n"
        return text


@dataclass
class Daemon:
    """`llmd serve` in a subprocess, with its own config, profiles and state under `root`."""

    root: Path
    llama_server: Path
    profiles: list[Profile]
    simulate_gpus: list[dict] | None = None
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None
    _api: httpx.Client | None = None

    @property
    def socket_path(self) -> Path:
        return self.root / "llmd.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        profiles_dir = self.root / "profiles"
        profiles_dir.mkdir(exist_ok=True)
        for profile in self.profiles:
            (profiles_dir / f"{profile.name}.toml").write_text(profile.toml())
        self.port = free_port()
        config = textwrap.dedent(
            f"""\
            [server]
            listen = "{LOCALHOST}:{self.port}"
            socket = {json.dumps(str(self.socket_path))}
            state_dir = {json.dumps(str(self.root / "state"))}
            profile_dirs = [{json.dumps(str(profiles_dir))}]
            stop_grace = 5
            [engines.llama-cpp]
            command = [{json.dumps(str(self.llama_server))}]
            """
        )
        if self.simulate_gpus is not None:
            sim = self.root / "gpus.json"
            sim.write_text(json.dumps({"gpus": self.simulate_gpus}))
            config += f"[gpus]\nsimulate = {json.dumps(str(sim))}\nmargin_mib = 0\n"
        (self.root / "llmd.toml").write_text(config)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [*_llmd_command(), "serve", "--config", str(self.root / "llmd.toml")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        wait_until(self._listening, 30, f"llmd to listen (log: {self.log_path})")
        self._api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://llmd", timeout=600, trust_env=False
        )

    def _listening(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise BenchError(f"llmd exited with {self.popen.returncode}:\n{_log_tail(self.log_path, 30)}")
        if not self.socket_path.exists() or not _tcp_open(self.port):
            return False
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(self.socket_path))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    @property
    def api(self) -> httpx.Client:
        assert self._api is not None, "daemon not started"
        return self._api

    def load(self, name: str) -> dict:
        """`llmctl load NAME`: returns the model's `ps` row once it is ready."""
        with self.api.stream("POST", f"/v1/models/{name}/load") as response:
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["event"] == "ready":
                    return event["status"]
                if event["event"] == "error":
                    raise BenchError(f"llmd could not load {name}: {event['message']}")
        raise BenchError(f"llmd's load of {name} ended without a result")

    def unload(self, name: str) -> None:
        self.api.post(f"/v1/models/{name}/unload").raise_for_status()

    def ps(self) -> list[dict]:
        response = self.api.get("/v1/ps")
        response.raise_for_status()
        return response.json()["models"]

    def row(self, name: str) -> dict | None:
        return next((row for row in self.ps() if row["model"] == name), None)

    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def stop(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None
        if self.popen is not None:
            stop_process(self.popen, timeout=30)
            self.popen = None


# ---------------------------------------------------------------------------------------------
# nginx


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
{user}
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 100000;
    upstream engine {{
        server {host}:{upstream_port};
        keepalive 128;
        # Within llama-server's own limits (5 s idle, 100 requests per connection), so nginx never
        # reuses a connection the engine is closing: a POST on one would fail with a 502.
        keepalive_timeout 4s;
        keepalive_requests 100;
    }}
    server {{
        listen {host}:{port};
        client_max_body_size 32m;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """nginx as a plain reverse proxy in front of one engine: one worker (llmd is one process),
    no buffering, HTTP/1.1 keep-alive to the upstream."""

    binary: Path
    root: Path
    upstream_port: int
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # Run as root, nginx would hand its worker to `nobody`, which cannot use the temp paths here.
        user = f"user {_user_name()};" if os.geteuid() == 0 else ""
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=self.root, user=user, host=LOCALHOST, port=self.port,
                                          upstream_port=self.upstream_port))
        log = self.root / "error.log"
        with (self.root / "stdout.log").open("ab") as out:
            self.popen = subprocess.Popen(
                [str(self.binary), "-p", str(self.root), "-c", str(conf), "-e", str(log)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )

        wait_listening(self.popen, self.port, "nginx", log)
        # The master listens before it forks its worker; the worker is what serves.
        wait_until(lambda: self.pids()[1:], 15, "nginx's worker to start")

    def pids(self) -> list[int]:
        """The master's pid, then the worker's."""
        if self.popen is None:
            return []
        master = psutil.Process(self.popen.pid)
        return [master.pid, *(child.pid for child in master.children())]

    def stop(self) -> None:
        if self.popen is not None:
            stop_process(self.popen, signal.SIGQUIT)
            self.popen = None


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Target:
    """Something that answers OpenAI requests for a model: the engine, nginx, or llmd."""

    name: str
    port: int


def rotations(items: list[Target], count: int) -> Iterator[list[Target]]:
    """`count` orderings of `items`, each rotated by one from the last, so no target always goes first."""
    for i in range(count):
        shift = i % len(items)
        yield items[shift:] + items[:shift]
