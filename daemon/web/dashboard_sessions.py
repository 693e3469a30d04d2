"""The dashboard's logins: random session ids, held in the daemon's memory, that expire.

A browser that logs in gets a fresh id from `secrets` in its cookie; the daemon keeps only the
id's SHA-256, when the login began and when it was last used. A login ends when it has not been
used for `idle` seconds, `lifetime` seconds after it began, at *Log out* (the id is forgotten, so
the same cookie sent again is refused), and when llmd restarts.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

# 256 random bits, as URL-safe base64: nothing in it needs escaping in a cookie.
SESSION_BYTES = 32
# Logins held at once; past it the least recently used one ends. Only holders of the management
# token can log in, so this bounds memory, not who may log in.
MAX_SESSIONS = 1000

Clock = Callable[[], float]


@dataclass
class _Login:
    started: float
    last_used: float


class SessionStore:
    """The logins this daemon has handed out and not yet ended."""

    def __init__(self, idle: float, lifetime: float, *, clock: Clock = time.monotonic,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self._clock = clock
        self._max = max_sessions
        self._logins: dict[bytes, _Login] = {}

    def __len__(self) -> int:
        return len(self._logins)

    def create(self) -> str:
        """A new login's session id, for the browser's cookie."""
        now = self._clock()
        if len(self._logins) >= self._max:
            self._forget_ended(now)
        if len(self._logins) >= self._max:
            oldest = min(self._logins, key=lambda key: self._logins[key].last_used)
            del self._logins[oldest]
        session = secrets.token_urlsafe(SESSION_BYTES)
        self._logins[_key(session)] = _Login(started=now, last_used=now)
        return session

    def check(self, session: str) -> bool:
        """Whether `session` is a current login; a good one counts as used now."""
        key = _key(session)
        login = self._logins.get(key)
        if login is None:
            return False
        now = self._clock()
        if self._ended(login, now):
            del self._logins[key]
            return False
        login.last_used = now
        return True

    def revoke(self, session: str) -> None:
        """End the login `session` (if it is one): its cookie is refused from now on."""
        self._logins.pop(_key(session), None)

    def _ended(self, login: _Login, now: float) -> bool:
        return now - login.last_used >= self.idle or now - login.started >= self.lifetime

    def _forget_ended(self, now: float) -> None:
        for key in [key for key, login in self._logins.items() if self._ended(login, now)]:
            del self._logins[key]


def _key(session: str) -> bytes:
    # Looked up by digest: the store never holds a usable id, and a lookup's timing depends on
    # the digest, not on how much of an id an attacker guessed right.
    return hashlib.sha256(session.encode("utf-8", "replace")).digest()
