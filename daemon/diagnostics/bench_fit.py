"""How big `llmctl bench` makes its prompt and generation: what fits the model's context.

The context one request may fill, prompt and reply together, comes from the engine when it says
(llama-server's `GET /props`: `default_generation_settings.n_ctx`, the context of one slot), else
from the profile: llmd gives every request `[launch] ctx` (llama-server gets ctx x parallel, which
it shares among its parallel slots). How many requests the engine serves at once comes the same
way (`total_slots`, else `[launch] parallel`), unless the daemon reports its own limit.

How many tokens a prompt of N words makes depends on the model's tokenizer and chat template,
so the bench measures it (`PromptCost`) before it sizes anything that does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import httpx

# llmd starts every engine on loopback.
ENGINE_HOST = "127.0.0.1"
PROPS_TIMEOUT_S = 5.0
# The least a bench generates per stream (`--max-tokens` accepts no less).
MIN_GENERATED = 2


@dataclass(frozen=True)
class ModelRoom:
    """`context`: tokens one request may fill, prompt and reply together (None: unknown);
    `slots`: requests the model serves at once (None: unknown); `source`: where they come from."""

    context: int | None
    slots: int | None
    source: str


async def engine_room(port: int) -> ModelRoom | None:
    """What the engine on `port` says of its context and slots (llama-server's /props); None when
    it says nothing usable (another engine, an older llama-server, no answer)."""
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=PROPS_TIMEOUT_S) as client:
            response = await client.get(f"http://{ENGINE_HOST}:{port}/props")
        props = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(props, dict):
        return None
    settings = props.get("default_generation_settings")
    context = _positive(settings.get("n_ctx")) if isinstance(settings, dict) else None
    if context is None:
        return None
    return ModelRoom(context, _positive(props.get("total_slots")), "the engine")


def model_room(engine: ModelRoom | None, profile: dict[str, Any], status: dict[str, Any]) -> ModelRoom:
    """The engine's word where it gave one, else the profile's (`llmctl ls --json`'s `ctx` and
    `parallel`); the slots are the daemon's own limit when its `ps` row reports one (`slots`)."""
    room = engine or ModelRoom(_positive(profile.get("ctx")), _positive(profile.get("parallel")), "the profile")
    daemon_slots = _positive(status.get("slots"))
    if daemon_slots is not None and (room.slots is None or daemon_slots < room.slots):
        room = ModelRoom(room.context, daemon_slots, room.source)
    return room


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True)
class PromptCost:
    """Tokens of a bench prompt of N words: `fixed` (chat template, request number) plus
    `per_word` for each word, as measured on the model itself."""

    fixed: float
    per_word: float

    @classmethod
    def from_samples(cls, words: tuple[int, int], tokens: tuple[int, int]) -> PromptCost:
        """From the prompt tokens of two prompts of different lengths (in words)."""
        per_word = max((tokens[1] - tokens[0]) / (words[1] - words[0]), 1e-3)
        return cls(fixed=tokens[0] - per_word * words[0], per_word=per_word)

    def tokens(self, words: int) -> int:
        return math.ceil(self.fixed + self.per_word * words)

    def words_within(self, tokens: int) -> int:
        """The most words whose prompt takes at most `tokens` (0 or less: none fits)."""
        return math.floor((tokens - self.fixed) / self.per_word)


def safety_margin(context: int) -> int:
    """Tokens kept free: request numbers grow by a digit, and the words of a partial sentence
    are longer or shorter than their average."""
    return max(8, context // 32)


@dataclass(frozen=True)
class Sizes:
    prompt_words: int
    max_tokens: int
    prompt_shrunk: bool
    generation_shrunk: bool


def fit_sizes(context: int, cost: PromptCost, prompt_words: int, max_tokens: int, *,
              fit_prompt: bool, fit_generation: bool) -> Sizes:
    """Shrink the sizes that may change (`fit_prompt`, `fit_generation`: not given by the user)
    until prompt and reply fit `context`; an explicit size stays, even if it cannot fit, so the
    engine's own error says so. The reply keeps at most half of the context when both shrink.

    Raises ValueError, saying what to change, when the context leaves no room for a prompt."""
    room = context - safety_margin(context)
    if cost.tokens(prompt_words) + max_tokens <= room:
        return Sizes(prompt_words, max_tokens, False, False)
    words, generated = prompt_words, max_tokens
    if fit_generation:
        share = room - cost.tokens(prompt_words) if not fit_prompt else room // 2
        generated = max(MIN_GENERATED, min(max_tokens, share))
    if fit_prompt:
        words = min(prompt_words, cost.words_within(room - generated))
        if words < 1:
            raise ValueError(
                f"the model's {context}-token context leaves no room for a prompt besides {generated} generated "
                "tokens; give a smaller --max-tokens, or raise the profile's [launch] ctx"
            )
    return Sizes(words, generated, words < prompt_words, generated < max_tokens)


def shrink_note(context: int, prompt_tokens: int, max_tokens: int, sizes: Sizes) -> str | None:
    """"prompt shrunk to 364 tokens to fit the model's 512-token context", or None if nothing shrank."""
    generation = f"{max_tokens} tokens per stream"
    if sizes.prompt_shrunk and sizes.generation_shrunk:
        shrunk = f"prompt shrunk to {prompt_tokens} tokens and generation to {generation}"
    elif sizes.prompt_shrunk:
        shrunk = f"prompt shrunk to {prompt_tokens} tokens"
    elif sizes.generation_shrunk:
        shrunk = f"generation shrunk to {generation}"
    else:
        return None
    return f"{shrunk} to fit the model's {context}-token context"


def queue_note(streams: int, slots: int | None) -> str | None:
    """"4 streams on 2 slots: 2 waited ..." when a level had more streams than the model has slots."""
    if slots is None or streams <= slots:
        return None
    return (f"{streams} streams on {slots} slot{'s' if slots != 1 else ''}: {streams - slots} waited "
            "for a free slot (their wait counts in ttft and prompt/stream)")
