"""`llmctl bench NAME` against a real daemon and llama-server: measured, stored, shown by `ls`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_profile
from llmd.daemon.diagnostics.bench_fit import ModelRoom, PromptCost, fit_sizes, model_room, queue_note, shrink_note
from llmd.daemon.diagnostics.bench_store import read_bench
from llmd.daemon.diagnostics.llm_bench import parse_concurrency
from support import daemon_with_server_settings

pytestmark = pytest.mark.engine


def _bench(daemon, *args: str, check: bool = True):  # type: ignore[no-untyped-def]
    # --config: bench reaches the proxy at the daemon's [server] listen.
    return daemon.llmctl("--config", str(daemon.root / "llmd.toml"), "bench", *(args or ("tiny",)), check=check,
                         timeout=300)


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
    assert "model 'nope' does not exist" in result.stderr and "llmctl ls" in result.stderr
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


def test_bench_with_defaults_fits_a_512_token_context_and_says_who_waited(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    # 512 tokens a slot, two slots: the default 200-word prompt alone would not fit (the tiny
    # model's tokenizer makes about four tokens of a word).
    profile = tiny_profile(tiny_gguf, ctx=512).replace("[launch]\n", "[launch]\n        parallel = 2\n")
    daemon = make_daemon({"tiny": profile})
    result = _bench(daemon)
    assert "to fit the model's 512-token context" in result.stdout, result.stdout
    assert "note: prompt shrunk to " in result.stdout
    assert "note: 4 streams on 2 slots: 2 waited" in result.stdout
    assert "2 streams on" not in result.stdout
    assert "tok/s gen" in result.stdout and "measuring its prompt tokens" in result.stderr

    stored = read_bench(daemon.state_dir, "tiny")
    assert stored is not None
    assert stored["context"] == 512 and stored["slots"] == 2 and stored["max_tokens"] == 128
    assert [row["streams"] for row in stored["rows"]] == [1, 2, 4]
    assert [row["waited"] for row in stored["rows"]] == [0, 0, 2]
    for row in stored["rows"]:
        assert row["gen_tps_total"] > 0 and row["prompt_tps_total"] > 0
        # Every reply ran to its end: prompt and generation fit the context together.
        assert row["completion_tokens"] == 128 and row["prompt_tokens"] + 128 <= 512, row
    assert f"prompt shrunk to {stored['prompt_tokens']} tokens" in result.stdout


def test_explicit_sizes_stay_as_given(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, ctx=512)})
    # The prompt is the user's: the generation shrinks around it.
    result = json.loads(_bench(daemon, "tiny", "--concurrency", "1", "--prompt-words", "100", "--json").stdout)
    row = result["rows"][0]
    assert result["max_tokens"] < 128 and row["completion_tokens"] == result["max_tokens"]
    assert row["prompt_tokens"] + row["completion_tokens"] <= 512
    assert result["notes"] == [f"generation shrunk to {result['max_tokens']} tokens per stream to fit "
                               "the model's 512-token context"]
    # Both given: nothing is measured or shrunk, whatever the context.
    given = json.loads(_bench(daemon, "tiny", "--concurrency", "1", "--prompt-words", "20", "--max-tokens", "8",
                              "--json").stdout)
    assert given["max_tokens"] == 8 and given["notes"] == [] and given["rows"][0]["completion_tokens"] == 8


def test_fit_sizes() -> None:
    cost = PromptCost(fixed=27, per_word=4)  # the tiny model's byte-level tokenizer, about
    fits = fit_sizes(4096, cost, 200, 128, fit_prompt=True, fit_generation=True)
    assert (fits.prompt_words, fits.max_tokens, fits.prompt_shrunk, fits.generation_shrunk) == (200, 128, False, False)
    both = fit_sizes(512, cost, 200, 128, fit_prompt=True, fit_generation=True)
    assert both.max_tokens == 128 and both.prompt_shrunk and not both.generation_shrunk
    assert cost.tokens(both.prompt_words) + 128 <= 512 - 16 < cost.tokens(both.prompt_words + 1) + 128
    small = fit_sizes(256, cost, 200, 128, fit_prompt=True, fit_generation=True)
    assert small.max_tokens == (256 - 8) // 2 and small.generation_shrunk
    assert cost.tokens(small.prompt_words) + small.max_tokens <= 248
    # An explicit size stays, even where it cannot fit: the engine's error says so.
    kept = fit_sizes(512, cost, 1000, 128, fit_prompt=False, fit_generation=True)
    assert kept.prompt_words == 1000 and kept.max_tokens == 2
    untouched = fit_sizes(512, cost, 1000, 128, fit_prompt=False, fit_generation=False)
    assert (untouched.prompt_words, untouched.max_tokens) == (1000, 128)
    with pytest.raises(ValueError, match="--max-tokens"):
        fit_sizes(512, cost, 200, 480, fit_prompt=True, fit_generation=False)
    assert PromptCost.from_samples((1, 17), (31, 95)) == PromptCost(fixed=27, per_word=4)
    assert shrink_note(512, 364, 128, both) == "prompt shrunk to 364 tokens to fit the model's 512-token context"
    assert shrink_note(4096, 800, 128, fits) is None


def test_queue_note_and_where_room_comes_from() -> None:
    assert queue_note(4, 2) == "4 streams on 2 slots: 2 waited for a free slot (their wait counts in ttft and prompt/stream)"
    assert (queue_note(2, 1) or "").startswith("2 streams on 1 slot: 1 waited")
    assert queue_note(2, 2) is None and queue_note(8, None) is None
    profile = {"name": "tiny", "ctx": 512, "parallel": 2}
    assert model_room(None, profile, {}) == ModelRoom(512, 2, "the profile")
    engine = ModelRoom(500, 4, "the engine")
    assert model_room(engine, profile, {}) == engine
    # The daemon's own limit, where it reports a smaller one, is what streams wait for.
    assert model_room(engine, profile, {"slots": 1}) == ModelRoom(500, 1, "the engine")


def test_parse_concurrency() -> None:
    assert parse_concurrency("4, 1,2,2") == [1, 2, 4]
    for bad in ("", "0", "1,-2", "a", "1000"):
        with pytest.raises(ValueError, match="like 1,2,4"):
            parse_concurrency(bad)
