"""What the manager reports about its models and GPUs (`llmctl ps`, `plan`, `gpus`, load
progress, the metrics and the dashboard). These functions only read the manager's state."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmd.drivers.base import HOST_MEMORY, DeviceAllocation, load_progress

from llmd.daemon.engines.supervisor import process_tree, tail_lines
from llmd.daemon.manager.admission import limits_for
from llmd.daemon.manager.state import Instance, State, engine_log_path
from llmd.daemon.models.remote_gguf import headers_before_download
from llmd.daemon.placement.scheduler import NoFit
from llmd.daemon.util.redact import mask_argv

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

# How much of the end of a loading engine's log is searched for its progress.
PROGRESS_LOG_LINES = 5


def status(manager: Manager) -> list[dict[str, Any]]:
    """What `llmctl ps` shows: one entry per model that has run since startup."""
    now = time.monotonic()
    rows = []
    for name, inst in sorted(manager.instances.items()):
        engine = inst.engine
        placement = inst.placement if engine is not None else None
        rows.append(
            {
                "model": name,
                "engine": inst.profile.engine,
                "state": inst.state.value,
                "pid": engine.pid if engine else None,
                "port": engine.port if engine else None,
                "uptime_s": round(now - engine.started_monotonic, 1) if engine else None,
                "idle_s": _idle_seconds(inst, now),
                "in_flight": inst.in_flight,
                # Admission (see `admission`): slots taken, of `slots`, and requests queued for one.
                "slots_busy": inst.gate.active,
                "slots": limits_for(inst.profile)[0],
                "queued": inst.gate.queued,
                "argv": mask_argv(engine.argv) if engine else None,
                "gpus": [share.index for share in placement.gpus] if placement else [],
                "vram_mib": sum(inst.claimed().values()) if placement else 0,
                # Parked engines keep their weights in host RAM instead.
                "host_ram_mib": inst.spec.sleep.host_ram_mib if inst.parked is not None and inst.spec and inst.spec.sleep else 0,
                "sleep_mode": bool(inst.spec is not None and inst.spec.sleep is not None),
                # The engine's share of the cores (one thread each) and the host RAM the plan
                # reserved for what it keeps in host memory (see `cpu_plan`).
                "cpu_cores": list(placement.cpu_cores) if placement else [],
                "ram_mib": placement.host_mib if placement else 0,
                "gpu_layers": placement.gpu_layers if placement else None,
                "cpu_moe_layers": placement.cpu_moe_layers if placement else 0,
                # Each device's share: planned, and what the engine reported allocating there.
                "devices": device_shares(manager, inst) if placement and engine else [],
                "placement": placement.reason if placement else None,
                "load_s": round(inst.load_seconds, 3) if inst.load_seconds is not None and engine else None,
                "wake_s": round(inst.wake_seconds, 3) if inst.wake_seconds is not None and engine else None,
                # The prompt cache saved on disk for the next start (persist_kv), and what the
                # running engine got back from it when it started.
                "kv_saved_tokens": manager.kv.saved(name)[0],
                "kv_saved_bytes": manager.kv.saved(name)[1],
                "kv_restored_tokens": manager.kv.restored_tokens(name) if engine else 0,
                "progress": progress_of(manager, inst) or None,
                "error": inst.error,
                # The profile's file is invalid: the model runs on its last good version.
                "profile_error": inst.profile_error,
                "log": str(engine_log_path(manager.config, name)),
            }
        )
    return rows


def device_shares(manager: Manager, inst: Instance) -> list[dict[str, Any]]:
    """The model's share of each device of its placement: the MiB and layers planned there, and
    what its engine reported allocating (weights, KV cache, compute; None until it has said).
    Host memory the engine reported comes last, as index -1."""
    assert inst.placement is not None and inst.engine is not None
    reported = manager.planner.reports.get(inst.name)
    allocations = {item.index: item for item in reported[1]} if reported and reported[0] == inst.engine.pid else {}
    names = {gpu.index: gpu.name for gpu in manager.planner.snapshot()}
    rows = []
    for share in inst.placement.gpus:
        rows.append({
            "index": share.index, "name": names.get(share.index, ""), "endpoint": share.endpoint or None,
            "planned_mib": share.vram_mib, "layers": share.layers or None,
            "reported": _reported(allocations.get(share.index)),
        })
    host = allocations.get(HOST_MEMORY)
    if host is not None:
        rows.append({"index": HOST_MEMORY, "name": "host", "endpoint": None, "planned_mib": None,
                     "layers": None, "reported": _reported(host)})
    return rows


def _reported(item: DeviceAllocation | None) -> dict[str, float] | None:
    if item is None:
        return None
    return {"model_mib": item.model_mib, "kv_mib": item.kv_mib, "compute_mib": item.compute_mib,
            "total_mib": round(item.total_mib, 2)}


def _idle_seconds(inst: Instance, now: float) -> float | None:
    if inst.state not in (State.READY, State.SLEEPING):
        return None
    return 0.0 if inst.in_flight else round(now - inst.last_used, 1)


def progress_of(manager: Manager, inst: Instance, log_tail: list[str] | None = None) -> str:
    """What the model is doing now; while its engine loads, what the engine's log says of it.

    `log_tail`: the end of the engine's log when the caller has just read it, so that it is
    not read again."""
    if inst.state is State.STARTING and inst.engine is not None and inst.parked is None:
        driver = manager.drivers.get(inst.profile.engine)
        if driver is not None:
            lines = log_tail if log_tail is not None else inst.engine.log_tail(PROGRESS_LOG_LINES)
            for line in reversed(lines[-PROGRESS_LOG_LINES:]):
                said = load_progress(driver, line)
                if said:
                    return f"{inst.progress}: {said}"
    return inst.progress


def load_report(manager: Manager, inst: Instance) -> tuple[str, str]:
    """(what the model is doing, the last line of its engine's log) for a load's progress
    events, from one read of the log."""
    tail = inst.engine.log_tail(PROGRESS_LOG_LINES) if inst.engine is not None else []
    return progress_of(manager, inst, tail), (tail[-1] if tail else "")


async def plan_preview(manager: Manager, name: str, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What loading `name` now would do, without doing it: for `llmctl plan`.

    A Hugging Face GGUF that is not downloaded yet is planned from its header, read from the
    Hub with range requests (`on_progress` hears how that goes, from a worker thread); any
    other model from its files on disk."""
    inst = manager.instance(name)
    loader = manager.loader
    profile = inst.profile
    model = await headers_before_download(profile.model, manager.config.server.state_dir, on_progress)
    if model is None:
        model = loader.local_model_path(profile)
    result, details = manager.planner.place(profile, model, loader.running_except(inst))
    report: dict[str, Any] = {"model": inst.name, "state": inst.state.value, **details}
    if isinstance(result, NoFit):
        report.update({"fits": False, "reason": result.reason})
        return report
    placement = result.placement
    report.update({
        "fits": True,
        "reason": result.reason,
        "gpus": [{"index": s.index, "uuid": s.uuid, "vram_mib": s.vram_mib} for s in placement.gpus],
        "gpu_layers": placement.gpu_layers,
        "cpu_moe_layers": placement.cpu_moe_layers,
        "cpu_cores": list(placement.cpu_cores),
        "ram_mib": placement.host_mib,
        "ctx": placement.ctx,
        "evict": list(result.evict),
    })
    return report


def gpu_report(manager: Manager) -> dict[str, Any]:
    """Each card with its memory, which of llmd's models claims how much of it, and its
    telemetry (temperature, power, ...: None where the card gives no reading)."""
    planner = manager.planner
    cards = []
    claims: dict[int, list[dict[str, Any]]] = {}
    ours: set[int] = set()
    for inst in manager.instances.values():
        if inst.placement is None:
            continue
        for index, mib in inst.claimed().items():
            claims.setdefault(index, []).append({"model": inst.name, "vram_mib": mib, "state": inst.state.value})
        if inst.engine is not None:
            ours |= process_tree(inst.engine.pid)
    for gpu in planner.snapshot(telemetry=True):
        foreign = sum(p.used_mib for p in gpu.processes if p.pid not in ours)
        cards.append({
            "index": gpu.index, "uuid": gpu.uuid, "name": gpu.name,
            "total_mib": gpu.total_mib, "free_mib": gpu.free_mib, "used_mib": gpu.used_mib,
            "models": sorted(claims.get(gpu.index, []), key=lambda c: c["model"]),
            "foreign_mib": 0 if planner.simulated or gpu.remote else foreign,
            # "local", or "rpc" for a device of another machine at `endpoint`, which may not
            # answer (`reachable`); `status` says what the last look at it found.
            "kind": gpu.kind, "endpoint": gpu.endpoint or None, "reachable": gpu.reachable,
            "status": gpu.status or None,
            **gpu.telemetry.as_dict(),
        })
    return {"note": planner.inventory.note, "gpus": cards}


def model_cards(manager: Manager, name: str) -> list[int]:
    """The cards (by index) the model `name` is placed on now; none when it is not placed.
    Called for every reply that generated tokens (the metrics' energy per token): no I/O."""
    inst = manager.instances.get(name)
    if inst is None or inst.placement is None:
        return []
    return [share.index for share in inst.placement.gpus]


def log_tail(manager: Manager, name: str, lines: int) -> list[str]:
    """The last `lines` lines of the engine log of the model `name` (or an alias of it)."""
    return tail_lines(engine_log_path(manager.config, manager.resolve(name).name), lines)
