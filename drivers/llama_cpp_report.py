"""What llama-server says it allocated on each device, read from its log.

At verbosity 4 (`-lv 4`, which the driver passes) llama-server logs each buffer it allocates
while loading, named by its backend buffer type:

    load_tensors: RPC0[127.0.0.1:50052] model buffer size =    45.00 MiB
    llama_kv_cache:        CUDA0 KV buffer size =   256.00 MiB
    sched_reserve:   CPU compute buffer size =     3.14 MiB

The names map back to the placement's devices: `CUDA<k>` is its k-th card of this machine
(CUDA_VISIBLE_DEVICES lists them in placement order), `RPC<d>[HOST:PORT]` the device at that
endpoint (`d` numbers the devices of one server, not the `--device` order). Anything else
(`CPU`, `CPU_Mapped`, `CUDA_Host`, ...) is host memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .base import HOST_MEMORY as HOST
from .base import DeviceAllocation, Placement

__all__ = ["buffer_allocations"]

_BUFFER = re.compile(r"(\S+)\s+(model|KV|RS|compute) buffer size =\s*([\d.]+) MiB")
_RPC = re.compile(r"^RPC\d+\[(.+)\]$")
_CUDA = re.compile(r"^CUDA(\d+)$")
_KIND = {"model": "model", "KV": "kv", "RS": "kv", "compute": "compute"}


def buffer_allocations(lines: Iterable[str], placement: Placement) -> list[DeviceAllocation]:
    """Each device of `placement` the log names, with what was allocated on it (a buffer
    logged twice counts once: the last figure), then host memory under index `HOST`;
    empty when the log names no buffer (a verbosity below 4)."""
    local = [share.index for share in placement.gpus if not share.remote]
    by_endpoint = {share.endpoint: share.index for share in placement.gpus if share.remote}
    buffers: dict[tuple[str, str], float] = {}
    for line in lines:
        match = _BUFFER.search(line)
        if match is not None:
            buffers[(match.group(1), match.group(2))] = float(match.group(3))
    totals: dict[int, dict[str, float]] = {}
    for (name, kind), mib in buffers.items():
        index = _device_index(name, local, by_endpoint)
        if index is None:  # a device the placement does not name
            continue
        parts = totals.setdefault(index, {"model": 0.0, "kv": 0.0, "compute": 0.0})
        parts[_KIND[kind]] += mib
    order = [share.index for share in placement.gpus if share.index in totals]
    if HOST in totals:
        order.append(HOST)
    return [
        DeviceAllocation(index, model_mib=totals[index]["model"], kv_mib=totals[index]["kv"],
                         compute_mib=totals[index]["compute"])
        for index in order
    ]


def _device_index(name: str, local: list[int], by_endpoint: dict[str, int]) -> int | None:
    """The placement's device a buffer name stands for, HOST for host memory, None for none."""
    rpc = _RPC.match(name)
    if rpc is not None:
        return by_endpoint.get(rpc.group(1))
    cuda = _CUDA.match(name)
    if cuda is not None:
        k = int(cuda.group(1))
        return local[k] if k < len(local) else None
    return HOST
