"""llama.cpp's argv and env for each kind of placement."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llmd.daemon.models.profiles import Profile
from llmd.drivers.base import GpuShare, LaunchRequest, Placement
from llmd.drivers.llama_cpp import LlamaCppDriver


def _request(placement: Placement, **launch: object) -> LaunchRequest:
    profile = Profile.model_validate(
        {"engine": "llama-cpp", "model": {"path": "/m/x.gguf"}, "launch": {"extra_args": ["--jinja", "a b; rm -rf /"], **launch}}
    )
    profile.name = "qwen"
    return LaunchRequest(profile=profile, placement=placement, model_path=Path("/m/x.gguf"), host="127.0.0.1",
                         port=4321, command=["/opt/llama-server"])


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_placement() -> None:
    spec = LlamaCppDriver().launch(_request(Placement(ctx=2048), parallel=2))
    argv = spec.argv
    assert argv[0] == "/opt/llama-server"
    assert _flag(argv, "--host") == "127.0.0.1" and _flag(argv, "--port") == "4321"
    assert _flag(argv, "--alias") == "qwen"
    assert _flag(argv, "--ctx-size") == "4096"  # 2048 per slot, two slots
    assert _flag(argv, "--parallel") == "2"
    assert _flag(argv, "-ngl") == "0" and _flag(argv, "--fit") == "off"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ""
    # Verbatim argv items, no shell, right before llmd's own listen flags, which come last to win.
    assert argv[-6:] == ["--jinja", "a b; rm -rf /", "--host", "127.0.0.1", "--port", "4321"]
    assert spec.readiness.path == "/health"


def test_single_gpu() -> None:
    placement = Placement(gpus=(GpuShare(1, "GPU-b", 9000),), ctx=4096)
    spec = LlamaCppDriver().launch(_request(placement))
    assert _flag(spec.argv, "-ngl") == "999"
    assert "--tensor-split" not in spec.argv
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "GPU-b"


def test_tensor_parallel_splits_by_planned_memory() -> None:
    placement = Placement(gpus=(GpuShare(0, "GPU-a", 20000), GpuShare(1, "GPU-b", 10000)), ctx=4096)
    spec = LlamaCppDriver().launch(_request(placement))
    assert _flag(spec.argv, "--tensor-split") == "20000,10000"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"


def test_offload_layers_and_moe_experts() -> None:
    placement = Placement(gpus=(GpuShare(0, "GPU-a", 8000),), gpu_layers=20, cpu_moe_layers=12, ctx=4096)
    spec = LlamaCppDriver().launch(_request(placement))
    assert _flag(spec.argv, "-ngl") == "20"
    assert _flag(spec.argv, "--n-cpu-moe") == "12"


def test_a_kv_dir_adds_the_slot_save_path_and_says_how_to_use_it() -> None:
    request = dataclasses.replace(_request(Placement(ctx=2048), parallel=3), kv_dir=Path("/state/kv/qwen/abc"))
    spec = LlamaCppDriver().launch(request)
    assert _flag(spec.argv, "--slot-save-path") == "/state/kv/qwen/abc"
    assert spec.argv[-6:-4] == ["--jinja", "a b; rm -rf /"]  # the user's own flags, then llmd's listen flags
    assert spec.kv is not None
    assert spec.kv.directory == Path("/state/kv/qwen/abc") and spec.kv.slots == 3
    assert spec.kv.save_path.format(slot=2) == "/slots/2?action=save"
    assert spec.kv.restore_path.format(slot=0) == "/slots/0?action=restore"


def test_without_a_kv_dir_nothing_is_saved() -> None:
    spec = LlamaCppDriver().launch(_request(Placement(ctx=2048)))
    assert "--slot-save-path" not in spec.argv and spec.kv is None
