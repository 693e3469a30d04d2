"""The tiny GGUF writer produces a well-formed file with the requested shape (no engine needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from llmd.daemon.models.tinymodel import CHAT_TEMPLATE, tiny_vocab, write_tiny_gguf


def _field(reader: GGUFReader, key: str):
    field = reader.fields[key]
    return field.contents()


def _shapes(reader: GGUFReader) -> dict[str, tuple[int, ...]]:
    # GGUFReader reports ggml order (innermost first): the reverse of the numpy shape written.
    return {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}


def test_default_model_is_readable_with_expected_metadata(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m" / "tiny.gguf")
    assert path == tmp_path / "m" / "tiny.gguf"
    assert path.is_file()
    assert 100_000 < path.stat().st_size < 2_000_000
    # Nothing left behind from the atomic write.
    assert [p.name for p in path.parent.iterdir()] == ["tiny.gguf"]

    reader = GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.feed_forward_length") == 128
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 4
    assert _field(reader, "llama.context_length") == 2048
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

    tokens = _field(reader, "tokenizer.ggml.tokens")
    tok, _, merges, bos, eos = tiny_vocab()
    assert tokens == tok
    assert len(tokens) >= 256
    assert _field(reader, "tokenizer.ggml.merges") == merges and merges
    assert _field(reader, "tokenizer.ggml.bos_token_id") == bos
    assert _field(reader, "tokenizer.ggml.eos_token_id") == eos
    assert tokens[eos] == "<|im_end|>"
    # Byte-level tokens use GPT-2's printable map: the space byte is "Ġ".
    assert "Ġ" in tokens and " " not in tokens

    n_vocab = len(tokens)
    shapes = _shapes(reader)
    assert shapes["token_embd.weight"] == (64, n_vocab)
    assert shapes["output.weight"] == (64, n_vocab)
    assert shapes["output_norm.weight"] == (64,)
    for i in range(2):
        assert shapes[f"blk.{i}.attn_norm.weight"] == (64,)
        assert shapes[f"blk.{i}.attn_q.weight"] == (64, 64)
        assert shapes[f"blk.{i}.attn_k.weight"] == (64, 64)
        assert shapes[f"blk.{i}.attn_v.weight"] == (64, 64)
        assert shapes[f"blk.{i}.attn_output.weight"] == (64, 64)
        assert shapes[f"blk.{i}.ffn_norm.weight"] == (64,)
        assert shapes[f"blk.{i}.ffn_gate.weight"] == (64, 128)
        assert shapes[f"blk.{i}.ffn_up.weight"] == (64, 128)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (128, 64)
    assert len(shapes) == 2 + 9 * 2 + 1
    assert all(t.data.dtype == np.float32 for t in reader.tensors)
    assert all(np.isfinite(t.data).all() for t in reader.tensors)


def test_grouped_query_attention_shapes(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "gqa.gguf", n_layers=3, n_embd=128, n_ff=256, n_head=8, n_head_kv=2)
    reader = GGUFReader(path)
    assert _field(reader, "llama.attention.head_count") == 8
    assert _field(reader, "llama.attention.head_count_kv") == 2
    shapes = _shapes(reader)
    # head_dim 16, 2 KV heads: K and V project to 32.
    assert shapes["blk.2.attn_k.weight"] == (128, 32)
    assert shapes["blk.2.attn_v.weight"] == (128, 32)
    assert shapes["blk.2.attn_q.weight"] == (128, 128)
    assert "blk.3.attn_q.weight" not in shapes


def test_same_seed_same_bytes_and_overwrite(tmp_path: Path) -> None:
    a = write_tiny_gguf(tmp_path / "a.gguf", seed=7)
    b = write_tiny_gguf(tmp_path / "b.gguf", seed=7)
    c = write_tiny_gguf(tmp_path / "c.gguf", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    write_tiny_gguf(a, seed=8)  # replaces an existing file
    assert a.read_bytes() == c.read_bytes()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_embd": 64, "n_head": 3},
        {"n_head": 4, "n_head_kv": 3},
        {"n_layers": 0},
        {"n_embd": 12, "n_head": 4},  # odd head size
    ],
)
def test_rejects_impossible_shapes(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        write_tiny_gguf(tmp_path / "bad.gguf", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_hf_dir_for_vllm(tmp_path: Path) -> None:
    import json

    from tokenizers import Tokenizer

    from llmd.daemon.models.tinymodel import write_tiny_hf_dir

    path = write_tiny_hf_dir(tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing left from the atomic write
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # vLLM's CPU attention kernels need a head size of 64 (they reject 16).
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    tokens, _types, _merges, bos_id, eos_id = tiny_vocab()
    assert config["vocab_size"] == len(tokens) and config["eos_token_id"] == eos_id

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = "<|im_start|>user\nhello the world<|im_end|>"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert ids[0] == tokens.index("<|im_start|>") and ids[-1] == eos_id  # same ids as the GGUF
    assert tokenizer.token_to_id("<|startoftext|>") == bos_id

    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert tokenizer_config["eos_token"] == "<|im_end|>"

    # Writing again replaces the directory.
    assert write_tiny_hf_dir(path, n_layers=3) == path
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 3
