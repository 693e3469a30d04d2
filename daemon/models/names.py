"""What a model id may look like.

A module of its own, importing nothing heavy, so that llmctl checks a name before it goes into a
URL without loading the profiles' validation (pydantic).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Model ids travel in URLs, file names and log names: keep them to a safe alphabet.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_model_name(name: str) -> str:
    """Return `name` if it is a valid model id, else raise ValueError saying what is allowed."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(
            f"{name!r} is not a valid model name: use letters, digits, '.', '_', ':' and '-' "
            "(no '/', no '..', at most 128 characters, starting with a letter or digit)"
        )
    return name


def unknown_model_message(name: str, known: Iterable[str]) -> str:
    """What every surface (the proxy's 404, the management API, llmctl) says of a model name
    that no profile serves, with the closest of the `known` names (profile names and aliases)."""
    import difflib

    close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.6)
    hint = f" did you mean {' or '.join(repr(match) for match in close)}?" if close else ""
    return f"model {name!r} does not exist;{hint} `llmctl ls` or GET /v1/models lists the served models"
