"""How many lines from the end of an engine's log `llmctl logs -n` and `GET .../logs?lines=`
return.

A module of its own, importing nothing, so that llmctl checks `-n` against the daemon's limit
without loading the management API.
"""

from __future__ import annotations

DEFAULT_LOG_LINES = 50
# The tail is read into memory to be sent; older lines stay in the log file itself.
MAX_LOG_LINES = 10_000
# Set on a followed log's answer when the model has no log yet (it has not run): llmctl says so.
LOG_ABSENT_HEADER = "X-Llmd-Log-Absent"
