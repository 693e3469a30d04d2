"""fastllm's `ftllm server`.

    ftllm server MODEL --model_name NAME --device ... [placement flags] [extra_args] --host H --port P

fastllm checks the `model` of every request against `--model_name` and answers 404 for any
other name, so the served name is always the profile's name (the proxy rewrites a request that
names an alias to the profile's name before forwarding it). It loads the model before it
binds its port: connections are refused until it is ready, after which `GET /v1/models`
answers 200 (there is no `/health`).

Placement, as the scheduler decided it:

- CPU: `--device cpu`, and an empty `CUDA_VISIBLE_DEVICES` so a CUDA build stays off the cards.
- GPUs: `CUDA_VISIBLE_DEVICES` lists the placed cards by UUID, so inside the engine they are
  `cuda:0..N-1`. One card is `--device cuda:0`; several are `--tp N` (fastllm's thread-level
  tensor parallelism over the first N visible cards, which splits attention heads).
- Layers kept on the CPU (`placement.gpu_layers` below the model's layer count): `--device`
  holds a device map, a dict of device to its share of the layers, which fastllm reads with
  `ast.literal_eval`: "{'cuda:0': 22, 'cpu': 10}" for 22 of 32 layers on the card.
- MoE experts on the CPU for N layers (`placement.cpu_moe_layers`): `--moe_device cpu
  --moe_device_layers N`. fastllm takes the experts of the last N layers, where llama.cpp
  takes the first: the same memory for a model whose layers are alike.
- The CPU share (`placement.cpu_cores`): `-t N`, one thread per core (llmd confines the
  process to those cores).
- `--kv_cache_limit` caps the KV cache at what the plan reserved for it. Without it fastllm
  takes all free VRAM for its KV cache, which would starve every other model on the card.

`--startup-progress ndjson` makes fastllm report its loading stages as `FTLLM_PROGRESS {json}`
lines on stderr; `load_progress` turns them into short progress strings.
"""

from __future__ import annotations

import json
import math

from .base import OPENAI_RESPONSES, LaunchRequest, LaunchSpec, Placement, Readiness, cache_type_args, planned_estimate
from .hookspecs import hookimpl

PROGRESS_MARKER = "FTLLM_PROGRESS "

# The profile's `cache_type` (llama.cpp's names, f16 by default) as fastllm's --kv_cache_dtype.
# None: leave fastllm's own choice ("auto", the model's dtype).
_KV_CACHE_DTYPES: dict[str, str | None] = {
    "f16": None,
    "auto": None,
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp8": "fp8_e4m3",
    "fp8_e4m3": "fp8_e4m3",
    "fp4": "fp4",
}

# Readable names for fastllm's startup stages (its own messages are fine too, but longer).
_STAGES = {
    "initializing": "initializing",
    "tokenizer": "loading tokenizer",
    "weights_prepare": "preparing weights",
    "weights_load": "loading weights",
    "weights_finalize": "finalizing weights",
    "warmup": "warming up",
    "server_starting": "starting API server",
    "ready": "ready",
}


def kv_cache_dtype_args(cache_type: str) -> list[str]:
    """`--kv_cache_dtype` for the profile's `cache_type`."""
    return cache_type_args("fastllm", "--kv_cache_dtype", _KV_CACHE_DTYPES, cache_type)


def kv_cache_limit(kv_bytes: int, placement: Placement) -> str:
    """fastllm's `--kv_cache_limit` value for `kv_bytes`, never more than the planned VRAM.

    fastllm reads "Nm" as N x 10^6 bytes (decimal), and a value without a suffix loses its last
    digit, so the value always carries the `m` suffix and is rounded up.
    """
    if placement.vram_mib:
        kv_bytes = min(kv_bytes, placement.vram_mib * 1024 * 1024)
    return f"{max(1, math.ceil(kv_bytes / 1_000_000))}m"


def device_map(placement: Placement, n_layers: int | None) -> str:
    """fastllm's `--device` dict for a plan that keeps layers on the CPU: the placed cards'
    layers split evenly between them, the rest on "cpu". Without the layer count (the model
    could not be read), one layer's share stays on the CPU."""
    on_gpu = placement.gpu_layers or 0
    on_cpu = max(1, n_layers - on_gpu) if n_layers else 1
    cards = len(placement.gpus)
    shares = {f"cuda:{i}": on_gpu // cards + (1 if i < on_gpu % cards else 0) for i in range(cards)}
    shares = {device: layers for device, layers in shares.items() if layers > 0}
    return repr({**shares, "cpu": on_cpu})


def thread_args(placement: Placement) -> list[str]:
    """`-t N` for the placement's CPU share; nothing without one (fastllm's default)."""
    return ["-t", str(placement.threads)] if placement.threads else []


def placement_args(request: LaunchRequest, kv_bytes: int | None = None, n_layers: int | None = None) -> list[str]:
    """The flags that put the model where the scheduler decided. `n_layers`: the model's layer
    count, for a device map."""
    placement = request.placement
    if placement.cpu_only:
        return ["--device", "cpu", *thread_args(placement)]
    # CUDA_VISIBLE_DEVICES holds exactly the placed cards, so they count from 0 inside the engine.
    if placement.gpu_layers is not None:
        args = ["--device", device_map(placement, n_layers)]
    elif len(placement.gpus) == 1:
        args = ["--device", "cuda:0"]
    else:
        args = ["--tp", str(len(placement.gpus))]
    if placement.cpu_moe_layers > 0:
        args += ["--moe_device", "cpu", "--moe_device_layers", str(placement.cpu_moe_layers)]
    if kv_bytes is not None:
        args += ["--kv_cache_limit", kv_cache_limit(kv_bytes, placement)]
    return [*args, *thread_args(placement)]


class FastllmDriver:
    name = "fastllm"
    default_command = ["ftllm", "server"]
    # fastllm serves OpenAI's Responses itself. It has a /v1/messages of its own too, but one
    # that ignores `tool_choice` and cannot count tokens: llmd translates Anthropic's Messages
    # to fastllm's chat completions instead.
    native_routes = frozenset({OPENAI_RESPONSES})
    # `--tp` splits attention heads over the cards; layers and experts kept on the CPU run there.
    tensor_parallel_splits_heads = True
    offload_computes_on_cpu = True

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        launch = request.profile.launch
        placement = request.placement
        estimate = None if placement.cpu_only else planned_estimate(request)
        kv_bytes = estimate.kv_bytes if estimate is not None else None
        n_layers = estimate.n_layers if estimate is not None else None
        argv = [
            *request.command,
            str(request.model_path),
            # fastllm rejects requests for any other name with 404.
            "--model_name", request.profile.name,
            "--max_context_length", str(placement.ctx),
            # Like llama.cpp's slots: the KV cache was planned for this many sequences.
            "--max_batch", str(launch.parallel),
            *kv_cache_dtype_args(launch.cache_type),
            *placement_args(request, kv_bytes, n_layers),
            "--startup-progress", "ndjson",
            *launch.extra_args,
            # Last, so that they win over anything before them: the engine listens where llmd says.
            "--host", request.host,
            "--port", str(request.port),
        ]
        env = {**request.env, **launch.env}
        # Empty for a CPU placement: the CUDA build in the same wheel then sees no card at all.
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices()
        return LaunchSpec(argv=argv, env=env, readiness=Readiness(path="/v1/models"))

    def load_progress(self, log_line: str) -> str | None:
        """"loading weights 45%" from a `FTLLM_PROGRESS {json}` line, else None.

        The marker may sit mid-line: fastllm's C++ side prints "Loading 45" without a newline
        to stdout, which shares the log with stderr.
        """
        start = log_line.find(PROGRESS_MARKER)
        if start < 0:
            return None
        try:
            event = json.loads(log_line[start + len(PROGRESS_MARKER):])
        except ValueError:
            return None
        if not isinstance(event, dict):
            return None
        stage = str(event.get("stage") or "")
        what = _STAGES.get(stage) or str(event.get("message") or stage or "loading")
        if event.get("type") == "startup.error":
            return f"failed while {what}: {event.get('message', '')}".rstrip(": ")
        if event.get("type") == "startup.ready":
            return "ready"
        # The stage's own percentage reads naturally ("loading weights 45%"); fastllm's overall
        # percentage is the fallback.
        percent = event.get("stage_percent", event.get("percent"))
        if isinstance(percent, (int, float)) and not event.get("indeterminate"):
            return f"{what} {percent:.0f}%"
        return what


@hookimpl
def llmd_drivers() -> list[FastllmDriver]:
    return [FastllmDriver()]

