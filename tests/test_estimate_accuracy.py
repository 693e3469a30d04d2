"""The estimator against what llama-server itself reports allocating.

For each model shape, the real llama-server loads a generated GGUF on the CPU with `-lv 4`,
which logs its three buffers:

    load_tensors:   CPU_Mapped model buffer size =     0.44 MiB
    llama_kv_cache:        CPU KV buffer size =     1.00 MiB
    sched_reserve:        CPU compute buffer size =     3.14 MiB

Each must match the estimate within 10%. The log rounds to 0.01 MiB, so buffers of a few
hundredths of a MiB also pass within 0.02 MiB (the rounding of both sides), whatever the ratio.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from llmd.daemon.placement.estimate import estimate_gguf
from llmd.daemon.models.tinymodel import write_tiny_gguf

pytestmark = pytest.mark.engine

MIB = 1024 * 1024
RELATIVE = 0.10
ABSOLUTE_MIB = 0.02


@dataclass(frozen=True)
class Case:
    id: str
    shape: dict[str, int]
    ctx: int
    # llama-server flags beyond -c; the estimate is called with the matching arguments.
    flags: tuple[str, ...] = ()
    estimate_args: dict[str, object] = field(default_factory=dict)


# Without -np, llama-server runs 4 slots sharing one unified KV cache.
SERVER_DEFAULT = {"parallel": 4, "kv_unified": True}

CASES = [
    Case("tiny-mha", dict(n_layers=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=4), 2048,
         estimate_args=SERVER_DEFAULT),
    Case("gqa4-8k", dict(n_layers=4, n_embd=256, n_ff=704, n_head=8, n_head_kv=2), 8192,
         estimate_args=SERVER_DEFAULT),
    Case("mqa-deep", dict(n_layers=6, n_embd=128, n_ff=352, n_head=4, n_head_kv=1), 4096,
         estimate_args=SERVER_DEFAULT),
    Case("gqa3-ctx-padded", dict(n_layers=3, n_embd=384, n_ff=1024, n_head=6, n_head_kv=2), 1000,
         estimate_args=SERVER_DEFAULT),
    Case("three-slots", dict(n_layers=4, n_embd=256, n_ff=704, n_head=8, n_head_kv=2), 3000,
         flags=("-np", "3"), estimate_args={"parallel": 3}),
    Case("q8-cache", dict(n_layers=4, n_embd=256, n_ff=704, n_head=8, n_head_kv=2), 4096,
         flags=("-ctk", "q8_0", "-ctv", "q8_0"), estimate_args={**SERVER_DEFAULT, "cache_type_k": "q8_0"}),
    Case("no-flash-attn", dict(n_layers=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=4), 2048,
         flags=("-fa", "off"), estimate_args={**SERVER_DEFAULT, "flash_attn": False}),
]

_BUFFERS = {
    "weights": re.compile(r"CPU_Mapped model buffer size =\s*([\d.]+) MiB"),
    "kv": re.compile(r"CPU KV buffer size =\s*([\d.]+) MiB"),
    "compute": re.compile(r"CPU compute buffer size =\s*([\d.]+) MiB"),
}
# "( 1024 cells,   4 layers,  3/3 seqs)": cells per stream, then sequences/streams.
_CELLS = re.compile(r"llama_kv_cache: size = .*\(\s*(\d+) cells,\s*\d+ layers,\s*\d+/(\d+) seqs")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _engine_buffers(
    binary: Path, model: Path, ctx: int, flags: tuple[str, ...], log: Path
) -> tuple[dict[str, float], int]:
    """Start llama-server, wait for /health, stop it; return its logged buffer sizes (MiB) and KV cells."""
    port = _free_port()
    argv = [str(binary), "-m", str(model), "-c", str(ctx), "--fit", "off", "-ngl", "0", "-lv", "4",
            "--host", "127.0.0.1", "--port", str(port), *flags]
    # A CUDA build must not move anything to a card: this compares CPU buffers.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not ready after 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    sizes = {}
    for name, pattern in _BUFFERS.items():
        match = pattern.search(text)
        assert match, f"no {name} buffer line in the llama-server log:\n{text[-3000:]}"
        sizes[name] = float(match.group(1))
    cells = _CELLS.search(text)
    assert cells, "no KV cell count in the llama-server log"
    return sizes, int(cells.group(1)) * int(cells.group(2))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_estimate_matches_llama_server(case: Case, llama_server_bin: Path, tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / f"{case.id}.gguf", **case.shape)
    reported, cells = _engine_buffers(llama_server_bin, model, case.ctx, case.flags, tmp_path / "server.log")
    est = estimate_gguf(model, case.ctx, **case.estimate_args)  # type: ignore[arg-type]
    estimated = {
        "weights": est.weights_bytes / MIB,
        "kv": est.kv_bytes / MIB,
        "compute": est.compute_bytes / MIB,
    }
    assert est.kv_cells == cells
    report = ", ".join(
        f"{name} {estimated[name]:.2f} vs {reported[name]:.2f} MiB "
        f"({(estimated[name] - reported[name]) / reported[name]:+.1%})"
        for name in reported
    )
    print(f"{case.id}: {report}")
    for name, got in reported.items():
        allowed = max(RELATIVE * got, ABSOLUTE_MIB)
        assert abs(estimated[name] - got) <= allowed, f"{case.id} {name}: {report}"
