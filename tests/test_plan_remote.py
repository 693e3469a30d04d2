"""Planning a Hugging Face GGUF before it is downloaded: its header is read from the Hub with
range requests (a few KB of a file of tens of MB), the estimate equals the one made from the
file itself, nothing enters the Hugging Face cache, and a second plan asks the Hub nothing.

The Hub is `hub_standin` serving generated GGUFs whose weights are zeros written sparsely."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import BIN, write_client_config
from hub_standin import HubStandin
from huggingface_hub import constants

from llmd.daemon.engines.supervisor import free_port
from llmd.daemon.models import remote_gguf
from llmd.daemon.models.downloads import HubUnreachableError, ModelNotFoundError
from llmd.daemon.models.profiles import ModelSource, load_profile
from llmd.daemon.models.range_reader import RangeReader
from llmd.daemon.models.remote_gguf import read_hub_gguf
from llmd.daemon.placement.estimate import EstimateError, estimate_gguf, estimate_profile
from llmd.daemon.placement.gguf_header import parse_header

MIB = 1024 * 1024
REPO = "acme/big-GGUF"
FILE = "big-Q8_0.gguf"
SPLIT_REPO = "acme/split-GGUF"
CARD_MIB = 80_000


# --- generated models ------------------------------------------------------------------------


def write_sparse_gguf(path: Path, *, n_layers: int = 4, n_embd: int = 512, n_ff: int = 2048, n_vocab: int = 32000,
                      tokens: int = 0, token_bytes: int = 16, layers: range | None = None, with_embeddings: bool = True,
                      split: tuple[int, int] | None = None) -> Path:
    """A llama GGUF whose header is a few KB (more with `tokens` tokenizer entries of
    `token_bytes` each) and whose weights (Q8_0 and F16, zeros) are a hole in the file: tens
    of MB that take no disk.

    `layers` and `with_embeddings` choose the tensors in this file; `split` = (index, count)
    marks it as one part of a split model (only the first part carries the model's metadata)."""
    writer = gguf.GGUFWriter(path, "llama")
    if split is None or split[0] == 0:
        writer.add_block_count(n_layers)
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(8)
        writer.add_head_count_kv(4)
        writer.add_context_length(4096)
        writer.add_vocab_size(n_vocab)
        writer.add_layer_norm_rms_eps(1e-6)
        if tokens:
            writer.add_tokenizer_model("llama")
            writer.add_token_list([f"tok{i:06d}".ljust(token_bytes, "_") for i in range(tokens)])
    if split is not None:
        writer.add_uint16("split.no", split[0])
        writer.add_uint16("split.count", split[1])
    kv = n_embd // 8 * 4

    def tensor(name: str, shape: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> None:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(shape)) * size // block
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)

    q8, f16, f32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    if with_embeddings:
        tensor("token_embd.weight", (n_vocab, n_embd), q8)
        tensor("output_norm.weight", (n_embd,), f32)
        tensor("output.weight", (n_vocab, n_embd), f16)
    for i in layers if layers is not None else range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", (n_embd,), f32)
        tensor(f"blk.{i}.attn_q.weight", (n_embd, n_embd), q8)
        tensor(f"blk.{i}.attn_k.weight", (kv, n_embd), q8)
        tensor(f"blk.{i}.attn_v.weight", (kv, n_embd), q8)
        tensor(f"blk.{i}.attn_output.weight", (n_embd, n_embd), q8)
        tensor(f"blk.{i}.ffn_norm.weight", (n_embd,), f32)
        tensor(f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), q8)
        tensor(f"blk.{i}.ffn_up.weight", (n_ff, n_embd), q8)
        tensor(f"blk.{i}.ffn_down.weight", (n_embd, n_ff), q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    # The weights: zeros after the aligned end of the header, as a hole in the file.
    header = path.stat().st_size
    alignment = writer.data_alignment
    data = sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, alignment) for ti in writer.tensors[0].values())
    with path.open("r+b") as fh:
        fh.truncate(gguf.GGUFWriter.ggml_pad(header, alignment) + data)
    return path


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_sparse_gguf(tmp_path_factory.mktemp("remote") / FILE, n_layers=6)
    assert path.stat().st_size > 64 * MIB
    return path


@pytest.fixture(scope="module")
def split_gguf(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A model in three parts; the first has a 3.5 MB tokenizer (few, long tokens: GGUFReader
    takes its time over each), more than one range request reads."""
    folder = tmp_path_factory.mktemp("split")
    parts = [(range(0, 2), True, 5000), (range(2, 4), False, 0), (range(4, 6), False, 0)]
    return [
        write_sparse_gguf(folder / f"big-Q8_0-{i + 1:05d}-of-00003.gguf", n_layers=6, layers=layers,
                          with_embeddings=embeddings, tokens=tokens, token_bytes=700, split=(i, 3))
        for i, (layers, embeddings, tokens) in enumerate(parts)
    ]


@pytest.fixture
def hub(big_gguf: Path, split_gguf: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    with HubStandin() as standin:
        standin.add_commit(REPO, {FILE: big_gguf.read_bytes(), "README.md": b"big"})
        standin.add_commit(SPLIT_REPO, {f"Q8_0/{part.name}": part.read_bytes() for part in split_gguf})
        # Child processes (a daemon, llmctl) read these; this process gets its cache below.
        standin.use_in_env(monkeypatch, tmp_path / "hf-home")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        yield standin


def _same(estimate: dict[str, object], expected: dict[str, object]) -> None:
    """Two estimate breakdowns agree on everything but where they were read."""
    assert {k: v for k, v in estimate.items() if k != "source"} == {k: v for k, v in expected.items() if k != "source"}


def _hf_cache_holds(hf_home: Path, repo: str) -> list[Path]:
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --- reading headers by range ----------------------------------------------------------------


def test_the_range_reader_reads_ahead_in_growing_chunks() -> None:
    data = bytes(range(256)) * 40_000  # ~10 MB
    asked: list[tuple[int, int]] = []

    def fetch(start: int, end: int) -> bytes:
        asked.append((start, end))
        return data[start:end]

    reader = RangeReader(fetch, len(data), first_chunk=MIB, max_chunk=4 * MIB)
    assert reader.read(10) == data[:10] and asked == [(0, MIB)]
    reader.seek(2 * MIB)
    assert reader.read(5) == data[2 * MIB:2 * MIB + 5]
    assert reader.read(MIB) == data[2 * MIB + 5:3 * MIB + 5]
    assert asked == [(0, MIB), (MIB, 3 * MIB), (3 * MIB, 7 * MIB)]  # 1 MiB, then 2, then 4
    reader.seek(9 * MIB)
    reader.read(1)
    assert asked[-1] == (7 * MIB, len(data))  # 4 MiB at most, and never past the end
    reader.seek(-4, os.SEEK_END)
    assert reader.read() == data[-4:]
    assert reader.kept() == data and reader.fetched == len(data)
    # Seeded with kept bytes, it reads them without a fetch, and finds the end after them.
    again = RangeReader(None, None, prefix=data[:100])
    assert again.read(200) == data[:100] and again.read(1) == b""


def test_the_header_parser_agrees_with_gguf_reader(big_gguf: Path, split_gguf: list[Path]) -> None:
    for path in (big_gguf, split_gguf[0]):
        with path.open("rb") as fh:
            header = parse_header(fh)
        reader = gguf.GGUFReader(path, "r")
        assert list(header.tensors) == [(t.name, int(t.n_bytes)) for t in reader.tensors]
        assert header.metadata["general.architecture"] == "llama"
        assert header.length < 4 * MIB < path.stat().st_size


def test_a_hub_gguf_is_estimated_from_its_header_alone(hub: HubStandin, big_gguf: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    source = ModelSource(hf_repo=REPO, hf_file=FILE)
    remote = read_hub_gguf(source, state, endpoint=hub.url)

    expected = estimate_gguf(big_gguf, 8192, parallel=2)
    got = estimate_gguf(remote, 8192, parallel=2)
    _same(got.breakdown(), expected.breakdown())
    assert got.source.startswith(f"gguf:hf://{REPO}@") and got.source.endswith(f"/{FILE}")

    size = big_gguf.stat().st_size
    served = hub.bytes_served(FILE)
    assert 0 < served <= 1 * MIB and served * 32 < size  # one read-ahead chunk, not the file
    assert all(r.range is not None for r in hub.gets(FILE))
    assert not _hf_cache_holds(tmp_path / "hf-home", REPO)

    # Planned again: the kept header answers, and the Hub hears nothing.
    hub.clear()
    again = read_hub_gguf(source, state, endpoint=hub.url)
    assert again == remote and hub.requests == []


def test_every_part_of_a_split_gguf_is_read(hub: HubStandin, split_gguf: list[Path], tmp_path: Path) -> None:
    source = ModelSource(hf_repo=SPLIT_REPO, hf_file=f"Q8_0/{split_gguf[0].name}")
    remote = read_hub_gguf(source, tmp_path / "state", endpoint=hub.url)
    assert len(remote.parts) == 3
    _same(estimate_gguf(remote, 4096).breakdown(), estimate_gguf(split_gguf[0], 4096).breakdown())
    for part in split_gguf:
        assert hub.gets(part.name), f"{part.name} was not read"
        assert hub.bytes_served(part.name) < part.stat().st_size / 4
    # The first part's 3.5 MB tokenizer took more than one request: 1 MiB, then 2, then 4.
    assert len(hub.gets(split_gguf[0].name)) == 3


def test_a_server_that_ignores_ranges_is_read_no_further_than_the_header(hub: HubStandin, big_gguf: Path,
                                                                           tmp_path: Path) -> None:
    hub.ignore_ranges(FILE)
    remote = read_hub_gguf(ModelSource(hf_repo=REPO, hf_file=FILE), None, endpoint=hub.url)
    _same(estimate_gguf(remote, 4096).breakdown(), estimate_gguf(big_gguf, 4096).breakdown())
    assert len(hub.gets(FILE)) == 1  # the first answer held the header: no second request
    assert not _hf_cache_holds(tmp_path / "hf-home", REPO)


def test_a_moved_branch_is_read_again_after_a_while(hub: HubStandin, big_gguf: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    source = ModelSource(hf_repo=REPO, hf_file=FILE)
    first = read_hub_gguf(source, state, endpoint=hub.url)
    smaller = write_sparse_gguf(tmp_path / "smaller.gguf", n_layers=2, n_vocab=1000)
    hub.add_commit(REPO, {FILE: smaller.read_bytes()})
    assert read_hub_gguf(source, state, endpoint=hub.url) == first  # trusted for a while
    monkeypatch.setattr(remote_gguf, "RECHECK_AFTER", 0.0)
    moved = read_hub_gguf(source, state, endpoint=hub.url)
    assert moved.identity != first.identity and moved.parts[0].metadata["llama.block_count"] == 2


def test_hub_errors_name_the_endpoint_and_bad_files_the_profile_key(hub: HubStandin, tmp_path: Path) -> None:
    missing = ModelSource(hf_repo=REPO, hf_file="nope.gguf")
    with pytest.raises(ModelNotFoundError, match=f"nope.gguf.*{re.escape(hub.url)}.*hf_file"):
        read_hub_gguf(missing, None, endpoint=hub.url)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubUnreachableError, match=re.escape(dead)):
        read_hub_gguf(ModelSource(hf_repo=REPO, hf_file=FILE), None, endpoint=dead)
    hub.add_commit("acme/not-gguf", {"fake.gguf": b"PK\x03\x04 a zip file, not a model" * 10})
    with pytest.raises(EstimateError, match="not a readable GGUF file.*hf_file"):
        read_hub_gguf(ModelSource(hf_repo="acme/not-gguf", hf_file="fake.gguf"), None, endpoint=hub.url)


# --- through llmctl --------------------------------------------------------------------------


def _gpus(tmp_path: Path) -> Path:
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "SimCard", "total_mib": CARD_MIB, "free_mib": CARD_MIB}]}))
    return sim


def _profile(repo: str = REPO, file: str = FILE) -> str:
    return f'engine = "llama-cpp"\n[model]\nhf_repo = "{repo}"\nhf_file = "{file}"\n[launch]\nctx = 4096\n'


def _expected(profile_path: Path, local: Path) -> dict[str, object]:
    return estimate_profile(load_profile(profile_path, {"llama-cpp"}), local).breakdown()


@pytest.mark.engine
def test_llmctl_plan_reads_the_header_of_a_model_not_downloaded(make_daemon, hub: HubStandin, big_gguf: Path,
                                                                tmp_path: Path) -> None:
    daemon = make_daemon({"big": _profile()}, extra_config=f'[gpus]\nsimulate = "{_gpus(tmp_path)}"\n')
    report = json.loads(daemon.llmctl("plan", "big", "--json").stdout)
    assert report["fits"] is True and report["gpus"]
    assert "GGUF header on the Hub" in report["need_source"]
    _same(report["estimate"], _expected(daemon.profiles_dir / "big.toml", big_gguf))
    assert hub.bytes_served(FILE) * 32 < big_gguf.stat().st_size
    assert not _hf_cache_holds(tmp_path / "hf-home", REPO)  # planning downloads nothing

    hub.clear()
    text = daemon.llmctl("plan", "big")
    assert "placement: GPU 0" in text.stdout
    assert hub.requests == []  # the kept header: no network the second time


@pytest.mark.engine
def test_errors_name_the_hub_the_daemon_uses(make_daemon, hub: HubStandin, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", dead)  # the daemon's Hub: nothing answers there
    daemon = make_daemon({"big": _profile()})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # llmctl's own: the stand-in
    plan = daemon.llmctl("plan", "big", check=False)
    assert plan.returncode == 1 and dead in plan.stderr and hub.url not in plan.stderr

    config = daemon.root / "llmd.toml"
    made = daemon.llmctl("--config", str(config), "profile", "new", "big2", "--from-hf", REPO, "--json")
    report = json.loads(made.stdout)  # the listing came through llmctl's Hub, the plan from the daemon's
    assert report["planned_by"] == "daemon" and report["plan"] is None
    assert dead in report["plan_error"] and hub.url not in report["plan_error"]


@pytest.mark.engine
def test_profile_new_from_hf_is_planned_by_the_daemon_before_a_pull(make_daemon, hub: HubStandin, big_gguf: Path,
                                                                    tmp_path: Path) -> None:
    daemon = make_daemon(extra_config=f'[gpus]\nsimulate = "{_gpus(tmp_path)}"\n')
    config = daemon.root / "llmd.toml"
    made = daemon.llmctl("--config", str(config), "profile", "new", "big", "--from-hf", REPO, "--ctx", "4096", "--json")
    report = json.loads(made.stdout)
    assert report["planned_by"] == "daemon" and report["plan_error"] is None
    assert report["plan"]["fits"] is True
    _same(report["plan"]["estimate"], _expected(daemon.profiles_dir / "big.toml", big_gguf))
    assert hub.bytes_served(FILE) * 32 < big_gguf.stat().st_size
    assert not _hf_cache_holds(tmp_path / "hf-home", REPO)


def test_profile_new_from_hf_without_a_daemon_plans_from_the_header(hub: HubStandin, big_gguf: Path,
                                                                    tmp_path: Path) -> None:
    root = tmp_path / "offline"
    (root / "profiles").mkdir(parents=True)
    config = write_client_config(root, root / "nobody.sock", root / "profiles")
    config.write_text(config.read_text() + f'[gpus]\nsimulate = "{_gpus(tmp_path)}"\n')
    environment = {key: value for key, value in os.environ.items() if key not in ("LLMD_SOCKET", "LLMD_CONFIG")}
    result = subprocess.run([str(BIN / "llmctl"), "--config", str(config), "profile", "new", "big", "--from-hf", REPO,
                             "--ctx", "4096", "--json"], capture_output=True, text=True, timeout=120, env=environment)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["planned_by"] == "local" and report["plan"]["fits"] is True
    assert tomllib.loads((root / "profiles" / "big.toml").read_text())["model"]["hf_file"] == FILE
    _same(report["plan"]["estimate"], _expected(root / "profiles" / "big.toml", big_gguf))
    assert hub.bytes_served(FILE) * 32 < big_gguf.stat().st_size
    assert not _hf_cache_holds(tmp_path / "hf-home", REPO)


# --- pull of a name that is not a profile ----------------------------------------------------


@pytest.mark.engine
def test_pull_of_an_unknown_name_points_at_profile_new_from_hf(make_daemon) -> None:
    daemon = make_daemon()
    unknown = daemon.llmctl("pull", "qwen3", check=False)
    assert unknown.returncode == 1
    assert "'qwen3' does not exist" in unknown.stderr
    assert "llmctl profile new qwen3 --from-hf OWNER/REPO" in unknown.stderr

    repo = daemon.llmctl("pull", "Qwen/Qwen3-0.6B-GGUF", check=False)
    assert repo.returncode == 2
    assert "llmctl profile new NAME --from-hf Qwen/Qwen3-0.6B-GGUF" in repo.stderr


def test_a_header_that_never_ends_is_refused(tmp_path: Path) -> None:
    """A file that claims a header beyond any real one is not read on into its weights."""
    bogus = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    bogus += (3).to_bytes(8, "little") + b"key" + (8).to_bytes(4, "little") + (2**40).to_bytes(8, "little")
    with pytest.raises(ValueError, match="larger than"):
        parse_header(io.BytesIO(bogus))
