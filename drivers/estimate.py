"""llmd's memory estimate for a model, as the scheduler planned with it.

The daemon works the estimate out from the model's file headers (`llmd.daemon.placement.estimate`);
drivers that must cap an engine's caches or offload read it through
`llmd.drivers.base.planned_estimate`, so the engine is sized with the scheduler's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024

# CUDA context, cuBLAS workspace and the runtime's own allocations: about 300-500 MiB per card
# on current drivers, visible in nvidia-smi but in no engine log. Paid once per card used;
# nothing on a CPU-only placement.
GPU_OVERHEAD_MIB = 400


@dataclass(frozen=True)
class ComputeParts:
    """What the compute buffer is made of, in bytes, for sizing it device by device when an
    engine splits the layers over several (see `llmd.daemon.placement.estimate.split_compute_bytes`):
    the graph's inputs (the KQ mask), a layer's attention stage and its peak (the larger of its
    attention and feed-forward stages), one row of activations (`n_embd` values for each token
    of the micro-batch) and the logits."""

    inputs: int
    attention: int
    peak: int
    row: int
    outputs: int


@dataclass(frozen=True)
class Estimate:
    """Memory a model needs, in bytes, split the way placement decisions need it.

    `layer_bytes[i]` includes `moe_expert_bytes[i]`. `kv_bytes` includes any recurrent state.
    `compute_bytes` is per card (every card runs its own graph).
    """

    weights_bytes: int
    layer_bytes: tuple[int, ...]
    non_layer_bytes: int
    moe_expert_bytes: tuple[int, ...]
    kv_bytes: int
    compute_bytes: int
    n_layers: int
    n_head: int
    n_head_kv: int
    kv_cells: int = 0
    recurrent_bytes: int = 0
    gpu_overhead_mib: int = GPU_OVERHEAD_MIB
    # The part of `non_layer_bytes` an engine that splits layers over devices puts with the
    # last layer (output head and final norm); the rest, the input embeddings, stays in host
    # memory with llama.cpp. 0: not known.
    output_bytes: int = 0
    # `compute_bytes` in parts, for an engine that splits layers over devices; None: not known.
    compute_parts: ComputeParts | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def gpu_total_mib(self, gpus: int = 1) -> int:
        """MiB over all cards when the whole model is on `gpus` cards (0 = on the CPU)."""
        per_card = self.compute_bytes / MIB + (self.gpu_overhead_mib if gpus > 0 else 0)
        return math.ceil((self.weights_bytes + self.kv_bytes) / MIB + per_card * max(gpus, 1))

    def breakdown(self) -> dict[str, Any]:
        """What `llmctl plan` prints: each part in MiB, and the model's shape."""
        return {
            "weights_mib": round(self.weights_bytes / MIB, 1),
            "non_layer_mib": round(self.non_layer_bytes / MIB, 1),
            "per_layer_mib": round(sum(self.layer_bytes) / max(self.n_layers, 1) / MIB, 1),
            "moe_experts_mib": round(sum(self.moe_expert_bytes) / MIB, 1),
            "kv_mib": round(self.kv_bytes / MIB, 1),
            "recurrent_mib": round(self.recurrent_bytes / MIB, 1),
            "kv_cells": self.kv_cells,
            "compute_mib": round(self.compute_bytes / MIB, 1),
            "gpu_overhead_mib": self.gpu_overhead_mib,
            "total_one_gpu_mib": self.gpu_total_mib(1),
            "n_layers": self.n_layers,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "source": self.source,
            "notes": list(self.notes),
        }


# The estimate for the request's model and launch settings at a given context length (tokens
# per sequence). It may raise LlmdError, OSError or ValueError when the model cannot be read.
Estimator = Callable[[int], Estimate]
