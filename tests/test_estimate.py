"""The estimator's arithmetic, on files written here (no engine needed)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from llmd.daemon.placement.estimate import (
    GPU_OVERHEAD_MIB,
    Estimate,
    EstimateError,
    ModelShape,
    cache_bytes_per_element,
    compute_bytes,
    estimate_gguf,
    estimate_hf_dir,
    estimate_profile,
    kv_cells,
)
from llmd.daemon.models.profiles import Profile
from llmd.daemon.models.tinymodel import tiny_vocab, write_tiny_gguf

MIB = 1024 * 1024
F32 = 4


# --- helpers -------------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, meta: dict[str, object], tensors: dict[str, tuple[int, ...]]) -> Path:
    """A GGUF with the given `{arch}.*` metadata and zero-filled f32 tensors (numpy shapes)."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        full = f"{arch}.{key}"
        if isinstance(value, list):
            writer.add_array(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        else:
            writer.add_uint32(full, int(value))
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_tensor_bytes(n_layers: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int) -> tuple[int, int]:
    """(bytes per layer, bytes outside layers) of `write_tiny_gguf`'s f32 model."""
    n_vocab = len(tiny_vocab()[0])
    kv = n_embd // n_head * n_head_kv
    layer = (2 * n_embd + 2 * n_embd * n_embd + 2 * kv * n_embd + 3 * n_ff * n_embd) * F32
    other = (2 * n_vocab * n_embd + n_embd) * F32
    return layer, other


def tiny_shape(**overrides: object) -> ModelShape:
    base = dict(n_layers=4, n_embd=256, n_ff=704, n_head=8, n_head_kv=(2,) * 4, head_dim_k=32, head_dim_v=32,
                n_vocab=265)
    base.update(overrides)
    return ModelShape(**base)  # type: ignore[arg-type]


# --- building blocks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ctx", "parallel", "unified", "cells"),
    [
        (2048, 1, False, 2048),
        (300, 1, False, 512),  # padded to 256
        (2048, 4, True, 2048),  # one shared stream
        (2048, 2, False, 2048),
        (2048, 3, False, 2304),  # 3 streams of 768 (682 padded up)
        (1000, 2, False, 1024),
        (8192 * 4, 4, False, 32768),
    ],
)
def test_kv_cells_follow_llama_cpp_padding(ctx: int, parallel: int, unified: bool, cells: int) -> None:
    assert kv_cells(ctx, parallel, unified) == cells


@pytest.mark.parametrize(
    ("cache_type", "size"),
    [("f16", 2), ("F16", 2), ("bf16", 2), ("f32", 4), ("q8_0", 34 / 32), ("q4_0", 18 / 32), ("q5_1", 24 / 32)],
)
def test_cache_element_sizes(cache_type: str, size: float) -> None:
    assert cache_bytes_per_element(cache_type) == size


def test_unknown_cache_type() -> None:
    with pytest.raises(EstimateError, match="unknown KV cache type 'q3_z'"):
        cache_bytes_per_element("q3_z")


def test_compute_grows_with_the_mask_and_the_feed_forward() -> None:
    shape = tiny_shape()
    base = compute_bytes(shape, kv_cells_per_stream=4096, n_tokens=512, n_outputs=1)
    # The f16 KQ mask: one element per (cell, token).
    assert compute_bytes(shape, kv_cells_per_stream=8192, n_tokens=512, n_outputs=1) - base == 4096 * 512 * 2
    # The feed-forward stage dominates here: 5·E + 3·F per token.
    wider = tiny_shape(n_ff=1704)
    assert compute_bytes(wider, kv_cells_per_stream=4096, n_tokens=512, n_outputs=1) - base == 3 * 1000 * 512 * F32


def test_compute_without_flash_attention_holds_the_scores() -> None:
    shape = tiny_shape(n_ff=64)  # the attention stage is the peak
    with_fa = compute_bytes(shape, kv_cells_per_stream=2048, n_tokens=512, n_outputs=1)
    without = compute_bytes(shape, kv_cells_per_stream=2048, n_tokens=512, n_outputs=1, flash_attn=False)
    # f32 mask instead of f16 (+2 bytes per element), plus KQ scores for every head.
    assert without - with_fa == 2048 * 512 * 2 + 2048 * 8 * 512 * F32


def test_compute_for_moe_layers_counts_the_experts_used() -> None:
    dense = tiny_shape(n_ff=64)
    moe = tiny_shape(n_ff=64, n_expert=64, n_expert_used=8, n_ff_exp=128)
    grow = compute_bytes(moe, kv_cells_per_stream=0, n_tokens=512, n_outputs=1) - compute_bytes(
        dense, kv_cells_per_stream=0, n_tokens=512, n_outputs=1
    )
    assert grow > 3 * 8 * 128 * 512 * F32 // 2


# --- GGUF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        dict(n_layers=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=4),
        dict(n_layers=3, n_embd=128, n_ff=352, n_head=8, n_head_kv=2),
    ],
)
def test_gguf_weights_and_kv(tmp_path: Path, shape: dict[str, int]) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", **shape)
    est = estimate_gguf(path, 4096)
    layer, other = tiny_tensor_bytes(**shape)
    assert est.layer_bytes == (layer,) * shape["n_layers"]
    assert est.non_layer_bytes == other
    assert est.weights_bytes == layer * shape["n_layers"] + other
    assert est.moe_expert_bytes == (0,) * shape["n_layers"]
    head_dim = shape["n_embd"] // shape["n_head"]
    assert est.kv_bytes == 4096 * shape["n_layers"] * shape["n_head_kv"] * 2 * head_dim * 2  # f16 K and V
    assert (est.n_layers, est.n_head, est.n_head_kv, est.kv_cells) == (
        shape["n_layers"], shape["n_head"], shape["n_head_kv"], 4096)


def test_gguf_kv_with_slots_and_quantised_cache(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", n_layers=2, n_embd=64, n_head=4, n_head_kv=2)
    est = estimate_gguf(path, 3000, parallel=3, cache_type_k="q8_0", cache_type_v="q4_0")
    cells = 3 * 1024  # 3000 → 3072 → 1024 per stream
    assert est.kv_cells == cells
    assert est.kv_bytes == int(cells * 2 * 2 * 16 * (34 / 32 + 18 / 32))


def test_gguf_per_layer_head_counts_and_moe_experts(tmp_path: Path) -> None:
    """head_count_kv as an array (0 = no attention in that layer), and *_exps tensors."""
    path = write_gguf(
        tmp_path / "moe.gguf",
        "qwen3moe",
        {"block_count": 3, "embedding_length": 64, "attention.head_count": 4,
         "attention.head_count_kv": [2, 0, 4], "attention.key_length": 32, "attention.value_length": 16,
         "expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32, "vocab_size": 100},
        {
            "token_embd.weight": (100, 64),
            **{f"blk.{i}.attn_q.weight": (128, 64) for i in range(3)},
            **{f"blk.{i}.ffn_up_exps.weight": (4, 32, 64) for i in range(3)},
            **{f"blk.{i}.ffn_gate_inp.weight": (4, 64) for i in range(3)},
            "output_norm.weight": (64,),
        },
    )
    est = estimate_gguf(path, 1024)
    experts = 4 * 32 * 64 * F32
    assert est.moe_expert_bytes == (experts,) * 3
    assert est.layer_bytes == (experts + 128 * 64 * F32 + 4 * 64 * F32,) * 3
    assert est.non_layer_bytes == (100 * 64 + 64) * F32
    assert est.kv_bytes == 1024 * (2 + 0 + 4) * (32 + 16) * 2
    assert est.n_head_kv == 4


def test_gguf_hybrid_model_keeps_state_not_kv_on_recurrent_layers(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "hybrid.gguf",
        "qwen3next",
        {"block_count": 4, "embedding_length": 64, "attention.head_count": 4, "attention.head_count_kv": 2,
         "full_attention_interval": 4, "ssm.inner_size": 128, "ssm.state_size": 16, "ssm.conv_kernel": 4,
         "ssm.group_count": 2, "vocab_size": 100},
        {"token_embd.weight": (100, 64)},
    )
    est = estimate_gguf(path, 1024, parallel=2)
    # Only layer 3 attends; layers 0-2 keep (4-1)·(128 + 2·2·16) + 16·128 f32 per sequence.
    assert est.kv_bytes - est.recurrent_bytes == 1024 * 1 * 2 * (16 + 16) * 2
    assert est.recurrent_bytes == 3 * (3 * (128 + 64) + 16 * 128) * 2 * 4


def test_gguf_mla_cache_holds_only_k(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "mla.gguf",
        "deepseek2",
        {"block_count": 2, "embedding_length": 64, "attention.head_count": 8, "attention.head_count_kv": 1,
         "attention.key_length": 576, "attention.value_length": 512, "attention.kv_lora_rank": 512,
         "vocab_size": 100},
        {"token_embd.weight": (100, 64)},
    )
    assert estimate_gguf(path, 512).kv_bytes == 512 * 2 * 576 * 2


def test_split_gguf_counts_every_part(tmp_path: Path) -> None:
    meta = {"block_count": 2, "embedding_length": 64, "attention.head_count": 4, "vocab_size": 10}
    write_gguf(tmp_path / "m-00001-of-00002.gguf", "llama", meta,
               {"token_embd.weight": (10, 64), "blk.0.attn_q.weight": (64, 64)})
    write_gguf(tmp_path / "m-00002-of-00002.gguf", "llama", meta, {"blk.1.attn_q.weight": (64, 64)})
    est = estimate_gguf(tmp_path / "m-00001-of-00002.gguf", 512)
    assert est.layer_bytes == (64 * 64 * F32,) * 2
    assert est.non_layer_bytes == 10 * 64 * F32


def test_gguf_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not a gguf file")
    with pytest.raises(EstimateError, match=r"bad\.gguf: not a readable GGUF"):
        estimate_gguf(bad, 512)
    with pytest.raises(EstimateError, match=r"missing\.gguf: model file not found"):
        estimate_gguf(tmp_path / "missing.gguf", 512)
    no_arch = write_gguf(tmp_path / "noblocks.gguf", "llama", {"embedding_length": 8}, {})
    with pytest.raises(EstimateError, match="block_count"):
        estimate_gguf(no_arch, 512)


def test_estimate_totals_and_breakdown(tmp_path: Path) -> None:
    est = estimate_gguf(write_tiny_gguf(tmp_path / "m.gguf"), 2048)
    base = (est.weights_bytes + est.kv_bytes) / MIB
    compute = est.compute_bytes / MIB
    assert est.gpu_total_mib(0) == pytest.approx(base + compute, abs=1)
    assert est.gpu_total_mib(1) == pytest.approx(base + compute + GPU_OVERHEAD_MIB, abs=1)
    assert est.gpu_total_mib(2) == pytest.approx(base + 2 * (compute + GPU_OVERHEAD_MIB), abs=1)
    info = est.breakdown()
    assert info["total_one_gpu_mib"] == est.gpu_total_mib(1)
    assert info["n_layers"] == 2 and info["kv_cells"] == 2048 and info["source"].startswith("gguf:")


# --- HF checkpoints -------------------------------------------------------------------------------

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 300,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file whose header describes `tensors`; the data is zeros."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = {"BF16": 2, "F32": 4}
    for name, (dtype, shape) in tensors.items():
        size = int(np.prod(shape)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_hf_dir_from_safetensors_headers(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {
        "model.embed_tokens.weight": ("BF16", (300, 128)),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", (128, 128)),
        "model.layers.0.mlp.experts.0.up_proj.weight": ("BF16", (256, 128)),
    })
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {
        "model.layers.1.self_attn.q_proj.weight": ("BF16", (128, 128)),
        "lm_head.weight": ("F32", (300, 128)),
    })
    est = estimate_hf_dir(tmp_path, 1024, parallel=2)
    assert est.layer_bytes == (128 * 128 * 2 + 256 * 128 * 2, 128 * 128 * 2)
    assert est.moe_expert_bytes == (256 * 128 * 2, 0)
    assert est.non_layer_bytes == 300 * 128 * 2 + 300 * 128 * 4
    # bf16 cache: 2048 tokens × 2 layers × 1 KV head × (64 + 64) × 2 bytes.
    assert est.kv_bytes == 2048 * 2 * 1 * 128 * 2
    assert est.source.startswith("safetensors:")


def test_hf_dir_without_weights_counts_parameters(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"text_config": LLAMA_CONFIG, "model_type": "llava"}))
    est = estimate_hf_dir(tmp_path, 512)
    e, hd = 128, 64
    per_layer = (e * 2 * hd * 2 + e * 1 * hd * 2 + 3 * e * 256 + 2 * e) * 2
    assert est.layer_bytes == (per_layer, per_layer)
    assert est.non_layer_bytes == (300 * e * 2 + e) * 2
    assert est.notes and "config.json" in est.notes[0]


def test_hf_quantised_checkpoint_keeps_a_full_precision_cache(tmp_path: Path) -> None:
    config = {**LLAMA_CONFIG, "torch_dtype": "float16", "quantization_config": {"quant_method": "awq", "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    est = estimate_hf_dir(tmp_path, 512)
    full = estimate_hf_dir_for(tmp_path.parent / "full", LLAMA_CONFIG)
    assert sum(est.layer_bytes) * 4 == sum(full.layer_bytes)  # 4-bit weights, a quarter of bf16
    assert est.kv_bytes == full.kv_bytes == 512 * 2 * 1 * 128 * 2  # the cache stays 16-bit
    assert estimate_hf_dir(tmp_path, 512, kv_dtype="fp8").kv_bytes == est.kv_bytes // 2


def estimate_hf_dir_for(path: Path, config: dict[str, object]) -> Estimate:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return estimate_hf_dir(path, 512)


def test_hf_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match="config.json: not found"):
        estimate_hf_dir(tmp_path, 512)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EstimateError, match="missing num_hidden_layers"):
        estimate_hf_dir(tmp_path, 512)


# --- profiles -------------------------------------------------------------------------------------


def make_profile(path: Path, **launch: object) -> Profile:
    profile = Profile.model_validate({"engine": "llama-cpp", "model": {"path": str(path)}, "launch": launch})
    profile.name = "m"
    return profile


def test_profile_uses_the_drivers_flags(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf")
    profile = make_profile(path, ctx=1000, parallel=2, cache_type="q8_0")
    est = estimate_profile(profile, path)
    # The driver passes -c ctx·parallel -np parallel: 2 streams of 1024 cells.
    assert est.kv_cells == 2048
    assert est == estimate_gguf(path, 2000, parallel=2, cache_type_k="q8_0")


def test_profile_extra_args_that_change_memory(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf")
    profile = make_profile(path, ctx=4096, extra_args=["-fa", "off", "--kv-unified", "-ub", "256",
                                                       "--cache-type-v=q4_0"])
    assert estimate_profile(profile, path) == estimate_gguf(
        path, 4096, kv_unified=True, flash_attn=False, ubatch=256, cache_type_v="q4_0")


def test_profile_with_an_hf_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    profile = make_profile(tmp_path, ctx=512, parallel=4)
    est = estimate_profile(profile, tmp_path / "config.json")
    assert est.kv_cells == 2048 and est.source.startswith("config:")


def test_estimate_is_a_plain_value() -> None:
    est = Estimate(1, (1,), 0, (0,), 0, 0, 1, 1, 1)
    assert est.gpu_total_mib(1) == 1 + GPU_OVERHEAD_MIB
