"""Tiny but real models, written on the spot: a GGUF file, or a Hugging Face model directory.

Tests, the quick-start demo and `llmctl doctor` need a model that a real engine (llama-server,
fastllm, vLLM) loads and answers with, without downloading gigabytes. A model with random weights is
enough for that: it exercises loading, the tokenizer, the chat template, generation and the
engine's lifecycle. Its output is random text; it says nothing about quality.

The default shape is about 0.5 MB and loads in well under a second. Larger shapes (more layers,
wider embeddings) make loading take measurable time, which swap and timing tests want.

The Hugging Face directory (`write_tiny_hf_dir`) holds no weights: vLLM starts it with
`--load-format dummy`, which fills random weights itself. Both formats share one tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np

__all__ = ["CHAT_TEMPLATE", "TINY_MODEL_NAME", "tiny_vocab", "write_tiny_gguf", "write_tiny_hf_dir"]

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
    n_expert: int = 0,
    n_expert_used: int = 2,
) -> Path:
    """Write a random-weight llama-architecture GGUF model to `path` and return `path`.

    `n_head_kv < n_head` gives grouped-query attention. With `n_expert`, each layer's
    feed-forward is a mixture of that many experts (`n_ff` wide each), `n_expert_used` of them
    per token: a MoE model, whose experts llama.cpp can keep on the CPU (`--n-cpu-moe`). The
    same arguments and seed always give the same file. The file appears atomically (written
    beside `path`, then renamed), so a concurrent reader, or a crash mid-write, never sees a
    truncated model.
    """
    path = Path(path)
    head_dim = _check_shape(n_layers, n_embd, n_ff, n_head, n_head_kv, ctx)
    if n_expert and not 0 < n_expert_used <= n_expert:
        raise ValueError(f"n_expert_used must be between 1 and n_expert ({n_expert}), got {n_expert_used}")
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
        if n_expert:
            writer.add_expert_count(n_expert)
            writer.add_expert_used_count(n_expert_used)
            writer.add_expert_feed_forward_length(n_ff)
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
            if n_expert:
                # The router, then each expert's gate, up and down, stacked (llama.cpp's *_exps).
                writer.add_tensor(f"{blk}.ffn_gate_inp.weight", weight(n_expert, n_embd))
                writer.add_tensor(f"{blk}.ffn_gate_exps.weight", weight(n_expert, n_ff, n_embd))
                writer.add_tensor(f"{blk}.ffn_up_exps.weight", weight(n_expert, n_ff, n_embd))
                writer.add_tensor(f"{blk}.ffn_down_exps.weight", weight(n_expert, n_embd, n_ff))
            else:
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


def _byte_level_tokenizer_json() -> str:
    """tokenizer.json for the same vocabulary as `tiny_vocab`, built with the `tokenizers` package.

    Imported here, not at the top, so that writing GGUF files does not need `tokenizers`.
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ImportError(
            "write_tiny_hf_dir needs the `tokenizers` package; install it with `pip install tokenizers`"
        ) from None
    tokens, _types, _merges, _bos, _eos = tiny_vocab()
    normal = tokens[: len(tokens) - len(_SPECIAL)]
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(normal)}, merges=list(_MERGES))
    tokenizer = Tokenizer(bpe)
    # GPT-2 style: bytes map to printable characters, and spaces stay attached to the next word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Added in vocabulary order, so they get the same ids as in the GGUF file.
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in _SPECIAL])
    for tok in _SPECIAL:
        if tokenizer.token_to_id(tok) != tokens.index(tok):  # pragma: no cover - a tokenizers change
            raise RuntimeError(f"special token {tok!r} got id {tokenizer.token_to_id(tok)}, expected {tokens.index(tok)}")
    return tokenizer.to_str(pretty=True)


def write_tiny_hf_dir(
    path: Path,
    *,
    n_layers: int = 2,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    n_head: int = 2,
    n_head_kv: int = 2,
    ctx: int = 2048,
    dtype: str = "bfloat16",
) -> Path:
    """Write a weightless `LlamaForCausalLM` model directory to `path` and return `path`.

    It holds `config.json`, a byte-level BPE `tokenizer.json` and a `tokenizer_config.json` with
    the ChatML chat template: what vLLM needs to start with `--load-format dummy`. The default
    head size is 64 (128 wide, 2 heads) because vLLM's CPU attention kernels reject small head
    sizes such as 16. Like `write_tiny_gguf`, the directory appears atomically: it is written
    beside `path` and renamed into place; an existing directory at `path` is replaced.
    """
    path = Path(path)
    head_dim = _check_shape(n_layers, hidden_size, intermediate_size, n_head, n_head_kv, ctx)
    tokens, _types, _merges, bos_id, eos_id = tiny_vocab()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _BOS,
        "eos_token": _EOS,
        "pad_token": _EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": ctx,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    files = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "tokenizer.json": _byte_level_tokenizer_json(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "generation_config.json": json.dumps(generation_config, indent=2) + "\n",
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        tmp.chmod(0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
