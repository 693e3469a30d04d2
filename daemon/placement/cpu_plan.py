"""The CPU side of a plan: a share of the cores, and room in host RAM.

Pure, like the scheduler that calls it (`scheduler.plan`): from the model's need, the placement
the search over the cards chose, the host and the models running now, to the cores and host RAM
the placement gets, and the idle models to stop for them.

Cores. An engine that computes on the CPU runs one thread per core it was given, and its threads
meet at a barrier many times per token: two such engines on the same cores slow each other down
tens of times over, since every barrier waits for a thread the kernel has descheduled. So each
gets a share of its own:

- how many: `[launch] threads` when the profile sets it, else an even share, the cores llmd may
  use divided by the CPU engines that run at once (those running now and this one); at least
  one per CPU worker (`cpu_tensor_parallel`);
- which: those the fewest other CPU engines hold, free ones first, lowest first;
- when not enough cores are free, idle engines that hold more than the even share are stopped,
  least wanted first (as idle models are evicted for VRAM), and come back with a share of their
  own on their next request. Busy or pinned ones keep their cores; the new engine then shares
  the least held ones, still with one thread per core. A profile asking for more than the even
  share never stops another engine for it.

Host RAM is a ledger like a card's memory: the room is the smaller of the total less what llmd's
models claim (weights and KV cache kept in host memory, and the weights of parked engines) and
what the kernel reports available less a margin. A model whose host part does not fit stops idle
models that hold host RAM (never by parking one, which would take more), or waits for busy ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmd.drivers.base import Placement, cpu_list

from llmd.daemon.placement.host import HostInfo

if TYPE_CHECKING:
    from llmd.daemon.placement.scheduler import ModelNeed, RunningModel

__all__ = ["CpuSide", "computes_on_cpu", "even_share", "host_need_mib", "host_room", "plan_cpu_side", "pick_cores"]


@dataclass(frozen=True)
class CpuSide:
    """What the CPU side adds to a plan."""

    cpu_cores: tuple[int, ...]
    host_mib: int
    cpu_tensor_parallel: int
    # Idle models to stop beyond those the cards needed: for host RAM, then for cores.
    evict: tuple[str, ...]
    # For the plan's reason: the cores and host RAM, and why others were stopped.
    note: str


def computes_on_cpu(need: ModelNeed, placement: Placement) -> bool:
    """Whether the engine computes on the CPU under `placement`: a CPU placement always does;
    layers or MoE experts kept in host memory do when the engine runs them there."""
    if placement.cpu_only:
        return True
    offloaded = placement.gpu_layers is not None or placement.cpu_moe_layers > 0
    return offloaded and need.offload_on_cpu


def host_need_mib(need: ModelNeed, placement: Placement) -> int:
    """MiB of host RAM for what `placement` keeps in host memory: the whole model on the CPU, or
    the layers (and their KV cache) and MoE experts left there. 0 for a need without per-layer
    sizes (a `placement.vram_mib` or a measured figure), which says nothing about host memory."""
    if need.n_layers == 0:
        return 0
    if placement.cpu_only:
        total = sum(need.layer_mib) + need.non_layer_mib + need.kv_per_layer_mib * need.n_layers + need.compute_mib
        return math.ceil(total)
    on_gpu = need.n_layers if placement.gpu_layers is None else min(placement.gpu_layers, need.n_layers)
    on_cpu = need.n_layers - on_gpu  # llama.cpp keeps the first layers on the CPU
    mib = sum(need.layer_mib[:on_cpu]) + need.kv_per_layer_mib * on_cpu
    if need.moe_expert_mib:
        # The experts of the first `cpu_moe_layers` layers, where those layers are on a card.
        mib += sum(need.moe_expert_mib[i] for i in range(on_cpu, min(placement.cpu_moe_layers, need.n_layers)))
    return math.ceil(mib)


def host_room(host: HostInfo, running: Sequence[RunningModel]) -> int:
    """Host RAM free for a new claim: the smaller of llmd's ledger and the live one."""
    claimed = sum(model.host_mib for model in running)
    return min(host.total_mib - claimed, host.available_mib - host.margin_mib)


def even_share(cores: int, engines_at_once: int) -> int:
    """Cores for each of `engines_at_once` CPU engines splitting `cores`: at least one."""
    return max(1, cores // max(1, engines_at_once))


def pick_cores(allowed: Sequence[int], held: Sequence[Sequence[int]], count: int) -> tuple[int, ...]:
    """`count` of the `allowed` cores that the fewest of the `held` sets hold (free ones
    first), lowest first among equals, so that a share is a contiguous run where it can be."""
    holders = {core: 0 for core in allowed}
    for cores in held:
        for core in cores:
            if core in holders:
                holders[core] += 1
    chosen = sorted(holders, key=lambda core: (holders[core], core))[:count]
    return tuple(sorted(chosen))


def _eviction_order(models: Sequence[RunningModel]) -> list[RunningModel]:
    """Least wanted first, as the scheduler evicts: lowest priority, then least recently used."""
    return sorted(models, key=lambda m: (m.priority, m.last_used, m.name))


def _free(allowed: Sequence[int], held: Sequence[RunningModel]) -> int:
    taken = {core for model in held for core in model.cpu_cores}
    return sum(1 for core in allowed if core not in taken)


def _cores(
    need: ModelNeed, workers: int, allowed: Sequence[int], running: Sequence[RunningModel]
) -> tuple[tuple[int, ...], tuple[RunningModel, ...], list[str]]:
    """The cores for `need`, the idle CPU engines to stop for them, and who it shares with."""
    engines = [model for model in running if model.cpu_cores]
    share = even_share(len(allowed), len(engines) + 1)
    count = min(len(allowed), max(need.threads or share, workers))
    stopped: list[RunningModel] = []
    if _free(allowed, engines) < count and count <= share:
        allowed_set = set(allowed)
        over = [m for m in engines if m.evictable and len(allowed_set.intersection(m.cpu_cores)) > share]
        for model in _eviction_order(over):
            stopped.append(model)
            if _free(allowed, [m for m in engines if m not in stopped]) >= count:
                break
        else:
            stopped = []  # no disjoint share even then: share cores, and stop nobody for it
        # Keep running whichever of them turned out not to be needed.
        for model in reversed(list(stopped)):
            kept = [m for m in engines if m not in stopped or m is model]
            if _free(allowed, kept) >= count:
                stopped.remove(model)
    holders = [m for m in engines if m not in stopped]
    cores = pick_cores(allowed, [m.cpu_cores for m in holders], count)
    shared = sorted(m.name for m in holders if set(m.cpu_cores) & set(cores))
    return cores, tuple(stopped), shared


def _host_victims(deficit: int, candidates: Sequence[RunningModel]) -> tuple[RunningModel, ...] | None:
    """The idle models to stop so that `deficit` MiB of host RAM comes free, or None."""
    chosen: list[RunningModel] = []
    for model in _eviction_order(candidates):
        chosen.append(model)
        deficit -= model.frees_host()
        if deficit <= 0:
            break
    else:
        return None
    for model in reversed(list(chosen)):
        if deficit + model.frees_host() <= 0:
            chosen.remove(model)
            deficit += model.frees_host()
    return tuple(chosen)


def plan_cpu_side(
    need: ModelNeed, placement: Placement, evicted: Sequence[str], running: Sequence[RunningModel], host: HostInfo
) -> CpuSide | str:
    """The CPU side of `placement`, after the cards' plan stops the models in `evicted`; or why
    the model does not fit in host RAM now."""
    notes: list[str] = []
    gone = set(evicted)
    host_mib = host_need_mib(need, placement)
    more: list[str] = []
    if host_mib > 0:
        room = host_room(host, running) + sum(m.frees_host() for m in running if m.name in gone)
        if room < host_mib:
            candidates = [m for m in running if m.evictable and m.name not in gone and m.frees_host() > 0]
            victims = _host_victims(host_mib - room, candidates)
            if victims is None:
                return _no_host_room(need, host, host_mib, room, candidates, running, gone)
            more += [m.name for m in victims]
            room += sum(m.frees_host() for m in victims)
            notes.append(f"after stopping idle {', '.join(more)} for host RAM")
        notes.insert(0, f"host RAM {host_mib} MiB of {max(room, 0)} MiB free")
        gone.update(more)

    workers = 1
    if placement.cpu_only and need.splits_heads and isinstance(need.tensor_parallel, int):
        workers = need.tensor_parallel
    cores: tuple[int, ...] = ()
    if computes_on_cpu(need, placement) and host.cores:
        cores, stopped, shared = _cores(need, workers, host.cores, [m for m in running if m.name not in gone])
        threads = f"{len(cores)} thread{'s' if len(cores) != 1 else ''}"
        where = f"{workers} CPU workers on " if workers > 1 else ""
        text = f"{where}cores {cpu_list(cores)} ({threads})"
        if shared:
            text += f", shared with {', '.join(shared)}: not enough cores free"
        notes.append(text)
        if stopped:
            more += [m.name for m in stopped]
            notes.append(f"after stopping idle {', '.join(m.name for m in stopped)} to free cores")
    return CpuSide(cores, host_mib, workers, tuple(more), "; ".join(notes))


def _no_host_room(
    need: ModelNeed, host: HostInfo, host_mib: int, room: int, candidates: Sequence[RunningModel],
    running: Sequence[RunningModel], gone: set[str],
) -> str:
    potential = room + sum(m.frees_host() for m in candidates)
    text = (
        f"needs {host_mib} MiB of host RAM for what stays in host memory (at ctx {need.ctx}); "
        f"{max(room, 0)} MiB free (beyond a {host.margin_mib} MiB margin), "
        f"{max(potential, 0)} MiB if idle models stopped"
    )
    busy = [m for m in sorted(running, key=lambda m: m.name) if m.name not in gone and not m.evictable and m.host_mib > 0]
    if busy:
        held = "; ".join(f"{m.name} ({'pinned' if m.pinned and not m.in_flight else 'busy'}; {m.host_mib} MiB)" for m in busy)
        text += f"; cannot stop: {held}"
    return text
