"""Turn pydantic validation errors into one message per problem that names file, field and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llmd.daemon.util.unknown_keys import explain_unknown_key

_FIXES = {
    "extra_forbidden": "remove it, or check its spelling",  # without the model at hand
    "missing": "add it",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number",
    "string_type": "write a quoted string",
    "bool_type": "write true or false",
    "bool_parsing": "write true or false",
    "list_type": "write a list, like [\"a\", \"b\"]",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "literal_error": "use one of the values named",
}


def describe_validation_error(source: Path | str, error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem: `FILE: field.path: message (got X); fix: ...`.

    With the `model` validated against, an unknown key is named as a misspelling of a known one
    or as a key of another table (see `unknown_keys`)."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden" and model is not None:
            lines.append(f"{source}: {field}: {explain_unknown_key(model, item['loc'], item.get('input'))}")
            continue
        message = item["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        got = ""
        if item["type"] != "missing" and "input" in item and not isinstance(item["input"], dict):
            got = f" (got {item['input']!r})"
        fix = _FIXES.get(item["type"])
        lines.append(f"{source}: {field}: {message}{got}" + (f"; fix: {fix}" if fix else ""))
    return "\n".join(lines)


def validate_file_data(model: type[BaseModel], source: Path, data: dict[str, Any]) -> Any:
    """Validate `data` read from `source`; raise ConfigError naming the file and fields."""
    from llmd.daemon.errors import ConfigError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(source, exc, model)) from None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; raise ConfigError with the file, line and column on bad syntax."""
    import tomllib

    from llmd.daemon.errors import ConfigError

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied; make it readable by the llmd user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
