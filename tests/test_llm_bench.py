"""`llmctl bench NAME` against a real daemon and llama-server: measured, stored, shown by `ls`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_profile
from llmd.daemon.diagnostics.bench_store import read_bench
from llmd.daemon.diagnostics.llm_bench import parse_concurrency
from support import daemon_with_server_settings

pytestmark = pytest.mark.engine


def _bench(daemon, *args: str, check: bool = True):  # type: ignore[no-untyped-def]
    # --config: bench reaches the proxy at the daemon's [server] listen.
    return daemon.llmctl("--config", str(daemon.root / "llmd.toml"), "bench", *args, check=check, timeout=300)


def test_bench_prints_table_stores_result_and_ls_shows_it(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, aliases=["small"])})
    result = _bench(daemon, "small", "--max-concurrency", "2", "--max-tokens", "16", "--prompt-words", "40")
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("STREAMS"))
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [row[0] for row in rows] == ["1", "2"], result.stdout
    for row in rows:
        # prompt/stream, prompt total, gen/stream, gen total: all measured, all nonzero.
        assert all(float(value) > 0 for value in row[1:5]), result.stdout
    assert "counted from the engine's usage" in result.stdout
    assert "tiny is ready" in result.stderr  # loaded first, with load's own progress

    stored = read_bench(daemon.state_dir, "tiny")
    assert stored is not None
    assert stored["engine"] == "llama-cpp" and stored["model"] == "tiny"
    assert stored["headline"].endswith("tok/s prompt (1 stream)") and stored["headline"] in result.stdout
    assert stored["measured_at"] and [row["streams"] for row in stored["rows"]] == [1, 2]
    assert all(row["completion_tokens"] == 16 for row in stored["rows"]), stored["rows"]

    listing = daemon.llmctl("ls").stdout
    assert "BENCH" in listing.splitlines()[0]
    assert stored["headline"] in listing
    profiles = json.loads(daemon.llmctl("ls", "--json").stdout)
    assert profiles[0]["bench"] == stored["headline"]


def test_bench_json_and_concurrency_list(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    result = json.loads(_bench(daemon, "tiny", "--concurrency", "3,1", "--max-tokens", "8", "--prompt-words", "40", "--json").stdout)
    assert [row["streams"] for row in result["rows"]] == [1, 3]
    assert result["tokens_from"] == "usage"
    assert result["rows"][1]["gen_tps_total"] > 0 and result["rows"][0]["ttft_p50_ms"] > 0
    assert read_bench(daemon.state_dir, "tiny") == result


def test_bench_unknown_model_and_bad_options(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    result = _bench(daemon, "nope", check=False)
    assert result.returncode == 1
    assert "no profile named 'nope'" in result.stderr and "llmctl ls" in result.stderr
    bad = _bench(daemon, "tiny", "--concurrency", "1,x", check=False)
    assert bad.returncode == 2 and "--concurrency" in bad.stderr and "like 1,2,4" in bad.stderr
    both = _bench(daemon, "tiny", "--concurrency", "1", "--max-concurrency", "2", check=False)
    assert both.returncode == 2 and "not both" in both.stderr
    # The engine refuses a prompt longer than the profile's context: the error says what to change.
    long = _bench(daemon, "tiny", "--max-concurrency", "1", "--prompt-words", "1000", check=False)
    assert long.returncode == 1 and "HTTP 400" in long.stderr and "--prompt-words" in long.stderr
    assert read_bench(daemon.state_dir, "tiny") is None
    assert json.loads(daemon.llmctl("ls", "--json").stdout)[0]["bench"] is None


def test_bench_through_a_proxy_that_needs_a_key(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_with_server_settings(make_daemon, 'api_keys = ["bench-key-123456"]\n', {"tiny": tiny_profile(tiny_gguf)})
    wrong = _bench(daemon, "tiny", "--api-key", "not-the-key", "--max-concurrency", "1", "--prompt-words", "40", check=False)
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr and "--api-key" in wrong.stderr
    # Without --api-key, the first key of the daemon's own llmd.toml is used.
    ok = _bench(daemon, "tiny", "--max-concurrency", "1", "--max-tokens", "8", "--prompt-words", "40")
    assert "tok/s gen" in ok.stdout


def test_parse_concurrency() -> None:
    assert parse_concurrency("4, 1,2,2") == [1, 2, 4]
    for bad in ("", "0", "1,-2", "a", "1000"):
        with pytest.raises(ValueError, match="like 1,2,4"):
            parse_concurrency(bad)
