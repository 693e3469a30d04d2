"""llmd's plan for a model on one card next to what the engine reports allocating there: the
engine step of `scripts/gpu-check`.

llama-server at verbosity 4 (`-lv 4`) logs each buffer it allocates, by backend:

    load_tensors:        CUDA0 model buffer size =    45.00 MiB
    load_tensors:   CPU_Mapped model buffer size =     4.00 MiB
    llama_kv_cache:      CUDA0 KV buffer size =    16.00 MiB
    sched_reserve:       CUDA0 compute buffer size =    29.00 MiB

The plan (`llmctl plan --json`) holds llmd's estimate of the same parts and the MiB it claims on
the card; nvidia-smi says what the engine's process holds there in all (its CUDA context too).

    python -m llmd.daemon.diagnostics.engine_vs_estimate PLAN_JSON ENGINE_LOG [PROCESS_MIB]

prints a short report and exits 1 when the engine holds more than llmd planned for it.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Buffers", "compare", "engine_buffers", "main"]

_BUFFER = re.compile(r"(\S+)\s+(model|KV|RS|compute) buffer size =\s*([\d.]+) MiB")
_KIND = {"model": "weights", "KV": "kv", "RS": "kv", "compute": "compute"}


@dataclass
class Buffers:
    """MiB the engine logged, by part: on the card, and in host memory."""

    card: dict[str, float] = field(default_factory=lambda: {"weights": 0.0, "kv": 0.0, "compute": 0.0})
    host: dict[str, float] = field(default_factory=lambda: {"weights": 0.0, "kv": 0.0, "compute": 0.0})

    @property
    def card_total(self) -> float:
        return sum(self.card.values())

    @property
    def found(self) -> bool:
        return any(self.card.values()) or any(self.host.values())


def engine_buffers(lines: Iterable[str], device: str = "CUDA0") -> Buffers:
    """The buffers of one start of the engine: a buffer logged twice counts once (the last)."""
    seen: dict[tuple[str, str], float] = {}
    for line in lines:
        match = _BUFFER.search(line)
        if match is not None:
            seen[(match.group(1), match.group(2))] = float(match.group(3))
    buffers = Buffers()
    for (backend, kind), mib in seen.items():
        if backend == device:
            buffers.card[_KIND[kind]] += mib
        elif not backend.startswith(("CUDA", "RPC")) or backend.startswith("CUDA_Host"):
            buffers.host[_KIND[kind]] += mib
    return buffers


def compare(plan: dict[str, Any], buffers: Buffers, process_mib: int | None) -> tuple[list[str], bool]:
    """The report's lines, and whether the engine stayed within what llmd planned."""
    estimate = plan.get("estimate") or {}
    cards = plan.get("gpus") or []
    planned = int(cards[0]["vram_mib"]) if cards else 0
    where = f"GPU{cards[0]['index']}" if cards else "no card"
    lines = [f"{'':<16}{'llmd estimate':>16}{'engine on card':>16}{'engine in RAM':>16}"]
    for label, key, part in (("weights", "weights_mib", "weights"), ("KV cache", "kv_mib", "kv"),
                             ("compute", "compute_mib", "compute")):
        lines.append(f"{label:<16}{_mib(estimate.get(key)):>16}{_mib(buffers.card[part]):>16}{_mib(buffers.host[part]):>16}")
    lines.append(f"{'CUDA context':<16}{_mib(estimate.get('gpu_overhead_mib')):>16}{'(not logged)':>16}")
    if not buffers.found:
        lines.append("the engine's log names no buffer (was it started with -lv 4?)")
        return lines, False
    summary = f"planned on {where}: {planned} MiB; the engine's buffers there: {buffers.card_total:.1f} MiB"
    if process_mib is not None:
        summary += f"; its process holds {process_mib} MiB (nvidia-smi)"
    lines.append(summary)
    # nvidia-smi's figure includes the CUDA context, which no log line shows.
    used = process_mib if process_mib is not None else buffers.card_total
    within = used <= planned
    verdict = "ok    within the plan" if within else "UNDER llmd planned less than the engine holds"
    lines.append(f"{verdict} ({planned - used:+.0f} MiB)")
    return lines, within


def _mib(value: object) -> str:
    return f"{float(value):.1f} MiB" if isinstance(value, int | float) else "?"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m llmd.daemon.diagnostics.engine_vs_estimate PLAN_JSON ENGINE_LOG [PROCESS_MIB]",
              file=sys.stderr)
        return 2
    plan = json.loads(Path(args[0]).read_text())
    lines = Path(args[1]).read_text(errors="replace").splitlines()
    # The last start only: the log keeps earlier ones above its "===== llmd: starting" header.
    starts = [at for at, line in enumerate(lines) if line.startswith("===== llmd: starting")]
    buffers = engine_buffers(lines[starts[-1]:] if starts else lines)
    process_mib = int(args[2]) if len(args) == 3 and args[2].isdigit() else None
    report, within = compare(plan, buffers, process_mib)
    print("\n".join(report))
    return 0 if within else 1


if __name__ == "__main__":
    raise SystemExit(main())
