"""What a model id may look like.

A module of its own, importing nothing heavy, so that llmctl checks a name before it goes into a
URL without loading the profiles' validation (pydantic).
"""

from __future__ import annotations

import re

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
