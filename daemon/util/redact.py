"""Masking secrets in an engine's argv before it is shown (`llmctl ps`, the dashboard) or
written to a log or state file.

An engine gets its argv as written, secrets included (`--api-key X` in `extra_args`, say);
everything llmd shows of it has the values that look like keys replaced by `MASK`:

- the value after a flag whose name says it holds a secret (`--api-key X`, `--hf-token=X`);
- the value of an environment-style `NAME=value` argument whose NAME does (`HF_TOKEN=X`);
- any argument shaped like a well-known kind of key (`sk-...`, `hf_...`, `ghp_...`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MASK = "***"

# Words of a flag or variable name that mark its value as a secret.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth"})
# A flag naming a file or directory that holds a secret (`--ssl-key-file`) carries a path, not the secret.
_PATH_WORDS = frozenset({"file", "path", "dir"})
_ENV_ASSIGNMENT = re.compile(r"([A-Z][A-Z0-9_]*)=(.*)", re.S)
# Keys with a recognisable shape: OpenAI's and Anthropic's, Hugging Face's, GitHub's, Slack's, AWS's.
# A whole argument (or the value after its "="), so that a path that merely contains "sk-" stays.
_KEY_SHAPED = re.compile(
    r"(sk-|sk_|hf_|ghp_|gho_|ghs_|github_pat_|xox[abprs]-)[A-Za-z0-9_\-]{16,}|AKIA[0-9A-Z]{16}"
)


def mask_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with the secrets in it replaced by `MASK` (see the module's doc)."""
    masked: list[str] = []
    secret_next = False
    for arg in argv:
        if secret_next and not _is_flag(arg):
            masked.append(MASK)
            secret_next = False
            continue
        secret_next = False
        if _is_flag(arg):
            flag, equals, _ = arg.partition("=")
            if _names_secret(flag.lstrip("-")):
                if equals:
                    masked.append(f"{flag}={MASK}")
                else:
                    masked.append(arg)
                    secret_next = True
                continue
        assignment = _ENV_ASSIGNMENT.fullmatch(arg)
        if assignment is not None and _names_secret(assignment.group(1)):
            masked.append(f"{assignment.group(1)}={MASK}")
        elif _KEY_SHAPED.fullmatch(arg):
            masked.append(MASK)
        elif "=" in arg and _KEY_SHAPED.fullmatch(arg.partition("=")[2]):
            masked.append(f"{arg.partition('=')[0]}={MASK}")
        else:
            masked.append(arg)
    return masked


def _is_flag(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit()


def _names_secret(name: str) -> bool:
    words = [word for word in re.split(r"[-_.]", name.lower()) if word]
    return any(word in _SECRET_WORDS for word in words) and not (words and words[-1] in _PATH_WORDS)
