"""Placement decisions: `llmd.daemon.placement.scheduler.plan` on generated inventories, in-process.

A decision is one call of `plan` for one profile's need against the cards and the models
running on them. The main case is 8 cards, 200 profiles and 20 running models: every profile
is placed in turn, several rounds over. A grid then shows how the time for deciding every
profile once grows with the number of cards and of profiles.

The generated profiles mix what real ones do: fixed `vram_mib` needs, estimated needs with
per-layer sizes, MoE experts, CPU offload and tensor parallelism; the running models hold
claims spread over the cards, some busy or pinned, so that many decisions search evictions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from llmd.daemon.placement.inventory import GpuInfo
from llmd.daemon.placement.scheduler import ModelNeed, NoFit, RunningModel, plan

from .report import Section
from .stats import Figure, percentile

P99_GOAL_MS = 5.0
CARD_SIZES_MIB = (24576, 24576, 49152, 81920)


def make_needs(count: int, rng: random.Random) -> list[ModelNeed]:
    needs = []
    for i in range(count):
        name = f"model-{i:04d}"
        kind = rng.random()
        if kind < 0.3:
            needs.append(ModelNeed.fixed(name, rng.randrange(2_000, 60_000), tensor_parallel=rng.choice([1, 1, "auto"])))
            continue
        n_layers = rng.choice([24, 32, 40, 48, 64, 80])
        layer = rng.uniform(50, 900)
        moe = kind > 0.85
        needs.append(ModelNeed(
            name=name,
            layer_mib=tuple(layer * rng.uniform(0.95, 1.05) for _ in range(n_layers)),
            non_layer_mib=rng.uniform(200, 2000),
            kv_per_layer_mib=rng.uniform(4, 64),
            compute_mib=rng.uniform(100, 800),
            n_layers=n_layers,
            n_head=rng.choice([16, 32, 64]),
            n_head_kv=rng.choice([4, 8, 16]),
            moe_expert_mib=tuple(layer * 0.8 for _ in range(n_layers)) if moe else (),
            tensor_parallel=rng.choice([1, 1, 2, "auto"]),
            offload="moe-experts" if moe else rng.choice(["none", "auto", "auto"]),
            ctx=rng.choice([4096, 8192, 32768]),
        ))
    return needs


def make_cluster(n_gpus: int, n_running: int, rng: random.Random) -> tuple[list[GpuInfo], list[RunningModel]]:
    """Cards, and running models whose claims fill them partly; free memory agrees with the claims."""
    totals = [CARD_SIZES_MIB[i % len(CARD_SIZES_MIB)] for i in range(n_gpus)]
    claimed = [0] * n_gpus
    running = []
    for i in range(n_running):
        width = 2 if n_gpus >= 2 and rng.random() < 0.2 else 1
        cards = rng.sample(range(n_gpus), width)
        gpus = {}
        for card in cards:
            room = totals[card] - claimed[card]
            mib = min(room, int(totals[card] * rng.uniform(0.15, 0.5)))
            if mib > 0:
                gpus[card] = mib
                claimed[card] += mib
        running.append(RunningModel(
            name=f"running-{i:02d}",
            gpus=gpus,
            in_flight=1 if rng.random() < 0.3 else 0,
            pinned=rng.random() < 0.1,
            priority=rng.choice([0, 0, 0, 10]),
            last_used=rng.uniform(0, 1000),
        ))
    gpus = [
        GpuInfo(index=i, uuid=f"GPU-bench-{i}", name="Bench", total_mib=totals[i],
                free_mib=max(0, totals[i] - claimed[i] - 300), used_mib=min(totals[i], claimed[i] + 300))
        for i in range(n_gpus)
    ]
    return gpus, running


def time_decisions(needs: Sequence[ModelNeed], gpus: list[GpuInfo], running: list[RunningModel],
                   rounds: int) -> tuple[list[list[float]], int]:
    """Seconds per decision, per round; and how many decisions found no placement."""
    per_round = []
    no_fit = 0
    for _ in range(rounds):
        times = []
        for need in needs:
            started = time.perf_counter()
            result = plan(need, gpus, running, margin_mib=512)
            times.append(time.perf_counter() - started)
            no_fit += isinstance(result, NoFit)
        per_round.append(times)
    return per_round, no_fit // rounds


def measure(rounds: int, grid_gpus: Sequence[int], grid_profiles: Sequence[int], grid_rounds: int,
            n_gpus: int = 8, n_profiles: int = 200, n_running: int = 20, seed: int = 1) -> Section:
    section = Section("placement", f"Placement decisions ({n_gpus} GPUs, {n_profiles} profiles, {n_running} running)")
    rng = random.Random(seed)
    needs = make_needs(n_profiles, rng)
    gpus, running = make_cluster(n_gpus, n_running, rng)
    time_decisions(needs, gpus, running, 1)  # warm-up
    per_round, no_fit = time_decisions(needs, gpus, running, rounds)
    all_ms = [t * 1000 for times in per_round for t in times]
    p99_per_round = [percentile(times, 99) * 1000 for times in per_round]
    p50_per_round = [percentile(times, 50) * 1000 for times in per_round]
    section.add(Figure("placement.p50_ms", "placement decision p50", percentile(all_ms, 50), "ms",
                       min(p50_per_round), max(p50_per_round), samples=len(all_ms)))
    p99 = percentile(all_ms, 99)
    section.add(Figure("placement.p99_ms", "placement decision p99", p99, "ms", min(p99_per_round),
                       max(p99_per_round), goal=f"< {P99_GOAL_MS:g} ms", met=p99 < P99_GOAL_MS, samples=len(all_ms)))

    grid = []
    for cards in grid_gpus:
        for profiles in grid_profiles:
            rng = random.Random(seed)
            grid_needs = make_needs(profiles, rng)
            grid_cards, grid_running = make_cluster(cards, min(n_running, 3 * cards), rng)
            times, _ = time_decisions(grid_needs, grid_cards, grid_running, grid_rounds)
            flat = [t for ts in times for t in ts]
            grid.append({
                "gpus": cards,
                "profiles": profiles,
                "running": len(grid_running),
                "sweep_ms": 1000 * sum(flat) / grid_rounds,
                "p50_ms": percentile(flat, 50) * 1000,
                "p99_ms": percentile(flat, 99) * 1000,
            })
    section.details = {
        "rounds": rounds,
        "decisions_per_round": len(needs),
        "no_fit_per_round": no_fit,
        "max_ms": max(all_ms),
        "grid": grid,
    }
    section.notes.append(
        f"{rounds} rounds of {len(needs)} decisions ({no_fit} of them find no placement); spread: range over rounds. "
        "Growth with cards and profiles: see the grid (time to decide every profile once)"
    )
    return section


def grid_table(grid: list[dict]) -> str:
    """Markdown: time to decide every profile once (ms), cards down, profiles across; and per card
    count, the highest p99 of a single decision over the profile counts."""
    cards = sorted({row["gpus"] for row in grid})
    profiles = sorted({row["profiles"] for row in grid})
    cell = {(row["gpus"], row["profiles"]): row for row in grid}
    lines = ["| GPUs \\ profiles | " + " | ".join(str(p) for p in profiles) + " | worst p99 of one decision |",
             "|---|" + "---|" * len(profiles) + "---|"]
    for card in cards:
        rows = [cell[(card, p)] for p in profiles if (card, p) in cell]
        worst = max(row["p99_ms"] for row in rows)
        lines.append(f"| {card} | " + " | ".join(f"{row['sweep_ms']:.1f} ms" for row in rows) + f" | {worst:.3f} ms |")
    return "\n".join(lines)
