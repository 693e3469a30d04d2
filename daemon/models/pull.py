"""Fetching a profile's weights from the event loop: `download` in a worker thread, cancellable.

The manager calls `fetch_model` from a load (or from `llmctl pull`) and shows the progress
lines it receives in `Instance.progress`, where `llmctl ps` and waiting `llmctl load`s see them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import anyio

from llmd.daemon.models.downloads import DownloadProgress, download, resolve_cached
from llmd.daemon.models.profiles import ModelSource

# How often the latest progress is handed to `on_progress`.
REPORT_INTERVAL = 0.5
# After a cancel, how long to wait for the worker thread to stop writing and release its lock.
STOP_WAIT = 10.0


async def fetch_model(
    source: ModelSource,
    on_progress: Callable[[str], None],
    *,
    on_download: Callable[[DownloadProgress], None] | None = None,
    update: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """The local path of `source`'s weights, downloading them first if the cache lacks them.

    A `path` source is returned as it is (the caller checks that it exists). For a Hugging Face
    source, a copy already complete in the cache is returned without asking the Hub, unless
    `update` is set (`llmctl pull`): then the Hub is asked what the revision points to now,
    and anything new is fetched.

    `on_progress` gets one human line at a time ("x.gguf 312.4/639.4 MiB 48.2 MiB/s ETA 7s"),
    always on the event loop's thread; `on_download`, when given, gets the same reports as
    they are (byte counts, for Ollama's pull progress). Cancelling the calling task stops the transfer; the
    bytes already fetched stay in the cache and the next call resumes from them. Errors are
    `llmd.daemon.models.downloads.DownloadError` subclasses.
    """
    if source.path is not None:
        return source.path
    if not update:
        cached = await anyio.to_thread.run_sync(lambda: resolve_cached(source, cache_dir=cache_dir))
        if cached is not None:
            return cached

    what = f"{source.hf_repo}/{source.hf_file}" if source.hf_file else f"{source.hf_repo} (whole repo)"
    on_progress(f"asking the Hugging Face Hub about {what}")
    latest = _Latest()
    cancel = threading.Event()
    finished = threading.Event()

    def work() -> Path:
        try:
            return download(source, latest.set, token=token, endpoint=endpoint, cache_dir=cache_dir, cancel=cancel)
        finally:
            finished.set()

    async def relay() -> None:
        shown: DownloadProgress | None = None
        while True:
            await anyio.sleep(REPORT_INTERVAL)
            current = latest.value
            if current is not None and current is not shown:
                on_progress(current.line())
                if on_download is not None:
                    on_download(current)
                shown = current

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay)
            try:
                # Errors stay out of the task group, so callers see the DownloadError itself.
                outcome: Path | BaseException = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            except Exception as exc:
                outcome = exc
            tg.cancel_scope.cancel()
    except BaseException:  # cancelled: stop the worker and wait until it has let go of the files
        cancel.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_WAIT):
            while not finished.is_set():
                await anyio.sleep(0.05)
        raise
    if isinstance(outcome, BaseException):
        raise outcome
    if latest.value is not None:
        on_progress(latest.value.line())
        if on_download is not None:
            on_download(latest.value)
    return outcome


class _Latest:
    """The newest progress report: written by the worker thread, read on the event loop."""

    value: DownloadProgress | None = None

    def set(self, progress: DownloadProgress) -> None:
        self.value = progress  # one reference assignment: atomic under the GIL
