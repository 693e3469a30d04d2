"""`python -m bench.profile`: where llmd's own CPU time goes while it proxies.

Starts a daemon with the tiny model, drives one workload through it (small sequential requests,
concurrent streams, or nothing at all with three engines loaded), samples the daemon with py-spy
meanwhile (`pip install py-spy`; it needs
permission to ptrace the daemon), and prints the busiest functions and the share of each
library. The raw samples (py-spy's collapsed-stack format) are kept for a flame graph.

    .venv/bin/python -m bench.profile --workload requests --seconds 15 --out /tmp/llmd-profile
    .venv/bin/python -m bench.profile --workload streams --clients 16 --out /tmp/llmd-profile
    .venv/bin/python -m bench.profile --workload idle --seconds 30 --out /tmp/llmd-profile
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .harness import LOCALHOST, BenchError, Daemon, Profile, cpu_seconds, default_models_dir, find_llama_server
from .httpclient import Connection, chat_body, run_streams
from .suite import TINY, engine_args

PATH = "/v1/chat/completions"
# Library of a frame, by the path py-spy prints for it; the first match wins.
LIBRARIES = (
    ("llmd", ("daemon/", "llmd/")),
    ("starlette", ("starlette/",)),
    ("uvicorn", ("uvicorn/",)),
    ("httpx", ("httpx/",)),
    ("httpcore", ("httpcore/",)),
    ("h11", ("h11/",)),
    ("anyio", ("anyio/",)),
    ("asyncio", ("asyncio/",)),
    ("json", ("json/",)),
    ("logging", ("logging/",)),
)


def library(frame: str) -> str:
    for name, markers in LIBRARIES:
        if any(marker in frame for marker in markers):
            return name
    return "other"


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: one `frame;frame;...;leaf count` line per distinct stack."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(stacks: list[tuple[list[str], int]], top: int = 25) -> str:
    total = sum(count for _, count in stacks)
    if not total:
        return "no samples: the daemon was idle the whole time, or py-spy could not read it"
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    for frames, count in stacks:
        self_time[frames[-1]] += count
        by_library[library(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples of the daemon while busy", "", "self time by library (leaf frame):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_library.most_common()]
    lines += ["", f"top {top} functions by self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in self_time.most_common(top)]
    lines += ["", f"top {top} functions by inclusive time (excluding the event loop's own frames):"]
    shown = 0
    for frame, n in inclusive.most_common():
        if any(skip in frame for skip in ("<module>", "run_until_complete", "run_forever", "_run_once", "(asyncio/events.py")):
            continue
        lines.append(f"  {100 * n / total:5.1f}%  {frame}")
        shown += 1
        if shown == top:
            break
    return "\n".join(lines)


IDLE_ENGINES = ("tiny", "spare-1", "spare-2")


def drive(daemon: Daemon, workload: str, seconds: float, clients: int, tokens: int) -> tuple[str, int, str]:
    """Run the workload for `seconds`; return what was done, and how many units of what."""
    deadline = time.monotonic() + seconds
    if workload == "idle":
        time.sleep(seconds)
        return f"{seconds:g} s idle with {len(IDLE_ENGINES)} engines loaded", 0, ""
    if workload == "requests":
        body = chat_body("tiny", 1, stream=False)
        connection = Connection(LOCALHOST, daemon.port)
        count = 0
        try:
            while time.monotonic() < deadline:
                status, _, reply = connection.request(PATH, body)
                if status != 200:
                    raise BenchError(f"llmd answered {status}: {reply[:200]!r}")
                count += 1
        finally:
            connection.close()
        return f"{count} sequential requests (max_tokens = 1) in {seconds:g} s", count, "request"
    body = chat_body("tiny", tokens, stream=True)
    events = batches = 0
    while time.monotonic() < deadline:
        streams = run_streams(LOCALHOST, daemon.port, PATH, body, clients)
        events += sum(len(s.event_times) for s in streams)
        batches += 1
    return f"{batches} batches of {clients} streams x {tokens} tokens ({events} events) in {seconds:g} s", events, "event"


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    cli.add_argument("--workload", choices=("requests", "streams", "idle"), default="requests")
    cli.add_argument("--seconds", type=float, default=15.0)
    cli.add_argument("--clients", type=int, default=16, help="concurrent streams (streams workload)")
    cli.add_argument("--tokens", type=int, default=256, help="tokens per stream (streams workload)")
    cli.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    cli.add_argument("--nonblocking", action="store_true",
                     help="sample without pausing the daemon: less overhead, but stacks may be misattributed")
    cli.add_argument("--out", type=Path, default=None, help="directory for the raw samples (default: a temp dir)")
    args = cli.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("bench.profile: py-spy is not installed: `.venv/bin/pip install py-spy`", file=sys.stderr)
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="llmd-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="llmd-profile-run-"))
    try:
        model = TINY.ensure(default_models_dir())
        parallel = max(args.clients, 1)
        profiles = [Profile("tiny", model, parallel=parallel, extra_args=engine_args(parallel))]
        if args.workload == "idle":
            profiles += [Profile(name, model, extra_args=engine_args(1)) for name in IDLE_ENGINES[1:]]
        daemon = Daemon(root / "llmd", find_llama_server(), profiles)
        daemon.start()
        try:
            for profile in profiles:
                daemon.load(profile.name)
            drive(daemon, args.workload, 1.0, args.clients, args.tokens)  # warm-up
            raw = out / f"{args.workload}.collapsed.txt"
            command = [py_spy, "record", "--pid", str(daemon.pid), "--format", "raw", "--rate", str(args.rate),
                       "--output", str(raw)]
            spy = subprocess.Popen([*command, "--nonblocking"] if args.nonblocking else command,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
            cpu_before, wall_before = cpu_seconds(daemon.pid), time.perf_counter()
            what, units, unit = drive(daemon, args.workload, args.seconds, args.clients, args.tokens)
            cpu = cpu_seconds(daemon.pid) - cpu_before
            wall = time.perf_counter() - wall_before
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(timeout=60)
            if not raw.exists():
                raise BenchError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        finally:
            daemon.stop()
    except BenchError as exc:
        print(f"bench.profile: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"workload: {what}\nraw samples: {raw}")
    print(f"daemon CPU: {cpu:.2f} s in {wall:.1f} s ({100 * cpu / wall:.2f}% of a core, sampled by py-spy meanwhile)")
    if units:
        print(f"daemon CPU per {unit}: {1e6 * cpu / units:.0f} us")
    print()
    print(summarize(read_collapsed(raw)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
