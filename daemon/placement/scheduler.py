"""Placement and eviction: pure functions from (model need, cards, running models) to a plan.

Nothing here starts processes or reads devices, so every branch is unit-testable and the same
input always yields the same plan. The manager feeds in an inventory snapshot and its own
instance table, then carries out the plan.

Room on a card is the smaller of two ledgers:

- llmd's ledger: the card's total minus what llmd's running models claim on it. It catches
  the engine that was just started and has not allocated its memory yet.
- the live ledger: the free memory NVML reports, minus a safety margin. It catches every other
  program on the card (a desktop, a game, another user's job).

Evicting a model gives back its claim in both ledgers; evicting one that can be parked (an
engine put to sleep, see `RunningModel.parked_gpus`) gives back its claim less what it keeps.

The search, in order of preference:

1. the whole model on one card (best fit: the card with the least room that still fits);
2. tensor parallel over N cards, when the profile allows it and the head counts divide by N;
3. CPU offload, when the profile allows it (whole layers, or MoE expert tensors);
4. the same shapes again after evicting idle, unpinned models, lowest priority and least
   recently used first.

A model with requests in flight, or a pinned one, is never evicted.

Then the CPU side (`cpu_plan`), when the caller gives the host: the cores of an engine that
computes on the CPU, and the host RAM of what stays in host memory, a ledger like a card's.

Devices on other machines (llama.cpp RPC, `GpuInfo.remote`) take only models whose engine can
use them (`ModelNeed.remote_devices`), only while they answer, and one model at a time: an RPC
server serves one client, so a model on it holds all of it. They pay no CUDA context on this
machine. An engine that splits whole layers over its devices (`ModelNeed.layer_split`,
llama.cpp) is sized device by device, the way it will place its layers; and a placement it was
measured on before (`ModelNeed.measured`) is planned with the measured figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from llmd.drivers.base import GpuShare, Placement

from llmd.daemon.placement.cpu_plan import plan_cpu_side
from llmd.daemon.placement.estimate import GPU_OVERHEAD_MIB, split_compute_bytes
from llmd.drivers.estimate import ComputeParts
from llmd.daemon.placement.host import HostInfo
from llmd.daemon.placement.inventory import GpuInfo

if TYPE_CHECKING:
    from llmd.daemon.placement.estimate import Estimate
    from llmd.daemon.models.profiles import Profile

__all__ = [
    "DEFAULT_MARGIN_MIB",
    "MeasuredSplit",
    "ModelNeed",
    "NoFit",
    "Plan",
    "RunningModel",
    "need_for_profile",
    "plan",
]

# Headroom kept free on every card in the live ledger: allocator slack, a growing desktop
# session, a second CUDA context from a monitoring tool.
DEFAULT_MARGIN_MIB = 512

_MIB = 1024 * 1024

OffloadRule = Literal["none", "auto", "moe-experts"] | int


@dataclass(frozen=True)
class MeasuredSplit:
    """What the engine itself reported allocating at its last launch, and on which placement:
    the devices (by uuid, in placement order), the layers on them (None: all) and the layers
    whose MoE experts stayed on the CPU. `mib` is what to reserve on each device for the same
    placement, slack included, without the CUDA context (no engine reports it)."""

    devices: tuple[str, ...]
    gpu_layers: int | None
    cpu_moe: int
    mib: tuple[int, ...]


@dataclass(frozen=True)
class ModelNeed:
    """What a model needs, in MiB, and what its profile allows.

    Per-layer numbers let the scheduler price partial offload; `n_head` and `n_head_kv` decide
    which tensor-parallel widths are legal (0 means unknown, which allows any width).
    `moe_expert_mib[i]` is the part of `layer_mib[i]` that MoE expert tensors take.
    `overhead_mib` is paid once on every card used (CUDA context and its runtime).
    """

    name: str
    layer_mib: tuple[float, ...]
    non_layer_mib: float
    kv_per_layer_mib: float
    compute_mib: float
    n_layers: int
    n_head: int = 0
    n_head_kv: int = 0
    moe_expert_mib: tuple[float, ...] = ()
    overhead_mib: float = GPU_OVERHEAD_MIB
    tensor_parallel: int | Literal["auto"] = 1
    offload: OffloadRule = "none"
    # Card indices the profile allows; None means any card.
    allowed_gpus: tuple[int, ...] | None = None
    ctx: int = 4096
    # How the engine uses devices (see `llmd.drivers.base.splits_heads` and
    # `offload_computes_on_cpu`): whether a tensor-parallel width must divide the heads, and
    # whether layers kept in host memory are computed on the CPU (and so need cores).
    splits_heads: bool = True
    offload_on_cpu: bool = True
    # `[launch] threads`: the cores (one thread each) asked for on the CPU; None: an even share.
    threads: int | None = None
    # The engine can use devices on other machines (llama.cpp RPC).
    remote_devices: bool = False
    # Over several devices, the engine gives each whole layers (llama.cpp's layer split, the
    # output layer counted as one more), keeps the input embeddings on the CPU and puts the
    # output head (`output_mib` of `non_layer_mib`; 0: unknown, all of it) on the last device.
    layer_split: bool = False
    output_mib: float = 0.0
    # The compute buffer in parts, to size it device by device in a layer split (None: the
    # whole `compute_mib` on each device).
    compute_parts: ComputeParts | None = None
    measured: MeasuredSplit | None = None

    def __post_init__(self) -> None:
        if len(self.layer_mib) != self.n_layers:
            raise ValueError(f"{self.name}: layer_mib has {len(self.layer_mib)} entries for {self.n_layers} layers")
        if self.moe_expert_mib and len(self.moe_expert_mib) != self.n_layers:
            raise ValueError(f"{self.name}: moe_expert_mib needs one entry per layer ({self.n_layers})")
        if isinstance(self.tensor_parallel, int) and self.tensor_parallel < 1:
            raise ValueError(f"{self.name}: tensor_parallel must be at least 1")
        if isinstance(self.offload, int) and self.offload < 0:
            raise ValueError(f"{self.name}: offload must not be negative")

    @classmethod
    def fixed(
        cls,
        name: str,
        vram_mib: int,
        *,
        tensor_parallel: int | Literal["auto"] = 1,
        allowed_gpus: tuple[int, ...] | None = None,
        ctx: int = 4096,
        threads: int | None = None,
    ) -> ModelNeed:
        """A need the user stated (`placement.vram_mib`): a total over all cards, everything included.

        Without per-layer sizes there is nothing to offload, so only whole placements are tried.
        """
        return cls(
            name=name,
            layer_mib=(),
            non_layer_mib=float(vram_mib),
            kv_per_layer_mib=0.0,
            compute_mib=0.0,
            n_layers=0,
            overhead_mib=0.0,
            tensor_parallel=tensor_parallel,
            allowed_gpus=allowed_gpus,
            ctx=ctx,
            threads=threads,
        )

    @property
    def total_mib(self) -> int:
        """Everything on one card: what `llmctl plan` reports as the model's size."""
        return math.ceil(sum(self.layer_mib) + self.non_layer_mib + self.kv_per_layer_mib * self.n_layers
                         + self.compute_mib + self.overhead_mib)


@dataclass(frozen=True)
class RunningModel:
    """A model llmd runs now, and the MiB it claims on each card (by index)."""

    name: str
    gpus: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    pinned: bool = False
    priority: int = 0
    last_used: float = 0.0
    # What stays on each card when eviction parks this model (an engine asleep keeps its CUDA
    # context) instead of stopping it; None: evicting it stops it and frees its whole claim.
    parked_gpus: dict[int, int] | None = None
    # The cores it computes on (empty: none of its own), and the host RAM it claims: what it
    # keeps in host memory, or a parked engine's weights. `parked_host_mib`: what it would claim
    # once parked (with `parked_gpus`).
    cpu_cores: tuple[int, ...] = ()
    host_mib: int = 0
    parked_host_mib: int = 0

    @property
    def evictable(self) -> bool:
        return self.in_flight == 0 and not self.pinned

    def frees_host(self) -> int:
        """MiB of host RAM that evicting this model gives back: negative when parking it moves
        its weights into host memory."""
        kept = self.parked_host_mib if self.parked_gpus is not None else 0
        return self.host_mib - kept

    def frees(self, index: int) -> int:
        """MiB that evicting this model gives back on card `index`."""
        kept = self.parked_gpus.get(index, 0) if self.parked_gpus is not None else 0
        return max(0, self.gpus.get(index, 0) - kept)


@dataclass(frozen=True)
class Plan:
    """Stop the models in `evict` (in that order), then launch with `placement`."""

    placement: Placement
    evict: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class NoFit:
    """No placement exists now; `reason` says what was needed and what stood in the way."""

    reason: str


# ---------------------------------------------------------------------------------------------
# Building a need from a profile


def need_for_profile(profile: Profile, estimate: Estimate | None) -> ModelNeed:
    """The scheduler's view of `profile`.

    `placement.vram_mib` is honoured here: when set, the estimate is ignored (it may be None),
    because the user's number is the better truth for models the estimator misjudges.
    """
    launch = profile.launch
    allowed = tuple(sorted(set(profile.placement.gpus))) if profile.placement.gpus is not None else None
    if profile.placement.vram_mib is not None:
        return ModelNeed.fixed(
            profile.name,
            profile.placement.vram_mib,
            tensor_parallel=launch.tensor_parallel,
            allowed_gpus=allowed,
            ctx=launch.ctx,
            threads=launch.threads,
        )
    if estimate is None:
        raise ValueError(f"{profile.name}: no estimate and no placement.vram_mib to place it by")
    n_layers = estimate.n_layers
    return ModelNeed(
        name=profile.name,
        layer_mib=tuple(b / _MIB for b in estimate.layer_bytes),
        non_layer_mib=estimate.non_layer_bytes / _MIB,
        kv_per_layer_mib=(estimate.kv_bytes / n_layers / _MIB) if n_layers else estimate.kv_bytes / _MIB,
        compute_mib=estimate.compute_bytes / _MIB,
        n_layers=n_layers,
        n_head=estimate.n_head,
        n_head_kv=estimate.n_head_kv,
        moe_expert_mib=tuple(b / _MIB for b in estimate.moe_expert_bytes) if any(estimate.moe_expert_bytes) else (),
        overhead_mib=estimate.gpu_overhead_mib,
        output_mib=estimate.output_bytes / _MIB,
        compute_parts=estimate.compute_parts,
        tensor_parallel=launch.tensor_parallel,
        offload=launch.offload,
        allowed_gpus=allowed,
        ctx=launch.ctx,
        threads=launch.threads,
    )


# ---------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class _Card:
    index: int
    uuid: str
    name: str
    total: int
    # Room now: the smaller of the two ledgers (may be negative on an overcommitted card).
    room: int
    # Room if every evictable model on this card stopped.
    potential: int
    # The per-card overhead this device does not pay (an RPC device has no CUDA context here),
    # counted into `room` and `potential` so that every card is compared with the same need.
    credit: int = 0
    endpoint: str = ""

    @property
    def label(self) -> str:
        return f"GPU{self.index}" + (f" (RPC {self.endpoint})" if self.endpoint else "")


@dataclass(frozen=True)
class _Shape:
    """How much of the model sits on the GPUs: the last `gpu_layers` layers, minus the MoE
    experts of the first `cpu_moe` layers, split evenly over `width` cards."""

    gpu_layers: int
    cpu_moe: int
    width: int
    per_card: int


class _Sizer:
    """Per-card MiB for a shape; prefix sums make each query O(1)."""

    def __init__(self, need: ModelNeed) -> None:
        self.need = need
        self._layer_split = need.layer_split and need.n_layers > 0
        n = need.n_layers
        self._layer_suffix = [0.0] * (n + 1)  # _layer_suffix[g] = MiB of the last g layers
        for g in range(1, n + 1):
            self._layer_suffix[g] = self._layer_suffix[g - 1] + need.layer_mib[n - g]
        experts = need.moe_expert_mib or (0.0,) * n
        self._expert_prefix = [0.0] * (n + 1)  # _expert_prefix[c] = expert MiB of the first c layers
        for c in range(1, n + 1):
            self._expert_prefix[c] = self._expert_prefix[c - 1] + experts[c - 1]

    def per_card(self, gpu_layers: int, cpu_moe: int, width: int) -> int:
        need = self.need
        if self._layer_split and width > 1:
            return math.ceil(max(self.split(gpu_layers, cpu_moe, width)[1]) + need.overhead_mib)
        on_gpu = self._layer_suffix[gpu_layers] - self._expert_prefix[cpu_moe]
        on_gpu += need.kv_per_layer_mib * gpu_layers
        if gpu_layers or need.n_layers == 0:
            # Output head and embeddings: counted whole on the GPU side, which overstates
            # partial offload a little (llama.cpp keeps the input embeddings on the CPU).
            on_gpu += need.non_layer_mib
        return math.ceil(on_gpu / width + need.compute_mib + need.overhead_mib)

    def shape(self, gpu_layers: int, cpu_moe: int, width: int) -> _Shape:
        return _Shape(gpu_layers, cpu_moe, width, self.per_card(gpu_layers, cpu_moe, width))

    def splits_layers(self, width: int) -> bool:
        return self._layer_split and width > 1

    def _device_compute(self, layers: list[int], *, holds_output: bool, pipelined: bool) -> float:
        """The compute buffer of a device that runs `layers` (and the output head)."""
        need = self.need
        if need.compute_parts is None:
            return need.compute_mib
        return split_compute_bytes(
            need.compute_parts, first=bool(layers) and layers[0] == 0, holds_output=holds_output,
            layers=len(layers), last_layer=bool(layers) and layers[-1] == need.n_layers - 1, pipelined=pipelined,
        ) / _MIB

    def split(self, gpu_layers: int, cpu_moe: int, width: int) -> tuple[list[int], list[float]]:
        """How a layer-splitting engine spreads the shape over `width` devices: the layers on
        each (the output layer counted as one, as llama.cpp's `-ngl` and `--tensor-split` count
        it) and the MiB on each, before the per-card overhead.

        With `-ngl g` below the layer count, llama.cpp offloads the output layer and the last
        g - 1 layers; with all of them, n + 1 units. Device j takes the next `counts[j]` units,
        the first devices one more when they do not divide evenly, so the device that also
        holds the output head has the fewest layers. Each device runs the graph of its own
        layers: its compute buffer is counted on each.
        """
        need = self.need
        n = need.n_layers
        units = n + 1 if gpu_layers >= n else gpu_layers
        first = n + 1 - units  # the first layer on the devices
        counts = [units // width + (1 if j < units % width else 0) for j in range(width)]
        experts = need.moe_expert_mib or (0.0,) * n
        output = need.output_mib or need.non_layer_mib
        # llama.cpp pipelines micro-batches over the devices when all layers are on them and no
        # tensor is kept elsewhere by name (as --n-cpu-moe does).
        pipelined = units == n + 1 and cpu_moe == 0
        sizes = []
        unit = 0
        for count in counts:
            layers = [first + u for u in range(unit, unit + count) if first + u < n]
            mib = self._device_compute(layers, holds_output=unit + count == units, pipelined=pipelined)
            for u in range(unit, unit + count):
                layer = first + u
                if layer >= n:
                    mib += output
                    continue
                mib += need.layer_mib[layer] + need.kv_per_layer_mib
                if layer < cpu_moe:
                    mib -= experts[layer]
            sizes.append(mib)
            unit += count
        return counts, sizes


def plan(
    need: ModelNeed,
    gpus: Sequence[GpuInfo],
    running: Sequence[RunningModel],
    margin_mib: int = DEFAULT_MARGIN_MIB,
    *,
    host: HostInfo | None = None,
    suggest: bool = True,
) -> Plan | NoFit:
    """Where to run `need`, and which idle models to stop first; or why it cannot run now.

    `running` is every model llmd runs now (not including `need` itself). Deterministic: ties
    are broken by explicit keys, ending in card indices and model names. With `suggest`, a
    NoFit names the profile settings that would make it fit now (each tried by planning with it).
    With `host`, the plan also gives an engine that computes on the CPU its cores and checks
    host RAM (see `cpu_plan`); without, it places on the cards only.
    """
    result = _plan_devices(need, gpus, running, margin_mib, suggest=suggest)
    if host is None or isinstance(result, NoFit):
        return result
    placement = result.placement
    if placement.cpu_only and isinstance(need.tensor_parallel, int) and need.tensor_parallel > 1 \
            and need.splits_heads and (need.n_head % need.tensor_parallel or need.n_head_kv % need.tensor_parallel):
        return NoFit(f"cannot place {need.name} on the CPU: tensor_parallel = {need.tensor_parallel} does not "
                     f"divide the heads ({need.n_head} query, {need.n_head_kv} KV)")
    side = plan_cpu_side(need, placement, result.evict, running, host)
    if isinstance(side, str):
        return NoFit(f"cannot place {need.name}: {side}")
    reason = "; ".join(part for part in (result.reason, side.note) if part)
    placement = replace(placement, cpu_cores=side.cpu_cores, host_mib=side.host_mib,
                        cpu_tensor_parallel=side.cpu_tensor_parallel, reason=reason)
    return Plan(placement, result.evict + side.evict, reason)


def _plan_devices(
    need: ModelNeed, gpus: Sequence[GpuInfo], running: Sequence[RunningModel], margin_mib: int, *, suggest: bool
) -> Plan | NoFit:
    """`plan` on the cards alone."""
    if not gpus:
        reason = "no GPUs in the inventory: running on the CPU"
        return Plan(Placement(gpu_layers=0, ctx=need.ctx, reason=reason), (), reason)
    if need.allowed_gpus is not None and not need.allowed_gpus:
        reason = "placement.gpus is empty: running on the CPU"
        return Plan(Placement(gpu_layers=0, ctx=need.ctx, reason=reason), (), reason)
    if any(gpu.kind != "local" or not gpu.reachable for gpu in gpus):
        usable = [gpu for gpu in gpus if gpu.reachable and (need.remote_devices or not gpu.remote)]
        if not usable:
            reason = f"no device it can use ({_unusable(need, gpus)}): running on the CPU"
            return Plan(Placement(gpu_layers=0, ctx=need.ctx, reason=reason), (), reason)
        gpus = usable
        running = _holding_whole_remote_devices(running, gpus)

    cards = _cards(need, gpus, running, margin_mib)
    if not cards:
        present = ", ".join(str(g.index) for g in sorted(gpus, key=lambda g: g.index))
        return NoFit(
            f"cannot place {need.name}: placement.gpus {list(need.allowed_gpus or ())} names no card "
            f"in the inventory (cards present: {present})"
        )

    base_layers = need.n_layers
    if isinstance(need.offload, int):
        base_layers = max(0, need.n_layers - need.offload)
        if need.n_layers and base_layers == 0:
            reason = f"offload = {need.offload} keeps all {need.n_layers} layers on the CPU"
            return Plan(Placement(gpu_layers=0, ctx=need.ctx, reason=reason), (), reason)

    sizer = _Sizer(need)
    if need.measured is not None:
        again = _measured_again(need, need.measured, cards, base_layers)
        if again is not None:
            return again
    widths = _tp_widths(need, len(cards))
    evictable = sorted(
        (m for m in running if m.evictable),
        key=lambda m: (m.priority, m.last_used, m.name),
    )
    by_index = {card.index: card for card in cards}

    # 1-3: no eviction.
    found = _whole(need, sizer, cards, widths, base_layers)
    if found is None:
        found = _offloaded(need, sizer, cards, widths, base_layers, use_potential=False)
    if found is not None:
        shape, group = found
        return _make_plan(sizer, shape, group, ())

    # 4: the same shapes, after stopping idle models.
    best = _whole_with_eviction(sizer, cards, widths, base_layers, evictable)
    if best is None:
        best = _offloaded_with_eviction(need, sizer, cards, widths, base_layers, evictable)
    if best is not None:
        shape, group, evicted = best
        return _make_plan(sizer, shape, group, evicted)

    hints = _fitting_hints(need, gpus, running, margin_mib) if suggest else []
    return NoFit(_no_fit_reason(need, sizer, by_index, widths, base_layers, running, margin_mib, hints))


def _fitting_hints(need: ModelNeed, gpus: Sequence[GpuInfo], running: Sequence[RunningModel], margin: int) -> list[str]:
    """The settings the profile could allow that would make `need` fit now, one at a time, else
    together: each is planned with, so that only a change that really fits is suggested."""
    candidates: list[tuple[str, dict[str, object]]] = []
    if need.tensor_parallel == 1 and len(gpus) > 1:
        candidates.append(('tensor_parallel = "auto"', {"tensor_parallel": "auto"}))
    if need.offload == "none" and need.n_layers:
        candidates.append(('offload = "auto"', {"offload": "auto"}))

    def fits(change: dict[str, object]) -> bool:
        return isinstance(plan(replace(need, **change), gpus, running, margin, suggest=False), Plan)  # type: ignore[arg-type]

    hints = [text for text, change in candidates if fits(change)]
    if not hints and len(candidates) > 1 and fits({key: value for _, change in candidates for key, value in change.items()}):
        hints.append(" and ".join(text for text, _ in candidates))
    return hints


def _unusable(need: ModelNeed, gpus: Sequence[GpuInfo]) -> str:
    """Why none of `gpus` takes `need`: all are RPC devices its engine cannot use, or do not answer."""
    why = []
    if not need.remote_devices and any(gpu.remote for gpu in gpus):
        why.append("its engine cannot use RPC devices")
    down = [gpu.endpoint for gpu in gpus if gpu.remote and not gpu.reachable]
    if down:
        why.append("RPC device " + ", ".join(down) + (" does" if len(down) == 1 else " do") + " not answer")
    return "; ".join(why) or "none is usable"


def _holding_whole_remote_devices(running: Sequence[RunningModel], gpus: Sequence[GpuInfo]) -> list[RunningModel]:
    """`running`, each model on an RPC device claiming all of it: the server serves one engine
    at a time, so nothing else fits beside it, and stopping it frees the whole device."""
    whole = {gpu.index: gpu.total_mib for gpu in gpus if gpu.remote}
    if not whole:
        return list(running)
    held = []
    for model in running:
        if any(index in whole and mib > 0 for index, mib in model.gpus.items()):
            gpus_held = {i: (max(mib, whole[i]) if i in whole and mib > 0 else mib) for i, mib in model.gpus.items()}
            model = replace(model, gpus=gpus_held)
        held.append(model)
    return held


def _measured_again(need: ModelNeed, measured: MeasuredSplit, cards: Sequence[_Card], layers: int) -> Plan | None:
    """The placement the engine was measured on, with the measured figures, when each of its
    devices has room for them now and the profile still allows its shape; else None."""
    by_uuid = {card.uuid: card for card in cards}
    group = [by_uuid.get(uuid) for uuid in measured.devices]
    if not group or any(card is None for card in group) or len(measured.mib) != len(group):
        return None
    width = len(group)
    if width > 1 and need.tensor_parallel not in ("auto", width):
        return None
    whole = need.n_layers == 0 or layers >= need.n_layers
    shape_allowed = (measured.gpu_layers is None and whole) or measured.gpu_layers == layers or need.offload == "auto"
    if not shape_allowed or (measured.cpu_moe and need.offload != "moe-experts"):
        return None
    overhead = math.ceil(need.overhead_mib)
    wanted = [mib + overhead for mib in measured.mib]
    if any(card.room < mib for card, mib in zip(group, wanted)):  # type: ignore[union-attr]
        return None
    cards_used = tuple(card for card in group if card is not None)
    shares = tuple(
        GpuShare(index=c.index, uuid=c.uuid, vram_mib=mib - c.credit, total_mib=c.total, endpoint=c.endpoint,
                 layers=_measured_layers(need, measured, len(cards_used), j))
        for j, (c, mib) in enumerate(zip(cards_used, wanted))
    )
    where = " + ".join(f"{c.label} {s.vram_mib} MiB" for c, s in zip(cards_used, shares))
    reason = f"on {where}, as the engine reported at its last launch on them"
    if measured.gpu_layers is not None and need.n_layers:
        reason += f"; {measured.gpu_layers} of {need.n_layers} layers on GPU, the rest on the CPU"
    if measured.cpu_moe:
        reason += f"; MoE experts of {measured.cpu_moe} of {need.n_layers} layers on the CPU"
    placement = Placement(gpus=shares, gpu_layers=measured.gpu_layers, cpu_moe_layers=measured.cpu_moe,
                          ctx=need.ctx, reason=reason)
    return Plan(placement, (), reason)


def _measured_layers(need: ModelNeed, measured: MeasuredSplit, width: int, j: int) -> int:
    """The layers device j took at the measured launch (the same split is asked for again)."""
    if width < 2 or not need.layer_split or not need.n_layers:
        return 0
    gpu_layers = need.n_layers if measured.gpu_layers is None else measured.gpu_layers
    return _Sizer(need).split(gpu_layers, measured.cpu_moe, width)[0][j]


def _cards(need: ModelNeed, gpus: Sequence[GpuInfo], running: Sequence[RunningModel], margin: int) -> list[_Card]:
    claims: dict[int, int] = {}
    evictable_claims: dict[int, int] = {}
    for model in running:
        for index, mib in model.gpus.items():
            claims[index] = claims.get(index, 0) + mib
            if model.evictable:
                evictable_claims[index] = evictable_claims.get(index, 0) + model.frees(index)
    allowed = set(need.allowed_gpus) if need.allowed_gpus is not None else None
    cards = []
    for gpu in sorted(gpus, key=lambda g: g.index):
        if allowed is not None and gpu.index not in allowed:
            continue
        keep = margin if gpu.margin_mib is None else gpu.margin_mib
        credit = math.ceil(need.overhead_mib) if gpu.kind == "rpc" else 0
        room = min(gpu.total_mib - claims.get(gpu.index, 0), gpu.free_mib - keep) + credit
        cards.append(
            _Card(gpu.index, gpu.uuid, gpu.name, gpu.total_mib, room, room + evictable_claims.get(gpu.index, 0),
                  credit, gpu.endpoint)
        )
    return cards


def _tp_widths(need: ModelNeed, n_cards: int) -> list[int]:
    """Legal multi-card widths, smallest first. Attention heads must split evenly over cards."""
    if need.tensor_parallel == "auto":
        candidates = []
        width = 2
        while width <= n_cards:
            candidates.append(width)
            width *= 2
    elif need.tensor_parallel > 1:
        candidates = [need.tensor_parallel] if need.tensor_parallel <= n_cards else []
    else:
        candidates = []
    if not need.splits_heads:  # a split by layers (llama.cpp) takes any width
        return candidates
    return [w for w in candidates if need.n_head % w == 0 and need.n_head_kv % w == 0]


def _single_allowed(need: ModelNeed) -> bool:
    return need.tensor_parallel in (1, "auto")


def _groups(cards: Sequence[_Card], width: int, score: dict[int, int]) -> list[tuple[_Card, ...]]:
    """Candidate card sets of `width` cards, best first.

    Equal cards first (tensor parallel runs at the pace of the smallest card, and vLLM splits
    evenly), smallest card size first so big cards stay free for big models; within a size,
    the cards with the most room by `score`. Then one mixed set: the `width` roomiest cards.
    """
    by_size: dict[int, list[_Card]] = {}
    for card in cards:
        by_size.setdefault(card.total, []).append(card)
    groups: list[tuple[_Card, ...]] = []
    for size in sorted(by_size):
        same = sorted(by_size[size], key=lambda c: (-score[c.index], c.index))
        if len(same) >= width:
            groups.append(tuple(sorted(same[:width], key=lambda c: c.index)))
    if len(cards) >= width:
        mixed = tuple(sorted(sorted(cards, key=lambda c: (-score[c.index], c.index))[:width], key=lambda c: c.index))
        if mixed not in groups:
            groups.append(mixed)
    return groups


def _whole(
    need: ModelNeed, sizer: _Sizer, cards: Sequence[_Card], widths: Sequence[int], layers: int
) -> tuple[_Shape, tuple[_Card, ...]] | None:
    """Steps 1 and 2: the whole model (or its fixed `offload = N` shape) without eviction."""
    if _single_allowed(need):
        shape = sizer.shape(layers, 0, 1)
        fitting = [c for c in cards if c.room >= shape.per_card]
        if fitting:
            best = min(fitting, key=lambda c: (c.room, c.index))
            return shape, (best,)
    for width in widths:
        shape = sizer.shape(layers, 0, width)
        fitting = [c for c in cards if c.room >= shape.per_card]
        if len(fitting) < width:
            continue
        # Among the cards that fit, prefer the tightest ones, so roomy cards stay free.
        score = {c.index: -c.room for c in fitting}
        return shape, _groups(fitting, width, score)[0]
    return None


def _offload_width(need: ModelNeed) -> int:
    return need.tensor_parallel if isinstance(need.tensor_parallel, int) else 1


def _offload_shapes(need: ModelNeed, sizer: _Sizer, room: int, width: int, layers: int) -> _Shape | None:
    """The best offload shape whose per-card need fits in `room`, or None.

    "auto": the most GPU layers that fit (llama.cpp keeps the first layers on the CPU).
    "moe-experts": the fewest layers whose expert tensors move to the CPU.
    """
    if need.n_layers == 0:
        return None
    if need.offload == "auto":
        for gpu_layers in range(layers - 1, 0, -1):
            if sizer.per_card(gpu_layers, 0, width) <= room:
                return sizer.shape(gpu_layers, 0, width)
        return None
    if need.offload == "moe-experts" and need.moe_expert_mib:
        for cpu_moe in range(1, need.n_layers + 1):
            if sizer.per_card(layers, cpu_moe, width) <= room:
                return sizer.shape(layers, cpu_moe, width)
    return None


def _shape_rank(shape: _Shape) -> tuple[int, int]:
    """Lower is better: more GPU layers, then fewer expert layers on the CPU."""
    return (-shape.gpu_layers, shape.cpu_moe)


def _offloaded(
    need: ModelNeed,
    sizer: _Sizer,
    cards: Sequence[_Card],
    widths: Sequence[int],
    layers: int,
    use_potential: bool,
) -> tuple[_Shape, tuple[_Card, ...]] | None:
    """Step 3: the most of the model on GPUs that fits on one card (or on the fixed TP width)."""
    if need.offload not in ("auto", "moe-experts"):
        return None
    width = _offload_width(need)
    if width > len(cards) or (width > 1 and width not in widths):
        return None
    score = {c.index: (c.potential if use_potential else c.room) for c in cards}
    best: tuple[tuple, _Shape, tuple[_Card, ...]] | None = None
    for group in ([(c,) for c in cards] if width == 1 else _groups(cards, width, score)):
        room = min(score[c.index] for c in group)
        shape = _offload_shapes(need, sizer, room, width, layers)
        if shape is None:
            continue
        key = (_shape_rank(shape), room, tuple(c.index for c in group))
        if best is None or key < best[0]:
            best = (key, shape, group)
    return None if best is None else (best[1], best[2])


def _evict_for(
    group: Sequence[_Card], per_card: int, evictable: Sequence[RunningModel]
) -> tuple[RunningModel, ...] | None:
    """The idle models to stop so `per_card` MiB fits on every card of `group`, or None.

    Greedy in eviction order (lowest priority, then least recently used), then pruned: a model
    whose claim turned out not to be needed stays running. The result is minimal, and never
    touches a model that could not help.
    """
    deficit = {c.index: per_card - c.room for c in group}
    if all(d <= 0 for d in deficit.values()):
        return ()
    chosen: list[RunningModel] = []
    for model in evictable:
        if not any(deficit[i] > 0 and model.frees(i) > 0 for i in deficit):
            continue
        chosen.append(model)
        for i in deficit:
            deficit[i] -= model.frees(i)
        if all(d <= 0 for d in deficit.values()):
            break
    else:
        return None
    for model in reversed(list(chosen)):
        if all(deficit[i] + model.frees(i) <= 0 for i in deficit):
            chosen.remove(model)
            for i in deficit:
                deficit[i] += model.frees(i)
    return tuple(chosen)


def _eviction_key(evicted: Sequence[RunningModel]) -> tuple:
    """Lower is kinder: fewer models stopped, then lower priorities, then staler ones."""
    return (
        len(evicted),
        max((m.priority for m in evicted), default=-math.inf),
        max((m.last_used for m in evicted), default=-math.inf),
        sum(m.frees(i) for m in evicted for i in m.gpus),
    )


def _whole_with_eviction(
    sizer: _Sizer,
    cards: Sequence[_Card],
    widths: Sequence[int],
    layers: int,
    evictable: Sequence[RunningModel],
) -> tuple[_Shape, tuple[_Card, ...], tuple[RunningModel, ...]] | None:
    need = sizer.need
    options: list[tuple[tuple, _Shape, tuple[_Card, ...], tuple[RunningModel, ...]]] = []
    if _single_allowed(need):
        shape = sizer.shape(layers, 0, 1)
        for card in cards:
            if card.potential < shape.per_card:
                continue
            evicted = _evict_for((card,), shape.per_card, evictable)
            if evicted is not None:
                options.append(((_eviction_key(evicted), 1, card.room, (card.index,)), shape, (card,), evicted))
    potential = {c.index: c.potential for c in cards}
    for width in widths:
        shape = sizer.shape(layers, 0, width)
        for group in _groups(cards, width, potential):
            if min(c.potential for c in group) < shape.per_card:
                continue
            evicted = _evict_for(group, shape.per_card, evictable)
            if evicted is not None:
                key = (_eviction_key(evicted), width, sum(c.room for c in group), tuple(c.index for c in group))
                options.append((key, shape, group, evicted))
    if not options:
        return None
    _, shape, group, evicted = min(options, key=lambda o: o[0])
    return shape, group, evicted


def _offloaded_with_eviction(
    need: ModelNeed,
    sizer: _Sizer,
    cards: Sequence[_Card],
    widths: Sequence[int],
    layers: int,
    evictable: Sequence[RunningModel],
) -> tuple[_Shape, tuple[_Card, ...], tuple[RunningModel, ...]] | None:
    """Offload after eviction: the card set that can hold the most of the model once its idle
    models stop, keeping only the evictions that the chosen shape really needs."""
    found = _offloaded(need, sizer, cards, widths, layers, use_potential=True)
    if found is None:
        return None
    shape, group = found
    evicted = _evict_for(group, shape.per_card, evictable)
    if evicted is None:  # cannot happen: the shape was sized to the potential room
        return None
    return shape, group, evicted


# ---------------------------------------------------------------------------------------------
# Output


def _make_plan(sizer: _Sizer, shape: _Shape, group: Sequence[_Card], evicted: Sequence[RunningModel]) -> Plan:
    need = sizer.need
    if sizer.splits_layers(shape.width):
        # Each device as the engine will fill it: its own layers, the output head on the last.
        counts, sizes = sizer.split(shape.gpu_layers, shape.cpu_moe, shape.width)
        wanted = [math.ceil(mib + need.overhead_mib) for mib in sizes]
    else:
        counts, wanted = [0] * len(group), [shape.per_card] * len(group)
    shares = tuple(
        GpuShare(index=c.index, uuid=c.uuid, vram_mib=mib - c.credit, total_mib=c.total, endpoint=c.endpoint, layers=layers)
        for c, mib, layers in zip(group, wanted, counts)
    )
    where = "+".join(c.label for c in group)
    names = ", ".join(sorted({c.name for c in group}))
    # Room as it will be once the evicted models have stopped (or been parked).
    room = min(c.room - c.credit + sum(m.frees(c.index) for m in evicted) for c in group)
    parts = []
    if shape.width == 1:
        parts.append(f"on {where} ({names}): {shares[0].vram_mib} MiB of {room} MiB free")
    elif sizer.splits_layers(shape.width):
        each = ", ".join(f"{s.layers} layers and {s.vram_mib} MiB on GPU{s.index}" for s in shares)
        parts.append(f"split over {where} ({names}): {each}; {room} MiB free on the tightest")
    else:
        parts.append(
            f"tensor parallel over {where} ({names}): {shape.per_card} MiB on each, "
            f"{room} MiB free on the tightest"
        )
    if need.n_layers and shape.gpu_layers < need.n_layers:
        parts.append(f"{shape.gpu_layers} of {need.n_layers} layers on GPU, the rest on the CPU")
    if shape.cpu_moe:
        parts.append(f"MoE experts of {shape.cpu_moe} of {need.n_layers} layers on the CPU")
    if evicted:
        parts.append("after stopping idle " + ", ".join(m.name for m in evicted))
    reason = "; ".join(parts)
    gpu_layers = None if (need.n_layers == 0 or shape.gpu_layers == need.n_layers) else shape.gpu_layers
    placement = Placement(gpus=shares, gpu_layers=gpu_layers, cpu_moe_layers=shape.cpu_moe, ctx=need.ctx, reason=reason)
    return Plan(placement, tuple(m.name for m in evicted), reason)


def _no_fit_reason(
    need: ModelNeed,
    sizer: _Sizer,
    cards: dict[int, _Card],
    widths: Sequence[int],
    layers: int,
    running: Sequence[RunningModel],
    margin: int,
    hints: Sequence[str],
) -> str:
    wanted = []
    if _single_allowed(need):
        wanted.append(f"{sizer.per_card(layers, 0, 1)} MiB on one card")
    for width in widths:
        wanted.append(f"{sizer.per_card(layers, 0, width)} MiB on each of {width} cards")
    if not wanted:
        if isinstance(need.tensor_parallel, int) and need.tensor_parallel > len(cards):
            wanted.append(f"tensor_parallel = {need.tensor_parallel} but only {len(cards)} usable cards")
        else:
            wanted.append(
                f"tensor_parallel = {need.tensor_parallel} does not divide the heads "
                f"({need.n_head} query, {need.n_head_kv} KV)"
            )
    free = "; ".join(
        f"{c.label} ({c.name}) {max(c.room - c.credit, 0)} MiB free, "
        f"{max(c.potential - c.credit, 0)} MiB if idle models stopped"
        for c in cards.values()
    )
    blockers = []
    for model in sorted(running, key=lambda m: m.name):
        on = [i for i in sorted(model.gpus) if i in cards and model.gpus[i] > 0]
        if not on or model.evictable:
            continue
        held = ", ".join(f"GPU{i} {model.gpus[i]} MiB" for i in on)
        if model.in_flight:
            why = f"{model.in_flight} request{'s' if model.in_flight != 1 else ''} in flight"
        else:
            why = "pinned"
        blockers.append(f"{model.name} ({why}; {held})")
    text = f"cannot place {need.name}: needs " + " or ".join(wanted) + _need_parts(need, layers)
    text += f" (safety margin {margin} MiB per card); {free}"
    if blockers:
        text += "; cannot stop: " + "; ".join(blockers)
    if hints:
        text += "; it would fit if the profile allowed " + " or ".join(hints)
    return text


def _need_parts(need: ModelNeed, layers: int) -> str:
    """What the per-card figure is made of, so a user can see which knob (ctx, quant) to turn."""
    if need.n_layers == 0:
        return " (placement.vram_mib)"
    weights = sum(need.layer_mib[need.n_layers - layers:]) + need.non_layer_mib
    kv = need.kv_per_layer_mib * layers
    return (
        f" (weights {weights:.0f} MiB, KV cache {kv:.0f} MiB at ctx {need.ctx}, "
        f"compute {need.compute_mib:.0f} MiB and CUDA overhead {need.overhead_mib:.0f} MiB per card)"
    )
