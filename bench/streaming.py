"""Streaming: N clients each stream a fixed number of tokens; the targets take turns.

For every client count, each round runs one batch per target (the order rotating from round
to round). A batch's throughput is all its tokens over the time from the first request sent to
the last event received; a target's ratio in a round is its throughput over the engine's own
in that round. Inter-chunk delay is the time between consecutive server-sent events of one
stream; the figure is how much a proxy adds to its 99th percentile.

The proxies' own CPU time is counted around their batches, for the cost per relayed chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .harness import LOCALHOST, BenchError, Target, cpu_seconds, rotations, user_system_seconds
from .httpclient import HttpError, Stream, chat_body, run_streams
from .report import Section
from .stats import Figure, median, percentile

PATH = "/v1/chat/completions"
LARGE_RATIO_GOAL = 0.99


@dataclass
class ChunkCpu:
    """CPU time a proxy's processes spent on its streaming batches, and the events it relayed."""

    batches: list[tuple[float, int]] = field(default_factory=list)
    user_seconds: float = 0.0  # of all batches, tick-sampled (see harness.user_system_seconds)
    system_seconds: float = 0.0

    def add(self, cpu: float, events: int, user: float, system: float) -> None:
        self.batches.append((cpu, events))
        self.user_seconds += user
        self.system_seconds += system

    @property
    def cpu_seconds(self) -> float:
        return sum(cpu for cpu, _ in self.batches)

    @property
    def events(self) -> int:
        return sum(events for _, events in self.batches)

    def ms_per_1000(self) -> tuple[float, float, float]:
        """CPU milliseconds per 1,000 events: over all batches, and the lowest and highest batch."""
        per_batch = [1e6 * cpu / events for cpu, events in self.batches if events]
        return 1e6 * self.cpu_seconds / self.events, min(per_batch), max(per_batch)


def measure(
    targets: Sequence[Target],
    model: str,
    label: str,
    levels: Sequence[tuple[int, int]],
    tokens: int,
    *,
    cpu_of: dict[str, list[int]] | None = None,
    chunk_cpu: dict[str, ChunkCpu] | None = None,
    ratio_floor: float | None = None,
    report_engine_timed: bool = False,
    judged: bool = True,
) -> Section:
    """One section for one model. `levels` are (clients, rounds) pairs. With `cpu_of` (target
    name to pids) and `chunk_cpu`, each such target's CPU per batch is added to `chunk_cpu`.
    `ratio_floor` adds an absolute goal for llmd's ratio. `report_engine_timed` adds a note with
    the engine-timed ratios (always in the details); they mean something only where the engine's
    time dominates each request, that is for slow models. With `judged` False the ratios are
    reported without a goal (the tiny model's: docs/benchmarks.md, "Decided: the Python floor")."""
    section = Section(f"streaming.{label}", f"Streaming {tokens}-token replies, {label} model")

    def who(clients: int) -> str:
        return f"{label}, {clients} client{'' if clients == 1 else 's'}"

    body = chat_body(model, tokens, stream=True)
    names = [t.name for t in targets]
    details: dict = {"tokens": tokens, "model": model, "levels": {}}
    for clients, rounds in levels:
        tok_s: dict[str, list[float]] = {name: [] for name in names}
        shares: dict[str, list[float]] = {name: [] for name in names}
        gaps: dict[str, list[list[float]]] = {name: [] for name in names}
        for order in rotations(list(targets), rounds):
            for target in order:
                pids = (cpu_of or {}).get(target.name, []) if chunk_cpu is not None else []
                counted = chunk_cpu.setdefault(target.name, ChunkCpu()) if pids and chunk_cpu is not None else None
                streams = _batch(target, body, clients, tokens, pids, counted, section)
                tok_s[target.name].append(_throughput(streams))
                shares[target.name].append(_engine_share(streams))
                gaps[target.name].append([g for s in streams for g in s.gaps])
        prefix = f"stream.{label}.c{clients}"
        direct = tok_s["direct"]
        section.add(Figure(
            f"{prefix}.direct.tok_s", f"{who(clients)}: engine alone", median(direct), "tok/s",
            min(direct), max(direct), samples=rounds,
        ))
        ratios: dict[str, Figure] = {}
        for name in names:
            if name == "direct":
                continue
            per_round = [t / d for t, d in zip(tok_s[name], direct)]
            ratios[name] = section.add(Figure(
                f"{prefix}.{name}.ratio", f"{who(clients)}: {name} tok/s / engine tok/s",
                median(per_round), "ratio", min(per_round), max(per_round), samples=rounds,
            ))
        for name in names:
            if name == "direct":
                continue
            per_round = [
                (percentile(mine, 99) - percentile(base, 99)) * 1000
                for mine, base in zip(gaps[name], gaps["direct"]) if mine and base
            ]
            if not per_round:
                raise BenchError(f"{prefix}: streams had fewer than two events; no inter-chunk delay to measure")
            section.add(Figure(
                f"{prefix}.{name}.added_p99_gap_ms", f"{who(clients)}: {name} added p99 inter-chunk delay",
                median(per_round), "ms", min(per_round), max(per_round), samples=sum(len(g) for g in gaps[name]),
            ))
        if judged:
            _judge(ratios, ratio_floor)
        engine_timed = {
            name: median([t / d for t, d in zip(shares[name], shares["direct"])]) for name in names if name != "direct"
        }
        details["levels"][str(clients)] = {
            "rounds": rounds,
            "tok_s_per_round": tok_s,
            "engine_timed_ratio": engine_timed,
            "gap_ms": {
                name: {f"p{q}": percentile([g for b in gaps[name] for g in b], q) * 1000 for q in (50, 90, 99)}
                for name in names
            },
        }
    section.details = details
    if report_engine_timed:
        timed = "; ".join(
            f"{clients} client(s): " + ", ".join(f"{name} {value:.3f}" for name, value in level["engine_timed_ratio"].items())
            for clients, level in details["levels"].items()
        )
        section.notes.append(
            "engine-timed ratios (the engine's own reported time for a request over the time the client saw, "
            "relative to the engine alone), a cross-check that does not move when the engine runs faster or slower "
            f"from one batch to the next: {timed}"
        )
    counts = ", ".join(f"{rounds} with {clients}" for clients, rounds in levels)
    section.notes.append(
        f"rounds by client count: {counts}; each figure is its median over the rounds, the spread its range"
    )
    if not judged:
        section.notes.append("reported without a goal: the Python floor for tiny-model streams is accepted (docs/benchmarks.md)")
    elif "nginx" not in names:
        section.notes.append("llmd's ratio goal is relative to nginx's ratio, which was not measured: nginx is missing")
    return section


def _judge(ratios: dict[str, Figure], floor: float | None) -> None:
    """llmd's ratio must reach nginx's (and `floor`, when given)."""
    llmd = ratios.get("llmd")
    if llmd is None:
        return
    nginx = ratios.get("nginx")
    goals = [f">= nginx ({nginx.value:.3f})" if nginx is not None else ">= nginx"]
    checks: list[bool | None] = [llmd.value >= nginx.value if nginx is not None else None]
    if floor is not None:
        goals.append(f">= {floor:g}")
        checks.append(llmd.value >= floor)
    llmd.goal = " and ".join(goals)
    llmd.met = False if False in checks else None if None in checks else True
    if nginx is None:
        llmd.note = "nginx is missing: the comparison with nginx could not be judged"


def _batch(target: Target, body: bytes, clients: int, tokens: int, pids: list[int], counted: ChunkCpu | None,
           section: Section) -> list[Stream]:
    """One batch of streams, run once more if it failed: a single stream cut short on a busy
    machine should not void a run of several minutes. The retry is noted in the report; a
    second failure ends the run."""
    problem = ""
    for attempt in range(2):
        before = sum(cpu_seconds(pid) for pid in pids)
        split_before = [user_system_seconds(pid) for pid in pids]
        try:
            streams = run_streams(LOCALHOST, target.port, PATH, body, clients)
        except (OSError, HttpError) as exc:
            problem = repr(exc)
        else:
            problem = _problem(streams, tokens)
            if not problem:
                if counted is not None:
                    cpu = sum(cpu_seconds(pid) for pid in pids) - before
                    split = [user_system_seconds(pid) for pid in pids]
                    user = sum(after[0] - start[0] for after, start in zip(split, split_before))
                    system = sum(after[1] - start[1] for after, start in zip(split, split_before))
                    counted.add(cpu, sum(len(s.event_times) for s in streams), user, system)
                return streams
        if attempt == 0:
            section.notes.append(f"{target.name}: a batch of {clients} streams failed and was run again: {problem}")
    raise BenchError(f"{target.name}: a batch of {clients} streams failed twice: {problem}")


def _problem(streams: list[Stream], tokens: int) -> str:
    """What went wrong with a batch, or "" if every stream was whole."""
    for stream in streams:
        if stream.status != 200 or stream.error:
            what = stream.error or " ".join(stream.head.decode(errors="replace").split())[:300]
            return f"a stream failed with status {stream.status}: {what}"
        if not stream.finished:
            return "a stream ended without data: [DONE]"
        if stream.tokens != tokens:
            return f"a stream generated {stream.tokens} tokens, not {tokens}"
    return ""


def _engine_share(streams: list[Stream]) -> float:
    """Median over streams of the engine's own time for the request over the time the client saw."""
    return median([s.engine_seconds / (s.event_times[-1] - s.sent_at) for s in streams])


def _throughput(streams: list[Stream]) -> float:
    began = min(s.sent_at for s in streams)
    ended = max(s.event_times[-1] for s in streams)
    return sum(s.tokens for s in streams) / (ended - began)
