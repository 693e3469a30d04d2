"""Say what an unknown key in a TOML file most likely is: a misspelling of a key the table has
("did you mean `ctx`?"), or a key that belongs in another table ("`ttl` belongs in [policy]").

The tables and their keys are read from the pydantic model the file is validated against, so
the hints follow the schema without a list to keep up to date.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel

# A table under a mapping (`[engines.NAME]`) is named with this in place of its key.
MAPPING_KEY = "NAME"
# Typos (a letter wrong, missing, extra, or two swapped) that still count as a misspelling of a
# key: one in a short key, two in a longer one. More, and an unrelated key would be suggested.
_SHORT_KEY = 5


def _nested(annotation: Any) -> Iterator[tuple[type[BaseModel], bool]]:
    """The models a field holds: (model, whether under a mapping of names to tables)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, False
        return
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is dict and len(args) == 2:
        for model, _ in _nested(args[1]):
            yield model, True
    elif origin in (Union, types.UnionType, Annotated):
        for arg in args if origin is not Annotated else args[:1]:
            yield from _nested(arg)


def _tables(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], type[BaseModel]]]:
    """Every table of `model`'s schema with its path; the model itself is the top of the file."""
    yield path, model
    for name, info in model.model_fields.items():
        for nested, under_mapping in _nested(info.annotation):
            yield from _tables(nested, (*path, name, MAPPING_KEY) if under_mapping else (*path, name))


def _table_at(root: type[BaseModel], path: Sequence[str | int]) -> type[BaseModel] | None:
    """The model of the table at `path` in a file (mapping keys as written, `engines.llama-cpp`)."""
    model: type[BaseModel] | None = root
    parts = list(path)
    while parts and model is not None:
        info = model.model_fields.get(str(parts.pop(0)))
        if info is None:
            return None
        found = next(_nested(info.annotation), None)
        if found is None:
            return None
        model, under_mapping = found
        if under_mapping:
            if not parts:
                return None
            parts.pop(0)
    return model


def place(path: Sequence[str]) -> str:
    """Where a table is, for a sentence: "in [policy]", "in [engines.NAME]", "at the top of the file"."""
    return f"in [{'.'.join(path)}]" if path else "at the top of the file"


def typos(a: str, b: str) -> int:
    """How many typos turn `a` into `b`: letters changed, added, dropped, or two neighbours swapped
    (the optimal string alignment distance)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def closest(key: str, known: Sequence[str]) -> str | None:
    """The known key `key` is most likely a misspelling of, if any."""
    allowed = 1 if len(key) <= _SHORT_KEY else 2
    scored = sorted((typos(key.lower(), name.lower()), name) for name in known)
    return scored[0][1] if scored and scored[0][0] <= allowed else None


def explain_unknown_key(root: type[BaseModel], location: Sequence[str | int], value: object) -> str:
    """What is wrong with the key at `location` (its table's path, then the key) and its fix."""
    *parent, key = [str(part) for part in location]
    is_table = isinstance(value, dict)
    what = f"unknown table [{'.'.join((*parent, key))}]" if is_table else "unknown key"
    here = _table_at(root, parent)
    tables = list(_tables(root))
    homes = [path for path, model in tables if key in model.model_fields and model is not here]
    if homes:
        return f"{what}; `{key}` belongs {' or '.join(place(path) for path in homes)}, not {place(parent)}"
    match = closest(key, list(here.model_fields)) if here is not None else None
    where = ""
    if match is None:  # a misspelling of a key of another table
        elsewhere = {name: path for path, model in tables if model is not here for name in model.model_fields}
        match = closest(key, list(elsewhere))
        where = f" {place(elsewhere[match])}" if match is not None else ""
    if match is not None:
        return f"{what}; did you mean {f'[{match}]' if is_table else f'`{match}`'}{where}?"
    return f"{what}; fix: remove it, or check its spelling"
