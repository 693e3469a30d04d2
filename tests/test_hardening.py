"""Hardening: profiles cannot reach outside what they name, background jobs cannot end the
daemon, model files are untrusted input, and secrets stay out of engines, `ps` and replies.

Each is tested through a real daemon, with a real llama-server where an engine runs; faults
inside the daemon are injected through a `sitecustomize` module on its PYTHONPATH."""

from __future__ import annotations

import json
import os
import struct
import textwrap
import time
import tracemalloc
from pathlib import Path

import gguf
import httpx
import numpy as np
import psutil
import pytest
from conftest import engine_processes, tiny_profile

from llmd.daemon.errors import ConfigError
from llmd.daemon.models.profiles import ModelSource, load_profile
from llmd.daemon.placement.estimate import EstimateError, estimate_gguf, read_gguf_header
from llmd.daemon.placement.gguf_header import GgufHeaderError, parse_header
from llmd.daemon.util.redact import MASK, mask_argv
from llmd.drivers.base import LaunchRequest, Placement
from llmd.drivers.registry import load_drivers
from llmd.drivers.settings import LaunchSettings

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
HF_TOKEN = "hf_" + "Q" * 34
GENERIC_500 = "llmd failed on POST /v1/chat/completions; the daemon's log has the details"

# Raises inside the daemon where nothing expects it: a load or pull of `boom`, a request for `boom500`.
FAULTS = textwrap.dedent("""\
    import llmd.daemon.manager.core as core
    import llmd.daemon.manager.loading as loading

    _fetch = loading.Loader.fetch
    _resolve = core.Manager.resolve

    async def fetch(self, inst, profile, update=False):
        if profile.name == "boom":
            raise RuntimeError("injected fault at /srv/private/boom")
        return await _fetch(self, inst, profile, update)

    def resolve(self, model):
        if model == "boom500":
            raise RuntimeError("injected fault at /srv/private/boom500")
        return _resolve(self, model)

    loading.Loader.fetch = fetch
    core.Manager.resolve = resolve
    """)


def _start_with_env(daemon, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Start `daemon` with `env` added to its environment (and to no other process's)."""
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        daemon.start()


def _chat(daemon, model: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(daemon.url + "/v1/chat/completions", json={"model": model, **CHAT, **kwargs}, timeout=60)


# ----- 1. profiles cannot escape -----


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("hf_file", "../../../etc/passwd", "'..' path component"),
    ("hf_file", "sub/../../x.gguf", "'..' path component"),
    ("hf_file", "/etc/passwd", "absolute path"),
    ("hf_file", "model.gguf\nINFO forged log line", "control character"),
    ("hf_file", "a\\..\\b.gguf", "backslash"),
    ("revision", "../../../../tmp/x", "'..' path component"),
    ("revision", "/abs", "absolute path"),
    ("revision", "main\x00", "control character"),
])
def test_hub_names_that_leave_the_repo_make_the_profile_invalid(field: str, value: str, problem: str) -> None:
    source = {"hf_repo": "acme/model-GGUF", "hf_file": "model.gguf", field: value}
    with pytest.raises(ValueError, match=problem):
        ModelSource(**source)


def test_ordinary_hub_names_are_accepted() -> None:
    ModelSource(hf_repo="acme/model.v2-GGUF", hf_file="Q4_K_M/model Q4 00001.gguf", revision="refs/pr/1")
    ModelSource(hf_repo="acme/model", revision="0123456789abcdef0123456789abcdef01234567")


@pytest.mark.engine
def test_pull_of_an_escaping_profile_is_refused_and_the_daemon_serves(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({
        "tiny": tiny_profile(tiny_gguf),
        "evil": 'engine = "llama-cpp"\n[model]\nhf_repo = "acme/x"\nhf_file = "../../../../etc/passwd"\n',
        "evilrev": 'engine = "llama-cpp"\n[model]\nhf_repo = "acme/x"\nhf_file = "x.gguf"\nrevision = "../../../x"\n',
    })
    for name, field in (("evil", "model.hf_file"), ("evilrev", "model.revision")):
        result = daemon.llmctl("pull", name, check=False)
        assert result.returncode != 0
        assert "invalid profile" in result.stderr and field in result.stderr and "'..' path component" in result.stderr
    assert daemon.process.poll() is None
    assert _chat(daemon, "tiny").status_code == 200


@pytest.mark.engine
def test_an_unexpected_error_in_a_job_or_a_request_is_reported_logged_and_survived(  # type: ignore[no-untyped-def]
    make_daemon, tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(FAULTS)
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf), "boom": tiny_profile(tiny_gguf)}, start=False)
    _start_with_env(daemon, monkeypatch, {"PYTHONPATH": f"{faults}:{os.environ.get('PYTHONPATH', '')}"})

    for command in ("pull", "load"):  # two background jobs
        result = daemon.llmctl(command, "boom", check=False)
        assert result.returncode != 0, result.stdout
        assert "internal error of llmd (RuntimeError)" in result.stderr and "daemon's log" in result.stderr
        assert "/srv/private" not in result.stderr
        assert daemon.process.poll() is None, f"llmctl {command} ended the daemon:\n{daemon.log()}"

    # A fault while answering a request: a 500 with no exception text; the traceback is logged.
    response = _chat(daemon, "boom500")
    assert response.status_code == 500
    assert response.json()["error"]["message"] == GENERIC_500
    assert "injected" not in response.text and "/srv/private" not in response.text

    log = daemon.log()
    assert log.count("Traceback (most recent call last)") >= 3
    assert "RuntimeError: injected fault at /srv/private/boom500" in log
    assert "pull 'boom' failed" in log and "RuntimeError: injected fault at /srv/private/boom" in log
    assert _chat(daemon, "tiny").status_code == 200


@pytest.mark.parametrize("arg", ["--host", "--host=0.0.0.0", "--hos=0.0.0.0", "--ho", "--port", "--port=80", "--por", "--po=1"])
def test_every_spelling_argparse_takes_for_host_or_port_is_refused(arg: str) -> None:
    with pytest.raises(ValueError) as caught:
        LaunchSettings(extra_args=[arg, "x"])
    message = str(caught.value)
    assert "is set by llmd" in message and ("--host" in message or "--port" in message)
    if arg not in ("--host", "--port"):
        assert repr(arg) in message  # the arg as written is named


@pytest.mark.parametrize("arg", ["--poll", "--h", "-h", "--help", "--hf-token", "--presence-penalty"])
def test_flags_that_only_share_letters_with_host_or_port_are_kept(arg: str) -> None:
    assert LaunchSettings(extra_args=[arg]).extra_args == [arg]


def test_a_profile_naming_an_abbreviated_listen_flag_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('engine = "llama-cpp"\n[model]\npath = "/x.gguf"\n[launch]\nextra_args = ["--hos=0.0.0.0"]\n')
    with pytest.raises(ConfigError, match=r"launch.extra_args: --host is set by llmd .*'--hos=0.0.0.0'"):
        load_profile(path, {"llama-cpp"})


@pytest.mark.parametrize("engine", ["llama-cpp", "fastllm", "vllm"])
def test_every_builtin_driver_puts_its_own_host_and_port_last(engine: str, tiny_gguf: Path, tiny_hf_dir: Path) -> None:
    from llmd.daemon.models.profiles import Profile

    model = tiny_hf_dir if engine == "vllm" else tiny_gguf
    profile = Profile.model_validate({"engine": engine, "model": {"path": str(model)},
                                      "launch": {"ctx": 512, "extra_args": ["--jinja"]}})
    profile.name = "m"
    request = LaunchRequest(profile=profile, placement=Placement(gpus=(), ctx=512), model_path=model,
                            host="127.0.0.1", port=4321, command=["/opt/engine"], env={})
    argv = load_drivers()[engine].launch(request).argv
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "4321"], argv
    assert argv.count("--host") == 1 and argv.index("--jinja") < len(argv) - 4


# ----- 3. untrusted model files -----


def _header(n_tensors: int, kvs: list[bytes]) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def _kv(key: str, value_type: int, payload: bytes) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", value_type) + payload


def _string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


ARCH = _kv("general.architecture", 8, _string("llama"))
# name -> (the header bytes, what the error names)
ABSURD = {
    "tensor-count": (_header(2**60, [ARCH]), "GGUF.tensor_count = 1152921504606846976"),
    "kv-count": (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62) + ARCH, "GGUF.kv_count = 4611686018427387904"),
    "key-length": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**50), "the name of metadata key #0 (a string) needs 1125899906842624 bytes"),
    "string-length": (_header(0, [ARCH, _kv("general.name", 8, struct.pack("<Q", 2**40))]), "metadata key 'general.name' (a string) needs 1099511627776 bytes"),
    "array-length": (_header(0, [ARCH, _kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2**61))]), "metadata key 'tokenizer.ggml.scores': array length = 2305843009213693952"),
    "string-array": (_header(0, [ARCH, _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**59))]), "metadata key 'tokenizer.ggml.tokens': array length = 576460752303423488"),
    "nested-arrays": (_header(0, [ARCH, _kv("x", 9, struct.pack("<IQ", 9, 1) * 64)]), "metadata key 'x': arrays nested more than 8 deep"),
}


def _write_absurd(folder: Path) -> dict[str, Path]:
    """Each absurd header in a file of 64 KiB (the rest zeros), and a model whose header is sound
    but claims four billion layers."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (header, _) in ABSURD.items():
        paths[name] = folder / f"{name}.gguf"
        paths[name].write_bytes(header.ljust(64 * 1024, b"\0"))
    writer = gguf.GGUFWriter(folder / "layers.gguf", "llama")
    writer.add_block_count(4_000_000_000)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths["layers"] = folder / "layers.gguf"
    return paths


EXPECTED = {**{name: what for name, (_, what) in ABSURD.items()}, "layers": "llama.block_count = 4000000000"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_absurd_counts_in_a_gguf_are_refused_at_once_naming_the_field(name: str, tmp_path: Path) -> None:
    path = _write_absurd(tmp_path)[name]
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(EstimateError) as caught:
            estimate_gguf(path, 512)
        if name != "layers":
            with pytest.raises(EstimateError, match="not a readable GGUF file"):
                read_gguf_header(path)
            with path.open("rb") as stream, pytest.raises(GgufHeaderError):
                parse_header(stream)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(caught.value) and EXPECTED[name] in str(caught.value), caught.value
    assert time.monotonic() - started < 5
    assert peak < 32 * 1024 * 1024, f"{peak} bytes allocated"


@pytest.mark.engine
@pytest.mark.parametrize("gpus", ["simulated", "none"])
def test_plan_and_load_of_an_absurd_gguf_fail_quickly_and_clearly(  # type: ignore[no-untyped-def]
    gpus: str, make_daemon, tiny_gguf: Path, tmp_path: Path
) -> None:
    paths = _write_absurd(tmp_path / "absurd")
    extra = ""
    if gpus == "simulated":
        sim = tmp_path / "gpus.json"
        sim.write_text(json.dumps({"gpus": [{"name": "SimCard", "total_mib": 80_000, "free_mib": 80_000}]}))
        extra = f'[gpus]\nsimulate = "{sim}"\n'
    else:
        del paths["layers"]  # no estimate without GPUs: llama-server judges the layers itself
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf), **{name: tiny_profile(path) for name, path in paths.items()}},
                         extra_config=extra)
    daemon_process = psutil.Process(daemon.process.pid)
    rss_before = daemon_process.memory_info().rss
    for name, path in paths.items():
        for command in ("plan", "load"):
            started = time.monotonic()
            result = daemon.llmctl(command, name, check=False)
            took = time.monotonic() - started
            assert result.returncode != 0, f"{command} {name}: {result.stdout}"
            assert str(path) in result.stderr and EXPECTED[name] in result.stderr, f"{command} {name}: {result.stderr}"
            assert took < 30, f"{command} {name} took {took:.1f}s"
    assert not [p for p in engine_processes(daemon.state_dir)], "no engine was started on an absurd file"
    assert daemon_process.memory_info().rss - rss_before < 64 * 1024 * 1024
    assert _chat(daemon, "tiny").status_code == 200


# ----- 4. secrets stay secret -----


def test_argv_values_that_look_like_secrets_are_masked() -> None:
    argv = ["llama-server", "--model", "/models/task-sk-like-name.gguf", "--api-key", "abc", "--hf-token=xyz",
            "HF_TOKEN=abc", "sk-" + "a" * 40, "--x=sk-" + "b" * 40, "--ssl-key-file", "/etc/k.pem",
            "--override-kv", "tokenizer.ggml.add_bos_token=bool:false", "--password", "--jinja", "--port", "1"]
    assert mask_argv(argv) == ["llama-server", "--model", "/models/task-sk-like-name.gguf", "--api-key", MASK,
                               f"--hf-token={MASK}", f"HF_TOKEN={MASK}", MASK, f"--x={MASK}", "--ssl-key-file",
                               "/etc/k.pem", "--override-kv", "tokenizer.ggml.add_bos_token=bool:false", "--password",
                               "--jinja", "--port", "1"]


@pytest.mark.engine
def test_secrets_reach_no_engine_ps_log_or_client(make_daemon, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    profile = tiny_profile(tiny_gguf, extra_args=["--hf-token", HF_TOKEN]) + '[launch.env]\nFROM_PROFILE = "1"\n'
    daemon = make_daemon({"tiny": profile, "open": tiny_profile(tiny_gguf, extra_args=["--hos=0.0.0.0"])}, start=False)
    secrets = {"HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HF_TOKEN, "VLLM_API_KEY": "vllm-secret",
               "OPENAI_API_KEY": "sk-" + "z" * 40, "AWS_SECRET_ACCESS_KEY": "aws-secret", "CUDA_AUTH_TOKEN": "x"}
    _start_with_env(daemon, monkeypatch, {**secrets, "OMP_NUM_THREADS": "1", "GGML_HARDENING_TEST": "passed"})
    daemon.llmctl("load", "tiny")
    (row,) = [row for row in daemon.ps() if row["model"] == "tiny"]

    # The engine's environment: what it needs, the profile's, llmd's marks; none of the secrets.
    environ = psutil.Process(row["pid"]).environ()
    assert not set(secrets) & set(environ), sorted(set(secrets) & set(environ))
    assert environ["OMP_NUM_THREADS"] == "1" and environ["GGML_HARDENING_TEST"] == "passed"
    assert environ["FROM_PROFILE"] == "1" and environ["LLMD_OWNER"] == str(daemon.state_dir)
    assert "PATH" in environ and "HOME" in environ
    assert psutil.Process(daemon.process.pid).environ()["HF_TOKEN"] == HF_TOKEN  # downloads still have it

    # The engine got the token; `ps`, its log and the pid ledger show it masked.
    assert HF_TOKEN in psutil.Process(row["pid"]).cmdline()
    argv = row["argv"]
    assert HF_TOKEN not in json.dumps(daemon.ps()) and argv[argv.index("--hf-token") + 1] == MASK
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", str(row["port"])]  # llmd's own listen flags last
    assert HF_TOKEN not in Path(row["log"]).read_text() and HF_TOKEN not in daemon.log()
    assert HF_TOKEN not in (daemon.state_dir / "engines.json").read_text()

    # Replies carry no engine Server header, whole or streamed.
    for stream in (False, True):
        reply = _chat(daemon, "tiny", stream=stream)
        assert reply.status_code == 200
        assert not any("llama" in value.lower() for value in reply.headers.get_list("server")), reply.headers

    # A profile that abbreviates --host is refused, naming the arg as written.
    refused = daemon.llmctl("load", "open", check=False)
    assert refused.returncode != 0 and "'--hos=0.0.0.0' means --host" in refused.stderr
