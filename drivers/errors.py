"""The base of every error llmd reports to a user.

It lives in the driver API so that a driver may raise it without importing the daemon;
`llmd.daemon.errors` builds its own errors on it, so `except LlmdError` catches both.
"""

from __future__ import annotations


class LlmdError(Exception):
    """Base of every error llmd reports to a user: the message says what is wrong and how to fix it."""
