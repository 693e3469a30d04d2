"""fastllm (`ftllm server`) for real, on the CPU, on a tiny GGUF, through llmd's proxy."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from conftest import engine_processes, tiny_profile, wait_until
from llmd.drivers.base import load_progress
from llmd.drivers.fastllm import FastllmDriver

pytestmark = pytest.mark.engine


def _config(fastllm_command: list[str]) -> str:
    return f"[engines.fastllm]\ncommand = {json.dumps(fastllm_command)}\n"


def test_load_on_demand_chat_and_unload(make_daemon, fastllm_command: list[str], tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"fast": tiny_profile(tiny_gguf, engine="fastllm")}, extra_config=_config(fastllm_command))
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    assert daemon.state("fast") is None  # nothing runs before the first request

    reply = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert reply.model == "fast"
    assert reply.choices[0].message.role == "assistant"
    # Random weights may pick the end token early; never more than asked for.
    assert 1 <= reply.usage.completion_tokens <= 8
    assert daemon.state("fast") == "ready"

    chunks = list(client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hello"}], max_tokens=16, stream=True
    ))
    assert chunks and all(c.model == "fast" for c in chunks)
    assert any(c.choices and c.choices[0].finish_reason in ("length", "stop") for c in chunks)

    (row,) = daemon.ps()
    assert row["engine"] == "fastllm"
    argv = row["argv"]
    assert argv[: len(fastllm_command)] == fastllm_command
    assert argv[argv.index("--model_name") + 1] == "fast"
    assert argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(row["port"])

    # The engine's own startup progress, as the driver reads it from the log.
    log = (daemon.state_dir / "logs" / "fast.log").read_text().splitlines()
    progress = [p for p in (load_progress(FastllmDriver(), line) for line in log) if p]
    assert "loading weights 100%" in progress and progress[-1] == "ready"

    assert "unloaded" in daemon.llmctl("unload", "fast").stdout
    assert daemon.state("fast") == "stopped"
    wait_until(lambda: not engine_processes(daemon.state_dir), what="fastllm to exit")


def test_wrong_model_file_reports_the_engine_log(make_daemon, fastllm_command: list[str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model" * 100)
    daemon = make_daemon({"broken": tiny_profile(garbage, engine="fastllm")}, extra_config=_config(fastllm_command))
    response = httpx.post(daemon.url + "/v1/chat/completions",
                          json={"model": "broken", "messages": [{"role": "user", "content": "x"}]}, timeout=120)
    assert response.status_code == 503
    assert "exited with code" in response.json()["error"]["message"]
    assert not engine_processes(daemon.state_dir)


def test_alias_reaches_fastllm(make_daemon, fastllm_command: list[str], tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"fast": tiny_profile(tiny_gguf, engine="fastllm", aliases=["fast-alias"])},
                         extra_config=_config(fastllm_command))
    # fastllm answers 404 for any name but --model_name; the proxy sends it the profile's name.
    response = httpx.post(daemon.url + "/v1/chat/completions", timeout=120,
                          json={"model": "fast-alias", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert response.status_code == 200, response.text


# Parses each argv of a JSON list (from `server` on) with ftllm's own parser, and prints what
# ftllm makes of the placement flags: `--device` through ast.literal_eval, as ftllm reads it.
_FTLLM_PARSE = """\
import ast, json, sys
from ftllm.cli import args_parser

out = []
for argv in json.load(sys.stdin):
    args = args_parser().parse_args(argv)
    try:
        device = ast.literal_eval(args.device)
    except (ValueError, SyntaxError):
        device = args.device
    out.append({"device": device, "moe_device": args.moe_device, "moe_device_layers": args.moe_device_layers,
                "threads": args.threads, "tp": args.tp, "host": args.host, "port": args.port})
print(json.dumps(out))
"""


def test_the_plan_reaches_fastllm_through_its_own_argument_parser(fastllm_command: list[str], tmp_path: Path) -> None:
    """What the driver writes means the plan to ftllm itself: the installed engine's own parser
    reads back the device map, the MoE layers on the CPU and the thread count the plan set."""
    import subprocess

    from llmd.daemon.models.profiles import Profile
    from llmd.daemon.models.tinymodel import write_tiny_gguf
    from llmd.daemon.placement.estimate import launch_estimator
    from llmd.drivers.base import GpuShare, LaunchRequest, Placement

    model = write_tiny_gguf(tmp_path / "eight.gguf", n_layers=8)
    card, other = GpuShare(0, "GPU-a", 8000, total_mib=24000), GpuShare(1, "GPU-b", 8000, total_mib=24000)
    plans = {
        # 6 of 8 layers on one card, 2 computed on the CPU's 2 cores.
        "partial": (Placement(gpus=(card,), gpu_layers=6, ctx=512, cpu_cores=(0, 1)),
                    {"device": {"cuda:0": 6, "cpu": 2}, "moe_device": "", "moe_device_layers": -1, "threads": 2}),
        "partial over two cards": (Placement(gpus=(card, other), gpu_layers=5, ctx=512, cpu_cores=(2, 3, 4)),
                                   {"device": {"cuda:0": 3, "cuda:1": 2, "cpu": 3}, "threads": 3}),
        "moe experts": (Placement(gpus=(card,), cpu_moe_layers=3, ctx=512, cpu_cores=(1,)),
                        {"device": "cuda:0", "moe_device": "cpu", "moe_device_layers": 3, "threads": 1}),
        "whole on two cards": (Placement(gpus=(card, other), ctx=512), {"tp": "2", "moe_device": "", "threads": -1}),
        "cpu": (Placement(gpu_layers=0, ctx=512, cpu_cores=(0, 1, 2, 3)), {"device": "cpu", "threads": 4}),
    }
    profile = Profile.model_validate({"engine": "fastllm", "model": {"path": str(model)}, "launch": {"ctx": 512}})
    profile.name = "fast"
    argvs = []
    for placement, _ in plans.values():
        request = LaunchRequest(profile=profile, placement=placement, model_path=model, host="127.0.0.1", port=4321,
                                command=fastllm_command, estimator=launch_estimator(profile, model))
        argv = FastllmDriver().launch(request).argv
        argvs.append(argv[len(fastllm_command) - 1:])  # from the `server` subcommand on
    python = Path(fastllm_command[0]).parent / "python"
    parsed = subprocess.run([str(python), "-c", _FTLLM_PARSE], input=json.dumps(argvs), capture_output=True,
                            text=True, timeout=120, check=True)
    for (name, (_, expected)), seen in zip(plans.items(), json.loads(parsed.stdout)):
        assert seen["host"] == "127.0.0.1" and seen["port"] == 4321, name
        for key, value in expected.items():
            assert seen[key] == value, f"{name}: {key} is {seen[key]!r} to ftllm, the plan says {value!r}"
