"""Energy per generated token, per card, for /metrics.

Tokens are counted to a card when a reply's generated tokens are recorded: every card the
model is placed on at that moment gets all of them (a model split over two cards counts on
both, since both worked for every token). Energy comes from the card's own counter.

The figure covers the time since llmd first read the card's energy counter (the first scrape
of /metrics) and includes the card's idle draw between requests: it is what a token cost on
that card, all told. docs/metrics.md defines it for users.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["CardsOf", "GpuEnergy"]

# The cards (by index) a model is placed on now; empty when it is not placed.
CardsOf = Callable[[str], Iterable[int]]


@dataclass
class _Start:
    """A card's energy counter and token count when llmd first read the counter."""

    energy_j: float
    tokens: float


class GpuEnergy:
    """Generated tokens counted per card, and the joules each card spent per token.

    Without `cards_of` (no manager to ask where models run) no token is counted to any card,
    and there is no energy per token to report. Touch it only on the event loop."""

    def __init__(self, cards_of: CardsOf | None = None) -> None:
        self._cards_of = cards_of
        self._tokens: dict[int, float] = {}
        self._start: dict[int, _Start] = {}

    def generated(self, model: str, tokens: float) -> None:
        """`model` generated `tokens` for one reply."""
        if self._cards_of is None:
            return
        for gpu in self._cards_of(model):
            self._tokens[gpu] = self._tokens.get(gpu, 0.0) + tokens

    def tokens(self) -> dict[int, float]:
        """Generated tokens counted to each card since llmd started, by card index."""
        return dict(self._tokens)

    def joules_per_token(self, gpu: int, energy_j: float) -> float | None:
        """Joules card `gpu` spent per token generated on it since its counter was first read,
        given its counter now; None until a token has been generated in that time."""
        tokens = self._tokens.get(gpu, 0.0)
        start = self._start.get(gpu)
        if start is None or energy_j < start.energy_j:
            # The first reading, or the counter went back (the driver was reloaded): start over.
            self._start[gpu] = _Start(energy_j, tokens)
            return None
        made = tokens - start.tokens
        return (energy_j - start.energy_j) / made if made > 0 else None
