"""Tiny but real GGUF models, written on the spot.

Tests, the quick-start demo and `llmctl doctor` need a model that a real engine (llama-server,
fastllm) loads and answers with, without downloading gigabytes. A model with random weights is
enough for that: it exercises loading, the tokenizer, the chat template, generation and the
engine's lifecycle. Its output is random text; it says nothing about quality.

The default shape is about 0.5 MB and loads in well under a second. Larger shapes (more layers,
wider embeddings) make loading take measurable time, which swap and timing tests want.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np

__all__ = ["CHAT_TEMPLATE", "TINY_MODEL_NAME", "tiny_vocab", "write_tiny_gguf"]

TINY_MODEL_NAME = "llmd-tiny"

# ChatML, the format most chat models use; llama.cpp also recognises it without a jinja engine.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_BOS = "<|startoftext|>"
_EOS = "<|im_end|>"
_SPECIAL = [_BOS, _EOS, "<|im_start|>"]

# A few merges, so the BPE tokenizer has a merge table (llama.cpp refuses an empty one) and
# common English text actually merges. Each merged string is also added to the vocabulary.
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character map.

    Byte-level BPE vocabularies store each byte as a printable character; llama.cpp looks byte
    tokens up through this exact map, so raw bytes (e.g. a bare space) would not be found.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tiny_vocab() -> tuple[list[str], list[int], list[str], int, int]:
    """The tokenizer: (tokens, token types, merges, bos id, eos id).

    256 byte tokens first, then the merged tokens, then the special tokens of the chat template.
    """
    byte_tokens = list(_bytes_to_unicode().values())
    merged = [a + b for a, b in _MERGES]
    tokens = byte_tokens + merged + _SPECIAL
    types = [int(gguf.TokenType.NORMAL)] * (len(byte_tokens) + len(merged)) + [
        int(gguf.TokenType.CONTROL)
    ] * len(_SPECIAL)
    merges = [f"{a} {b}" for a, b in _MERGES]
    return tokens, types, merges, tokens.index(_BOS), tokens.index(_EOS)


def _check_shape(n_layers: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, ctx: int) -> int:
    """Reject shapes the engine would refuse later with a less clear message; return the head size."""
    for name, value in (
        ("n_layers", n_layers),
        ("n_embd", n_embd),
        ("n_ff", n_ff),
        ("n_head", n_head),
        ("n_head_kv", n_head_kv),
        ("ctx", ctx),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError(f"head size n_embd/n_head = {head_dim} must be even for rotary embeddings")
    return head_dim


def write_tiny_gguf(
    path: Path,
    *,
    n_layers: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int = 4,
    ctx: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-weight llama-architecture GGUF model to `path` and return `path`.

    `n_head_kv < n_head` gives grouped-query attention. The same arguments and seed always give
    the same file. The file appears atomically (written beside `path`, then renamed), so a
    concurrent reader, or a crash mid-write, never sees a truncated model.
    """
    path = Path(path)
    head_dim = _check_shape(n_layers, n_embd, n_ff, n_head, n_head_kv, ctx)
    tokens, types, merges, bos_id, eos_id = tiny_vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        # Scaled like a real initialisation, so activations stay finite through the layers.
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(TINY_MODEL_NAME)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_vocab_size(n_vocab)
        writer.add_context_length(ctx)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(bos_id)
        writer.add_eos_token_id(eos_id)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

        # numpy shapes are the reverse of ggml's: ggml {n_embd, n_vocab} is numpy (n_vocab, n_embd).
        n_embd_kv = n_head_kv * head_dim
        writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
        for i in range(n_layers):
            blk = f"blk.{i}"
            writer.add_tensor(f"{blk}.attn_norm.weight", norm())
            writer.add_tensor(f"{blk}.attn_q.weight", weight(n_embd, n_embd))
            writer.add_tensor(f"{blk}.attn_k.weight", weight(n_embd_kv, n_embd))
            writer.add_tensor(f"{blk}.attn_v.weight", weight(n_embd_kv, n_embd))
            writer.add_tensor(f"{blk}.attn_output.weight", weight(n_embd, n_embd))
            writer.add_tensor(f"{blk}.ffn_norm.weight", norm())
            writer.add_tensor(f"{blk}.ffn_gate.weight", weight(n_ff, n_embd))
            writer.add_tensor(f"{blk}.ffn_up.weight", weight(n_ff, n_embd))
            writer.add_tensor(f"{blk}.ffn_down.weight", weight(n_embd, n_ff))
        writer.add_tensor("output_norm.weight", norm())
        writer.add_tensor("output.weight", weight(n_vocab, n_embd))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
