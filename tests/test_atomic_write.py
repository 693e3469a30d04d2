"""Writing state and profile files in one step: whole content, no scratch left, the umask's mode."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmd.daemon.util.atomic_write import write_atomic, write_json_atomic


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_the_file_is_replaced_whole_and_no_scratch_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "deeper" / "state.json"  # the directory is created too
    write_json_atomic(target, {"a": 1}, indent=1)
    assert json.loads(target.read_text()) == {"a": 1}
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_without_overwrite_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "profile.toml"
    write_atomic(target, "first\n", overwrite=False)
    with pytest.raises(FileExistsError):
        write_atomic(target, "second\n", overwrite=False)
    assert target.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["profile.toml"]


def test_the_mode_follows_the_umask_like_any_new_file(tmp_path: Path, umask_022: None) -> None:
    # Others must read what llmctl writes: the daemon's user reads profiles, other users a shared HF cache.
    target = write_atomic(tmp_path / "x.toml", "x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
