"""llama.cpp's `llama-server`.

Every placement decision is passed explicitly (`-ngl`, `--tensor-split`, `--n-cpu-moe`) with
`--fit off`, because llama-server's own fitting would otherwise silently change `-ngl` and `-c`
behind the scheduler's back.
"""

from __future__ import annotations

from .base import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES, OPENAI_RESPONSES, LaunchRequest, LaunchSpec, Placement, Readiness
from .base import DeviceAllocation, KvPersistence, cpu_mask
from .hookspecs import hookimpl
from .llama_cpp_report import buffer_allocations

# More layers than any model has: "all layers on the GPU".
ALL_LAYERS = 999


def placement_args(placement: Placement) -> list[str]:
    """The flags that put the model where the scheduler decided."""
    if placement.cpu_only:
        return ["-ngl", "0"]
    layers = ALL_LAYERS if placement.gpu_layers is None else placement.gpu_layers
    args = ["-ngl", str(layers)]
    endpoints = placement.rpc_endpoints()
    if endpoints:
        # `--device` lists the devices to use, in placement order: the split follows it.
        args += ["--rpc", ",".join(endpoints), "--device", ",".join(device_names(placement))]
    if len(placement.gpus) > 1:
        args += ["--split-mode", "layer", "--tensor-split", ",".join(str(share) for share in split_shares(placement))]
    if placement.cpu_moe_layers:
        args += ["--n-cpu-moe", str(placement.cpu_moe_layers)]
    return args


def device_names(placement: Placement) -> list[str]:
    """The placement's devices as llama-server names them: this machine's cards `CUDA0`,
    `CUDA1`... in the order of CUDA_VISIBLE_DEVICES (the placement's), RPC devices `RPC0`,
    `RPC1`... in the order of `--rpc`, each RPC server serving one device."""
    names = []
    local = remote = 0
    for share in placement.gpus:
        if share.remote:
            names.append(f"RPC{remote}")
            remote += 1
        else:
            names.append(f"CUDA{local}")
            local += 1
    return names


def split_shares(placement: Placement) -> list[int]:
    """`--tensor-split` proportions: the layers planned on each device when the plan says
    (llama.cpp then gives each device exactly that many, counting the output layer as one),
    else the memory planned on each."""
    if all(share.layers > 0 for share in placement.gpus):
        return [share.layers for share in placement.gpus]
    return [share.vram_mib for share in placement.gpus]


# Verbosity 4 logs, besides the defaults, what the engine allocated on each device (its
# `model`, `KV` and `compute buffer size` lines, read by `llama_cpp_report`) and a
# few lines per request; per-token output starts at 5.
REPORT_VERBOSITY = ["-lv", "4"]


def cpu_args(placement: Placement) -> list[str]:
    """The engine's share of the cores: one thread per core, each thread pinned to a core of its
    own (`--cpu-strict 1`), for generation and prompt processing alike (the batch mask follows
    `--cpu-mask`). Nothing without a share: llama-server's own default."""
    if not placement.cpu_cores:
        return []
    threads = str(len(placement.cpu_cores))
    return ["--threads", threads, "--threads-batch", threads,
            "--cpu-mask", cpu_mask(placement.cpu_cores), "--cpu-strict", "1"]


def kv_args(request: LaunchRequest) -> list[str]:
    """`--slot-save-path` when llmd keeps the prompt cache across restarts: the slots are then
    saved to and restored from that directory through `POST /slots/ID?action=save|restore`."""
    return [] if request.kv_dir is None else ["--slot-save-path", str(request.kv_dir)]


class LlamaCppDriver:
    name = "llama-cpp"
    default_command = ["llama-server"]
    # llama-server saves and restores each slot's prompt cache (`--slot-save-path`).
    supports_persist_kv = True
    # llama-server serves Anthropic's Messages (tool use included, through its jinja chat
    # templates) and OpenAI's Responses itself, and counts a Messages request's tokens.
    native_routes = frozenset({ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS, OPENAI_RESPONSES})
    # `--embeddings` serves /v1/embeddings (and then only embeddings).
    supports_embeddings = True
    # Over several devices llama.cpp gives each whole layers: any width is legal, whatever the
    # head counts. The layers it keeps in host memory it computes on the CPU.
    tensor_parallel_splits_heads = False
    offload_computes_on_cpu = True
    # `--rpc HOST:PORT,...` with `--device` puts layers on other machines' devices.
    supports_rpc_devices = True

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        launch = request.profile.launch
        placement = request.placement
        argv = [
            *request.command,
            "--model", str(request.model_path),
            "--alias", request.profile.name,
            # llama-server shares -c among its slots; profiles state the context per request.
            "--ctx-size", str(placement.ctx * launch.parallel),
            "--parallel", str(launch.parallel),
            "--cache-type-k", launch.cache_type,
            "--cache-type-v", launch.cache_type,
            "--fit", "off",
            *REPORT_VERBOSITY,
            *placement_args(placement),
            *cpu_args(placement),
            *(["--embeddings"] if launch.embeddings else []),
            *kv_args(request),
            *launch.extra_args,
            # Last, so that they win over anything before them: the engine listens where llmd says.
            "--host", request.host,
            "--port", str(request.port),
        ]
        env = {**request.env, **launch.env}
        # An empty CUDA_VISIBLE_DEVICES keeps a CUDA build off every card for a CPU placement.
        env["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices()
        kv = KvPersistence(directory=request.kv_dir, slots=launch.parallel) if request.kv_dir is not None else None
        return LaunchSpec(argv=argv, env=env, readiness=Readiness(path="/health"), kv=kv)

    def allocations(self, log_lines: list[str], placement: Placement) -> list[DeviceAllocation]:
        """What llama-server logged allocating on each device (see `llama_cpp_report`)."""
        return buffer_allocations(log_lines, placement)

    def load_progress(self, log_line: str) -> str | None:
        """The loading phase a llama-server log line marks, or None.

        At its default verbosity llama-server logs only a few milestones and no percentages,
        so this reports phases rather than a number.
        """
        for marker, phase in _PHASES:
            if marker in log_line:
                return phase
        return None


# Markers in the order llama-server logs them while starting (the load_tensors and KV lines
# appear only with -lv 4 or higher).
_PHASES = (
    ("load_model: loading model", "loading the model"),
    ("load_tensors:", "loading weights"),
    ("load_model: initializing", "allocating the context and KV cache"),
    ("llama_kv_cache", "allocating the KV cache"),
    ("warming up the model", "warming up"),
    ("model loaded", "starting the server"),
    ("listening on", "ready"),
)


@hookimpl
def llmd_drivers() -> list[LlamaCppDriver]:
    return [LlamaCppDriver()]
