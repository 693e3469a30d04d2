"""How much memory a model will take, worked out before it is loaded.

The scheduler must decide where a model goes before the engine allocates anything, so the
estimate comes from file headers only: GGUF metadata and tensor infos (memory-mapped, no tensor
data read), or an HF checkpoint's `config.json` and safetensors JSON headers. A GGUF on the
Hugging Face Hub that is not downloaded yet is estimated from its headers alone
(`HeaderOnlyGguf`, read with HTTP range requests by `models.remote_gguf`).

Four parts, matching the four buffers llama-server reports with `-lv 4`:

- weights: the tensor bytes, split per layer (`blk.N.`), so partial offload can be priced, and
  with each layer's MoE expert tensors (`*_exps`) counted apart, for expert offload;
- KV cache (plus recurrent state for hybrid models): cells × layers × (K + V) widths × element size;
- compute: the scratch buffer for one micro-batch, from the graph's peak live tensors (below);
- a fixed per-card overhead for the CUDA context, which no engine log reports but every card pays.

`tests/test_estimate_accuracy.py` checks the first three against what llama-server logs.
`placement.vram_mib` is *not* handled here: `scheduler.need_for_profile` applies it, because
it replaces the estimate rather than adjusting it.

The `Estimate` type itself, and the per-card overhead it defaults to, belong to the driver API
(`llmd.drivers.estimate`), which hands the estimate to drivers; this module works it out.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmd.daemon.errors import LlmdError
from llmd.daemon.placement.gguf_header import ArrayLength as _Length
from llmd.daemon.placement.gguf_header import GgufClaimError, HeaderOnlyGguf, parse_header
from llmd.drivers.estimate import GPU_OVERHEAD_MIB, MIB, ComputeParts, Estimate, Estimator

if TYPE_CHECKING:
    from llmd.daemon.models.profiles import Profile

__all__ = [
    "GPU_OVERHEAD_MIB",
    "DEFAULT_UBATCH",
    "Estimate",
    "EstimateError",
    "GgufHeader",
    "ModelShape",
    "cache_bytes_per_element",
    "check_gguf_file",
    "compute_bytes",
    "estimate_gguf",
    "estimate_hf_dir",
    "estimate_profile",
    "kv_cells",
    "launch_estimator",
    "read_gguf_header",
]

# llama.cpp's default micro-batch (`-ub`): the compute buffer is sized for this many tokens.
DEFAULT_UBATCH = 512
# llama.cpp's default logical batch (`-b`); the micro-batch never exceeds it.
DEFAULT_BATCH = 2048
# vLLM's default tokens per scheduler step with chunked prefill; its activation peak scales with it.
VLLM_BATCHED_TOKENS = 2048

# Far more layers than any model has (the largest have a few hundred); a file claiming more is
# refused before lists are sized by the number.
MAX_LAYERS = 100_000

_LAYER = re.compile(r"^blk\.(\d+)\.")
_HF_LAYER = re.compile(r"\.layers\.(\d+)\.")


class EstimateError(LlmdError):
    """A model file could not be read well enough to estimate its memory."""


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters the KV and compute formulas need, whatever file they came from."""

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    # Per layer: 0 for a layer without attention (recurrent layers of a hybrid model).
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    # MLA (DeepSeek-style): the cache holds one compressed K row per cell and no V.
    mla: bool = False
    # Hybrid and state-space models: which layers keep a recurrent state instead of a KV
    # cache (() when none do), and that state's width in f32 elements per sequence.
    recurrent_layers: tuple[bool, ...] = ()
    recurrent_width: int = 0

    @property
    def max_head_kv(self) -> int:
        return max(self.n_head_kv, default=0)


# ---------------------------------------------------------------------------------------------
# Formulas shared by every file type


def cache_bytes_per_element(cache_type: str) -> float:
    """Bytes per KV element for a llama.cpp cache type: f16 2, f32 4, q8_0 34/32, q4_0 18/32, ..."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[cache_type.upper()]
    except KeyError:
        raise EstimateError(f"unknown KV cache type {cache_type!r}; use f16, bf16, f32, q8_0, q4_0, ...") from None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size / block


def kv_cells(ctx: int, parallel: int = 1, unified: bool = False) -> int:
    """KV cells llama.cpp allocates for `-c ctx -np parallel`.

    From `llama_context`'s constructor: the context is padded to 256; without `--kv-unified`
    each of the `parallel` streams gets its own share, itself padded to 256. So `-c 2048 -np 3`
    gives 3 × 768 = 2304 cells, not 2048.
    """
    n_ctx = _pad(ctx, 256)
    if unified or parallel <= 1:
        return n_ctx
    return _pad(n_ctx // parallel, 256) * parallel


def _pad(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _kv_bytes(shape: ModelShape, cells: int, k_bytes: float, v_bytes: float) -> int:
    total = 0.0
    for il in range(shape.n_layers):
        if shape.recurrent_layers and shape.recurrent_layers[il]:
            continue
        heads = shape.n_head_kv[il]
        if shape.mla:
            total += cells * heads * shape.head_dim_k * k_bytes
        else:
            total += cells * heads * (shape.head_dim_k * k_bytes + shape.head_dim_v * v_bytes)
    return math.ceil(total)


def _recurrent_bytes(shape: ModelShape, n_seq: int) -> int:
    """Mamba / gated-delta-net state: f32, one slot per sequence, on each recurrent layer."""
    layers = sum(1 for r in shape.recurrent_layers if r)
    return layers * shape.recurrent_width * max(n_seq, 1) * 4


def compute_bytes(
    shape: ModelShape,
    *,
    kv_cells_per_stream: int,
    n_tokens: int,
    n_outputs: int,
    flash_attn: bool = True,
    elem_bytes: int = 4,
) -> int:
    """Peak scratch memory of one forward pass over `n_tokens` tokens.

    ggml allocates each intermediate tensor when it is produced and frees it after its last
    use, so the buffer is the largest set of tensors alive at once. Reading llama.cpp's graph
    (`src/models/llama.cpp`, `llama-graph.cpp`) and its allocator's debug trace
    (`GGML_ALLOCATOR_DEBUG`) on llama-server 11434 shows, per token, in f32 elements:

    - inputs alive throughout: the KQ mask, `kv_cells × n_tokens` (f16 with flash attention,
      f32 without), plus positions and cache indices (about 10 elements per token);
    - attention: input embeddings, residual, norm, its scaled copy, Q, K and V:
      about 5·E + E_q + 2·E_kv (7-8·E measured, depending on how freed blocks line up);
      without flash attention also the KQ scores, `kv_cells × n_head` per token;
    - feed-forward: 5·E + 3·F (gate, up and their SwiGLU product; measured exactly for 3 or
      more layers; in a 2-layer graph with F ≤ 2·E the product reuses a freed block, so 2·F);
      for MoE layers, 3·F_exp for each of the experts used, plus the router and a shared expert;
    - output: logits only for the rows that are sampled (llama-server reserves one per slot),
      `n_vocab × n_outputs`, small since llama.cpp stopped reserving them for the whole batch.

    The buffer is the inputs plus the larger of the attention and feed-forward stages.
    """
    e = shape.n_embd
    e_q = shape.n_head * shape.head_dim_k
    e_kv = shape.max_head_kv * (shape.head_dim_k + shape.head_dim_v)
    attention = 5 * e + e_q + e_kv
    if not flash_attn:
        attention += kv_cells_per_stream * shape.n_head
    if shape.n_expert:
        used = max(shape.n_expert_used, 1)
        ffn = 5 * e + 3 * used * shape.n_ff_exp + used * e + 2 * shape.n_expert + 3 * shape.n_ff_shexp
    else:
        swiglu_reuses_block = shape.n_layers <= 2 and shape.n_ff <= 2 * e
        ffn = 5 * e + (2 if swiglu_reuses_block else 3) * shape.n_ff
    if shape.n_layers == 1:
        # The only layer is also the last: llama.cpp drops the rows it will not sample before
        # the feed-forward, so that stage runs on n_outputs rows only.
        ffn = 0
    per_token = max(attention, ffn) + 10
    mask = kv_cells_per_stream * n_tokens * (2 if flash_attn else 4)
    outputs = (shape.n_vocab + e) * n_outputs * 4
    return int(mask + per_token * n_tokens * elem_bytes + outputs)


def compute_parts(
    shape: ModelShape, *, kv_cells_per_stream: int, n_tokens: int, n_outputs: int, flash_attn: bool = True,
    elem_bytes: int = 4,
) -> ComputeParts:
    """`compute_bytes` in the parts `split_compute_bytes` sizes each device's share with."""
    whole = compute_bytes(shape, kv_cells_per_stream=kv_cells_per_stream, n_tokens=n_tokens, n_outputs=n_outputs,
                          flash_attn=flash_attn, elem_bytes=elem_bytes)
    mask = kv_cells_per_stream * n_tokens * (2 if flash_attn else 4)
    outputs = (shape.n_vocab + shape.n_embd) * n_outputs * 4
    # A one-layer graph has no feed-forward peak (its only layer is the last): its attention.
    one_layer = replace(shape, n_layers=1)
    attention = compute_bytes(one_layer, kv_cells_per_stream=kv_cells_per_stream, n_tokens=n_tokens,
                              n_outputs=n_outputs, flash_attn=flash_attn, elem_bytes=elem_bytes) - mask - outputs
    return ComputeParts(inputs=mask, attention=attention, peak=whole - mask - outputs,
                        row=shape.n_embd * n_tokens * elem_bytes, outputs=outputs)


# Copies of each graph input llama.cpp's scheduler keeps when it pipelines micro-batches over
# several devices (GGML_SCHED_MAX_COPIES).
PIPELINE_COPIES = 4


def split_compute_bytes(
    parts: ComputeParts, *, first: bool, holds_output: bool, layers: int, last_layer: bool, pipelined: bool
) -> float:
    """One device's compute buffer when llama.cpp splits the layers over several devices.

    Each device runs the graph of its own `layers` (`last_layer`: the model's last is among
    them; `first`: the first is) and, with `holds_output`, the output head. Measured on
    llama-server 11434 over RPC devices (tests/test_rpc_devices.py checks it against the
    engine's report), with a device's inputs arriving from another device:

    - a device's peak is the larger of the attention and feed-forward stages, less the three
      rows the first device of a single-device graph also holds (input embeddings, residual,
      and its copy); a device with only the model's last layer has no feed-forward peak (that
      stage runs on the sampled rows only);
    - each device holds its own copy of the graph's inputs (the KQ mask);
    - with every layer offloaded to several devices, llama.cpp pipelines micro-batches:
      `PIPELINE_COPIES` copies of each device's inputs, plus ten rows on the first device and
      one on the others (three on a device with only the last layer, which then has no
      feed-forward stage to hold them).
    """
    outputs = parts.outputs if holds_output else 0
    if layers == 0:
        return float(outputs)
    only_last = last_layer and layers == 1
    peak = (parts.attention if only_last else parts.peak) - 3 * parts.row
    if not pipelined:
        return float(parts.inputs + peak + outputs)
    extra_rows = 13 if first else (3 if only_last else 4)
    return float(PIPELINE_COPIES * parts.inputs + peak + extra_rows * parts.row + outputs)


# ---------------------------------------------------------------------------------------------
# GGUF


@dataclass(frozen=True)
class _GgufTensors:
    layer_bytes: tuple[int, ...]
    expert_bytes: tuple[int, ...]
    non_layer_bytes: int
    total: int
    # The output head and final norm (llama.cpp's output layer); a model without an output
    # head uses its token embeddings there, which llama.cpp then loads a second time.
    output_bytes: int = 0


def _read_gguf(path: Path) -> tuple[dict[str, Any], _GgufTensors]:
    """Metadata and tensor sizes of a GGUF file, or of every part of a split GGUF."""
    import gguf

    parts = _gguf_parts(path)
    metadata: dict[str, Any] = {}
    sizes: list[tuple[str, int]] = []
    for part in parts:
        try:
            _check_gguf_header(part)
            reader = gguf.GGUFReader(part, "r")
        except FileNotFoundError:
            raise EstimateError(f"{part}: model file not found") from None
        except PermissionError:
            raise EstimateError(f"{part}: permission denied; make it readable by the llmd user") from None
        except (ValueError, OSError, struct.error, IndexError, KeyError) as exc:
            raise EstimateError(f"{part}: not a readable GGUF file ({exc})") from None
        if not metadata:
            metadata = _gguf_metadata(reader)
        sizes.extend((t.name, int(t.n_bytes)) for t in reader.tensors)
    return metadata, _split_tensors(metadata, sizes, path)


def check_gguf_file(path: Path) -> None:
    """EstimateError naming the file and the field when a GGUF model's header (any part's of a
    split one) claims more than its file holds; the engine is never started on such a file.
    Any other fault (not a GGUF, a truncated or missing file) is left to the engine to report."""
    for part in _gguf_parts(path):
        try:
            _check_gguf_header(part)
        except GgufClaimError as exc:
            raise EstimateError(f"{part}: not a readable GGUF file ({exc})") from None
        except (ValueError, OSError, struct.error):
            return


def _check_gguf_header(path: Path) -> None:
    """GgufClaimError (naming the field) when the header at `path` claims more than the file
    holds, GgufHeaderError when it is no GGUF header. `gguf.GGUFReader` trusts every count in
    it: an array length of 2**60 would have it loop and allocate until memory runs out. Reads
    the header only, not the weights."""
    with path.open("rb") as raw:
        parse_header(io.BufferedReader(raw, 1 << 20), os.fstat(raw.fileno()).st_size)


def _headers_gguf(model: HeaderOnlyGguf) -> tuple[dict[str, Any], _GgufTensors]:
    """What `_read_gguf` gives for the files, from their headers alone (the metadata is the
    first part's: a split model's other parts hold only their tensors)."""
    metadata = model.parts[0].metadata if model.parts else {}
    sizes = [tensor for part in model.parts for tensor in part.tensors]
    return metadata, _split_tensors(metadata, sizes, model.source)


def _split_tensors(metadata: dict[str, Any], sizes: Sequence[tuple[str, int]], where: Path | str) -> _GgufTensors:
    """Tensor bytes per layer (and per layer's MoE experts), and outside the layers."""
    arch = metadata.get("general.architecture", "")
    n_layers = _layer_count(metadata, f"{arch}.block_count", where)
    layers = [0] * n_layers
    experts = [0] * n_layers
    non_layer = 0
    for name, size in sizes:
        match = _LAYER.match(name)
        index = int(match.group(1)) if match else -1
        if 0 <= index < n_layers:
            layers[index] += size
            if "_exps" in name:
                experts[index] += size
        else:
            # Embeddings, output head, final norm, and extra prediction layers past block_count.
            non_layer += size
    named = dict(sizes)
    output = sum(size for name, size in sizes if name.startswith("output"))
    if "output.weight" not in named:
        output += named.get("token_embd.weight", 0)
    return _GgufTensors(tuple(layers), tuple(experts), non_layer, sum(s for _, s in sizes), output)


def _layer_count(metadata: dict[str, Any], key: str, where: Path | str) -> int:
    """The model's layer count, checked before lists are sized and loops run by it."""
    value = metadata.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LAYERS:
        raise EstimateError(f"{where}: not a usable GGUF model ({key} = {value!r}; a model has 0 to "
                            f"{MAX_LAYERS} layers)")
    return value


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF model says of itself: its metadata (scalars and short arrays; a long array,
    such as the token list, is None) and its parameter count, over every part of a split file."""

    metadata: dict[str, Any]
    parameters: int


def read_gguf_header(path: Path) -> GgufHeader:
    """The header of the GGUF model at `path`, for describing the model (Ollama's /api/show);
    EstimateError if it cannot be read. Reads headers only, as the estimate does."""
    import gguf

    metadata: dict[str, Any] = {}
    parameters = 0
    for part in _gguf_parts(Path(path)):
        try:
            _check_gguf_header(part)
            reader = gguf.GGUFReader(part, "r")
        except (ValueError, OSError, struct.error, IndexError, KeyError) as exc:
            raise EstimateError(f"{part}: not a readable GGUF file ({exc})") from None
        if not metadata:
            metadata = {key: None if isinstance(value, _Length) else value for key, value in _gguf_metadata(reader).items()}
        parameters += sum(int(tensor.n_elements) for tensor in reader.tensors)
    return GgufHeader(metadata, parameters)


def _gguf_parts(path: Path) -> list[Path]:
    """`model-00001-of-00003.gguf` names the first of three files; load them all."""
    match = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", path.name)
    if not match:
        return [path]
    stem, count = match.group(1), int(match.group(3))
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    """Scalars and short arrays; long arrays (the tokenizer) only by length, to stay fast."""
    import gguf

    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if not fld.types:
            continue
        if fld.types[0] == gguf.GGUFValueType.ARRAY and len(fld.data) > 4096:
            out[key] = _Length(len(fld.data))
            continue
        try:
            out[key] = fld.contents()
        except Exception:  # an exotic value type this gguf version cannot decode
            continue
    return out


def _per_layer(value: Any, n_layers: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n_layers
    if isinstance(value, list):
        values = [int(v) for v in value][:n_layers]
        return tuple(values + [values[-1] if values else default] * (n_layers - len(values)))
    return (int(value),) * n_layers


def _shape_from_gguf(meta: dict[str, Any], path: Path | str) -> ModelShape:
    arch = meta.get("general.architecture")
    if not arch:
        raise EstimateError(f"{path}: GGUF metadata has no general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_layers = get("block_count")
    n_embd = get("embedding_length")
    if n_layers is None or n_embd is None:
        raise EstimateError(f"{path}: GGUF metadata lacks {arch}.block_count or {arch}.embedding_length")
    n_layers, n_embd = int(n_layers), int(n_embd)
    heads = _per_layer(get("attention.head_count"), n_layers, 1)
    n_head = max(heads, default=1)
    heads_kv = _per_layer(get("attention.head_count_kv"), n_layers, n_head)
    head_dim_k = int(get("attention.key_length", n_embd // max(n_head, 1)))
    head_dim_v = int(get("attention.value_length", n_embd // max(n_head, 1)))
    n_ff = max(_per_layer(get("feed_forward_length"), n_layers, 4 * n_embd), default=0)

    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = tokens.n if isinstance(tokens, _Length) else len(tokens or ())
    recurrent, width = _gguf_recurrent(meta, arch, n_layers, heads_kv)
    return ModelShape(
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=heads_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_vocab=int(vocab),
        n_expert=int(get("expert_count", 0)),
        n_expert_used=int(get("expert_used_count", 0)),
        n_ff_exp=int(get("expert_feed_forward_length", 0) or 0),
        n_ff_shexp=int(get("expert_shared_feed_forward_length", 0) or 0) * int(get("expert_shared_count", 1) or 1),
        mla=get("attention.kv_lora_rank") is not None,
        recurrent_layers=recurrent,
        recurrent_width=width,
    )


def _gguf_recurrent(
    meta: dict[str, Any], arch: str, n_layers: int, heads_kv: tuple[int, ...]
) -> tuple[tuple[bool, ...], int]:
    """Which layers keep a recurrent state instead of a KV cache, and its f32 width per sequence.

    Widths follow llama.cpp's `n_embd_r()` + `n_embd_s()` for Mamba-style layers:
    (d_conv - 1)·(d_inner + 2·groups·d_state) + d_state·d_inner.
    """
    d_inner = int(meta.get(f"{arch}.ssm.inner_size", 0) or 0)
    if not d_inner:
        return (), 0
    d_state = int(meta.get(f"{arch}.ssm.state_size", 0) or 0)
    d_conv = int(meta.get(f"{arch}.ssm.conv_kernel", 0) or 0)
    groups = int(meta.get(f"{arch}.ssm.group_count", 0) or 0)
    width = max(d_conv - 1, 0) * (d_inner + 2 * groups * d_state) + d_state * d_inner
    explicit = meta.get(f"{arch}.attention.recurrent_layers")
    interval = meta.get(f"{arch}.full_attention_interval")
    if isinstance(explicit, list):
        layers = tuple(bool(v) for v in explicit[:n_layers])
    elif interval:
        layers = tuple((i + 1) % int(interval) != 0 for i in range(n_layers))
    elif any(heads_kv):
        layers = tuple(h == 0 for h in heads_kv)
    else:
        layers = (True,) * n_layers
    return layers, width


def estimate_gguf(
    path: Path | HeaderOnlyGguf,
    ctx: int,
    *,
    parallel: int = 1,
    kv_unified: bool = False,
    cache_type_k: str = "f16",
    cache_type_v: str | None = None,
    flash_attn: bool = True,
    ubatch: int = DEFAULT_UBATCH,
    batch: int = DEFAULT_BATCH,
    gpu_overhead_mib: int = GPU_OVERHEAD_MIB,
) -> Estimate:
    """What llama-server will allocate for `-c ctx -np parallel` on this GGUF.

    `ctx` is the `-c` value: llama-server shares it among its slots. Mirror its flags here:
    llama-server without `-np` runs 4 slots with a unified cache (`parallel=4, kv_unified=True`).
    `path` may also be the headers of a GGUF that is not here (`HeaderOnlyGguf`).
    """
    where: Path | str
    if isinstance(path, HeaderOnlyGguf):
        where = path.source
        meta, tensors = _headers_gguf(path)
    else:
        where = Path(path)
        meta, tensors = _read_gguf(where)
    try:
        shape = _shape_from_gguf(meta, where)
    except (TypeError, ValueError, OverflowError) as exc:  # a number that is a string, a list, infinite...
        raise EstimateError(f"{where}: not a usable GGUF model (its metadata has a value of the wrong type: {exc})") from None
    cells = kv_cells(ctx, parallel, kv_unified)
    per_stream = cells if (kv_unified or parallel <= 1) else cells // parallel
    k_bytes = cache_bytes_per_element(cache_type_k)
    v_bytes = cache_bytes_per_element(cache_type_v or cache_type_k)
    # Micro-batch: never more than the batch, which never exceeds the requested context;
    # the reserve pass rounds it up to a multiple of the slot count.
    n_tokens = min(ubatch, batch, ctx)
    n_tokens = _pad(n_tokens, max(parallel, 1))
    kv = _kv_bytes(shape, cells, k_bytes, v_bytes)
    recurrent = _recurrent_bytes(shape, parallel) if shape.recurrent_layers else 0
    notes = []
    if meta.get(f"{meta['general.architecture']}.attention.sliding_window"):
        notes.append("sliding-window layers counted at full context (an overestimate)")
    return Estimate(
        weights_bytes=tensors.total,
        layer_bytes=tensors.layer_bytes,
        non_layer_bytes=tensors.non_layer_bytes,
        moe_expert_bytes=tensors.expert_bytes,
        output_bytes=tensors.output_bytes,
        kv_bytes=kv + recurrent,
        compute_bytes=compute_bytes(
            shape,
            kv_cells_per_stream=per_stream,
            n_tokens=n_tokens,
            n_outputs=max(parallel, 1),
            flash_attn=flash_attn,
        ),
        compute_parts=compute_parts(
            shape, kv_cells_per_stream=per_stream, n_tokens=n_tokens, n_outputs=max(parallel, 1), flash_attn=flash_attn,
        ),
        n_layers=shape.n_layers,
        n_head=shape.n_head,
        n_head_kv=shape.max_head_kv,
        kv_cells=cells,
        recurrent_bytes=recurrent,
        gpu_overhead_mib=gpu_overhead_mib,
        source=f"gguf:{where}",
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (vLLM, fastllm)

_DTYPE_BYTES = {
    "float32": 4, "float": 4, "fp32": 4,
    "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
    "float8_e4m3fn": 1, "fp8": 1, "int8": 1,
}
_SAFETENSORS_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EstimateError(f"{config_path}: not found; an HF model directory needs its config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EstimateError(f"{config_path}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise EstimateError(f"{config_path}: expected a JSON object")
    # Multimodal checkpoints keep the language model's numbers under text_config.
    text = config.get("text_config")
    if isinstance(text, dict):
        config = {**config, **text}
    return config


def _cfg_int(config: dict[str, Any], path: Path, *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError, OverflowError):
                raise EstimateError(f"{path / 'config.json'}: {name} is {value!r}, not an integer") from None
    if default is not None:
        return default
    raise EstimateError(f"{path / 'config.json'}: missing {names[0]}")


def _shape_from_config(config: dict[str, Any], path: Path) -> ModelShape:
    n_layers = _cfg_int(config, path, "num_hidden_layers", "n_layer", "num_layers")
    if not 0 <= n_layers <= MAX_LAYERS:
        raise EstimateError(f"{path / 'config.json'}: num_hidden_layers = {n_layers}; a model has 0 to {MAX_LAYERS} layers")
    n_embd = _cfg_int(config, path, "hidden_size", "n_embd", "d_model")
    n_head = _cfg_int(config, path, "num_attention_heads", "n_head")
    n_head_kv = _cfg_int(config, path, "num_key_value_heads", default=n_head)
    head_dim = _cfg_int(config, path, "head_dim", default=n_embd // max(n_head, 1))
    n_expert = _cfg_int(config, path, "num_experts", "num_local_experts", "n_routed_experts", default=0)
    return ModelShape(
        n_layers=n_layers,
        n_embd=n_embd,
        n_ff=_cfg_int(config, path, "intermediate_size", "ffn_hidden_size", default=4 * n_embd),
        n_head=n_head,
        n_head_kv=(n_head_kv,) * n_layers,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        n_vocab=_cfg_int(config, path, "vocab_size", default=32000),
        n_expert=n_expert,
        n_expert_used=_cfg_int(config, path, "num_experts_per_tok", "num_experts_per_token", default=0),
        n_ff_exp=_cfg_int(config, path, "moe_intermediate_size", default=0) if n_expert else 0,
        n_ff_shexp=_cfg_int(config, path, "shared_expert_intermediate_size", default=0),
    )


def _activation_bytes(config: dict[str, Any]) -> int:
    """Bytes per element of activations and the KV cache: the checkpoint's torch dtype."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").lower().removeprefix("torch.")
    return _DTYPE_BYTES.get(dtype, 2)


def _weight_bytes(config: dict[str, Any]) -> float:
    """Bytes per parameter: the quantization's bit width when there is one, else the dtype."""
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("bits"):
        return int(quant["bits"]) / 8
    return _activation_bytes(config)


def _safetensors_sizes(path: Path) -> list[tuple[str, int]]:
    """(tensor name, bytes) from each `*.safetensors` header; the tensor data is never read."""
    sizes: list[tuple[str, int]] = []
    for file in sorted(path.glob("*.safetensors")):
        try:
            with file.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > 100 * MIB:
                    raise ValueError("header length is implausible")
                header = json.loads(fh.read(length))
        except (OSError, struct.error, ValueError) as exc:
            raise EstimateError(f"{file}: not a readable safetensors file ({exc})") from None
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            offsets = info.get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2:
                size = int(offsets[1]) - int(offsets[0])
            else:
                size = math.prod(info.get("shape", [])) * _SAFETENSORS_BYTES.get(info.get("dtype", ""), 2)
            sizes.append((name, size))
    return sizes


def _config_weights(shape: ModelShape, config: dict[str, Any], dtype_bytes: float) -> tuple[list[int], list[int], int]:
    """Per-layer and other weight bytes from the architecture alone (no weight files present)."""
    e, hd = shape.n_embd, shape.head_dim_k
    attn = e * shape.n_head * hd * 2 + e * shape.n_head_kv[0] * hd * 2
    if shape.n_expert:
        experts = shape.n_expert * 3 * e * shape.n_ff_exp
        ffn = experts + e * shape.n_expert + 3 * e * shape.n_ff_shexp
    else:
        experts = 0
        ffn = 3 * e * shape.n_ff
    per_layer = attn + ffn + 2 * e
    embeddings = shape.n_vocab * e * (1 if config.get("tie_word_embeddings") else 2) + e
    layer = [int(per_layer * dtype_bytes)] * shape.n_layers
    expert = [int(experts * dtype_bytes)] * shape.n_layers
    return layer, expert, int(embeddings * dtype_bytes)


def estimate_hf_dir(
    path: Path,
    ctx: int,
    *,
    parallel: int = 1,
    kv_dtype: str | None = None,
    batched_tokens: int = VLLM_BATCHED_TOKENS,
    gpu_overhead_mib: int = GPU_OVERHEAD_MIB,
) -> Estimate:
    """Memory for an HF checkpoint served with `ctx` tokens for each of `parallel` sequences.

    Weights come from the safetensors headers when present, else from the parameter count the
    config implies. KV uses the checkpoint's dtype unless `kv_dtype` says otherwise. The
    activation peak reuses the llama.cpp stage formula at the checkpoint's dtype, for
    `batched_tokens` tokens per step: a rough figure (vLLM also captures CUDA graphs, which
    the per-card overhead only partly covers).
    """
    path = Path(path)
    if not path.is_dir():
        raise EstimateError(f"{path}: not a directory; an HF model is a directory with config.json")
    config = _read_config(path)
    shape = _shape_from_config(config, path)
    sizes = _safetensors_sizes(path)
    notes: list[str] = []
    if sizes:
        layers = [0] * shape.n_layers
        experts = [0] * shape.n_layers
        non_layer = 0
        for name, size in sizes:
            match = _HF_LAYER.search(name)
            index = int(match.group(1)) if match else -1
            if 0 <= index < shape.n_layers:
                layers[index] += size
                if ".experts." in name:
                    experts[index] += size
            else:
                non_layer += size
        source = f"safetensors:{path}"
    else:
        layers, experts, non_layer = _config_weights(shape, config, _weight_bytes(config))
        notes.append("no *.safetensors: weights computed from config.json")
        source = f"config:{path}"
    act_bytes = _activation_bytes(config)
    kv_elem = _DTYPE_BYTES.get(kv_dtype.lower(), act_bytes) if kv_dtype else act_bytes
    cells = ctx * max(parallel, 1)
    kv = _kv_bytes(shape, cells, kv_elem, kv_elem)
    n_tokens = min(batched_tokens, cells)
    compute = compute_bytes(
        shape, kv_cells_per_stream=0, n_tokens=n_tokens, n_outputs=max(parallel, 1), elem_bytes=act_bytes
    )
    return Estimate(
        weights_bytes=sum(layers) + non_layer,
        layer_bytes=tuple(layers),
        non_layer_bytes=non_layer,
        moe_expert_bytes=tuple(experts),
        kv_bytes=kv,
        compute_bytes=compute,
        n_layers=shape.n_layers,
        n_head=shape.n_head,
        n_head_kv=shape.max_head_kv,
        kv_cells=cells,
        gpu_overhead_mib=gpu_overhead_mib,
        source=source,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True)
class _EngineFlags:
    flash_attn: bool = True
    kv_unified: bool = False
    ubatch: int = DEFAULT_UBATCH
    batch: int = DEFAULT_BATCH
    cache_type_k: str | None = None
    cache_type_v: str | None = None


def _engine_flags(args: Sequence[str]) -> _EngineFlags:
    """The few llama-server flags in `launch.extra_args` that change memory use."""
    values: dict[str, Any] = {}
    names = {
        "-fa": "flash_attn", "--flash-attn": "flash_attn",
        "-ub": "ubatch", "--ubatch-size": "ubatch",
        "-b": "batch", "--batch-size": "batch",
        "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k",
        "-ctv": "cache_type_v", "--cache-type-v": "cache_type_v",
    }
    items = list(args)
    for i, arg in enumerate(items):
        key, _, inline = arg.partition("=")
        if key in ("-kvu", "--kv-unified"):
            values["kv_unified"] = True
        elif key == "--no-kv-unified":
            values["kv_unified"] = False
        elif key in names:
            value = inline or (items[i + 1] if i + 1 < len(items) else "")
            target = names[key]
            if target == "flash_attn":
                values[target] = value.lower() not in ("off", "0", "false", "disabled")
            elif target in ("ubatch", "batch"):
                if value.isdigit():
                    values[target] = int(value)
            elif value:
                values[target] = value
    return _EngineFlags(**values)


def estimate_profile(profile: Profile, model_path: Path | HeaderOnlyGguf) -> Estimate:
    """The estimate for a profile's model, with the flags its driver will launch it with.

    A directory (or a `config.json`) is an HF checkpoint; anything else is read as GGUF, and
    a `HeaderOnlyGguf` is a GGUF known from its headers, read where the file is (the Hub).
    The llama.cpp driver passes `-c ctx × parallel -np parallel`, so each slot gets `ctx`.
    `placement.vram_mib` is left to the caller (`scheduler.need_for_profile`).
    """
    launch = profile.launch
    path: Path | HeaderOnlyGguf = model_path
    if not isinstance(model_path, HeaderOnlyGguf):
        path = Path(model_path)
        if path.name == "config.json":
            path = path.parent
        if path.is_dir():
            return estimate_hf_dir(path, launch.ctx, parallel=launch.parallel)
    flags = _engine_flags(launch.extra_args)
    return estimate_gguf(
        path,
        launch.ctx * launch.parallel,
        parallel=launch.parallel,
        kv_unified=flags.kv_unified,
        cache_type_k=flags.cache_type_k or launch.cache_type,
        cache_type_v=flags.cache_type_v or flags.cache_type_k or launch.cache_type,
        flash_attn=flags.flash_attn,
        ubatch=flags.ubatch,
        batch=flags.batch,
    )


def launch_estimator(
    profile: Profile,
    model_path: Path,
    estimate: Callable[[Profile, Path], Estimate] = estimate_profile,
) -> Estimator:
    """The `LaunchRequest.estimator` for `profile`: its estimate at a given context length.

    The scheduler may lower the context to fit, so a driver asks for the placement's. Pass the
    planner's cached `estimate` to hand the driver the very numbers the model was placed with.
    """

    def at_ctx(ctx: int) -> Estimate:
        sized = profile
        if profile.launch.ctx != ctx:
            launch = profile.launch.model_copy(update={"ctx": ctx})
            sized = profile.model_copy(update={"launch": launch})
        return estimate(sized, model_path)

    return at_ctx
