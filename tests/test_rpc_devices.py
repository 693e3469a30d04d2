"""Devices of other machines over llama.cpp's RPC, and the engine's own report of what it
allocated on each device.

The first part runs without engines: the RPC protocol against a stand-in server, the
inventory's view of each device, the scheduler and the llama.cpp driver. The second runs real
`ggml-rpc-server` processes on loopback as two devices, each capped with `total_mib`, under a
real llama-server: the per-device estimate against the engine's own report, a model split over
both through a real daemon, a server that goes away, and learning from the report.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from conftest import BIN, wait_until
from llmd.daemon.config import DaemonConfig
from llmd.daemon.models.tinymodel import write_tiny_gguf
from llmd.daemon.placement.estimate import estimate_gguf
from llmd.daemon.placement.inventory import GpuInfo
from llmd.daemon.placement.rpc_devices import RemoteDevices, rpc_uuid
from llmd.daemon.placement.rpc_probe import RpcProbe, probe_rpc_server
from llmd.daemon.placement.scheduler import MeasuredSplit, ModelNeed, Plan, RunningModel, plan
from llmd.drivers.base import GpuShare, Placement
from llmd.drivers.llama_cpp import device_names, placement_args, split_shares
from llmd.drivers.llama_cpp_report import buffer_allocations

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# The RPC protocol, against a stand-in server


class FakeRpcServer:
    """Speaks the three messages llmd sends; `busy` accepts connections and never answers,
    like a server serving an engine."""

    def __init__(self, *, free: int, total: int, devices: int = 1, major: int = 7, busy: bool = False) -> None:
        self.free, self.total, self.devices, self.major, self.busy = free, total, devices, major, busy
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.busy:
                self.held.append(conn)
                continue
            with conn:
                try:
                    self._converse(conn)
                except (OSError, struct.error):
                    pass

    def _converse(self, conn: socket.socket) -> None:
        while True:
            head = _recv(conn, 9)
            cmd, size = struct.unpack("<BQ", head)
            _recv(conn, size)
            if cmd == 14:
                reply = bytes([self.major, 0, 0, 0]) + bytes(24)
            elif cmd == 15:
                reply = struct.pack("<I", self.devices)
            elif cmd == 11:
                reply = struct.pack("<QQ", self.free * MIB, self.total * MIB)
            else:
                return
            conn.sendall(struct.pack("<Q", len(reply)) + reply)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: the port is closed at once
        except OSError:
            pass
        self.sock.close()
        for conn in self.held:
            conn.close()


def _recv(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_probe_reads_the_device_memory_and_tells_busy_from_gone() -> None:
    idle = FakeRpcServer(free=3000, total=8000)
    busy = FakeRpcServer(free=1, total=1, busy=True)
    old = FakeRpcServer(free=1, total=1, major=3)
    several = FakeRpcServer(free=1, total=1, devices=2)
    try:
        found = probe_rpc_server(several.endpoint)
        assert found.status == "unreachable" and "one per endpoint" in found.detail
        assert probe_rpc_server(idle.endpoint) == RpcProbe("ok", total_mib=8000, free_mib=3000, devices=1, version="7.0.0")
        assert probe_rpc_server(busy.endpoint, answer_timeout=0.2).status == "busy"
        found = probe_rpc_server(old.endpoint)
        assert found.status == "unreachable" and "protocol 3.0.0" in found.detail
        gone = probe_rpc_server(f"127.0.0.1:{_closed_port()}")
        assert gone.status == "unreachable" and "refused" in gone.detail
    finally:
        for server in (idle, busy, old, several):
            server.close()


def test_remote_devices_cap_memory_and_report_changes() -> None:
    config = DaemonConfig.model_validate({"gpus": {"rpc": [
        {"endpoint": "10.0.0.2:50052", "name": "box", "total_mib": 4000, "margin_mib": 64},
        {"endpoint": "10.0.0.3:50052"},
    ]}})
    devices = RemoteDevices(config.gpus.rpc)
    # Never looked at: the cap alone, nothing free, not usable.
    first, second = devices.gpu_infos(2)
    assert (first.index, first.kind, first.endpoint, first.name, first.total_mib, first.free_mib) == (
        2, "rpc", "10.0.0.2:50052", "box", 4000, 0)
    assert first.uuid == rpc_uuid("10.0.0.2:50052") and first.margin_mib == 64 and not first.reachable
    assert second.total_mib == 0 and second.name == "10.0.0.3:50052"

    assert devices.record("10.0.0.2:50052", RpcProbe("ok", total_mib=64000, free_mib=60000)) is None
    assert devices.record("10.0.0.3:50052", RpcProbe("unreachable", detail="connection refused")) is False
    first, second = devices.gpu_infos(0)
    assert (first.total_mib, first.free_mib, first.reachable) == (4000, 4000, True)
    assert not second.reachable and second.status == "connection refused"
    # Busy keeps the last memory it could read; going away and coming back are changes.
    assert devices.record("10.0.0.2:50052", RpcProbe("busy", detail="in use by m")) is None
    assert devices.gpu_infos(0)[0].free_mib == 4000 and devices.gpu_infos(0)[0].status == "in use by m"
    assert devices.record("10.0.0.2:50052", RpcProbe("unreachable", detail="gone")) is False
    assert devices.record("10.0.0.2:50052", RpcProbe("ok", total_mib=64000, free_mib=50000)) is True


def test_the_manager_sees_a_device_go_and_come_back(tmp_path: Path) -> None:
    import anyio

    from llmd.daemon.manager.core import Manager
    from llmd.daemon.models.profiles import ProfileSet

    server = FakeRpcServer(free=6000, total=8000)
    config = DaemonConfig.model_validate({
        "server": {"state_dir": str(tmp_path)},
        "gpus": {"simulate": str(_empty_inventory(tmp_path)), "rpc": [{"endpoint": server.endpoint, "total_mib": 5000}]},
    })
    manager = Manager(config, {}, ProfileSet())
    try:
        assert [g.reachable for g in manager.planner.snapshot()] == [False]  # not looked at yet
        anyio.run(manager.remote_devices.check_all)
        (device,) = manager.gpu_report()["gpus"]
        assert (device["kind"], device["endpoint"], device["reachable"], device["total_mib"], device["free_mib"]) == (
            "rpc", server.endpoint, True, 5000, 5000)
        server.close()
        anyio.run(manager.remote_devices.check_all)
        (device,) = manager.gpu_report()["gpus"]
        assert device["reachable"] is False and "refused" in device["status"]
    finally:
        server.close()


def _empty_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "no-gpus.json"
    path.write_text('{"gpus": []}')
    return path


@pytest.mark.parametrize("endpoint", ["box", "box:0", "[::1]:50052", "a,b:1", ":50052", "host:70000"])
def test_an_rpc_endpoint_must_be_host_and_port(endpoint: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        DaemonConfig.model_validate({"gpus": {"rpc": [{"endpoint": endpoint}]}})


def test_an_endpoint_is_listed_once() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        DaemonConfig.model_validate({"gpus": {"rpc": [{"endpoint": "a:1"}, {"endpoint": "a:1"}]}})


# --------------------------------------------------------------------------------------------
# The scheduler


def rpc_gpu(index: int, port: int, total: int, free: int | None = None, *, reachable: bool = True) -> GpuInfo:
    free = total if free is None else free
    return GpuInfo(index, rpc_uuid(f"127.0.0.1:{port}"), f"127.0.0.1:{port}", total, free, total - free,
                   kind="rpc", endpoint=f"127.0.0.1:{port}", reachable=reachable)


def layered(name: str = "m", *, layers: int = 8, layer_mib: float = 10.0, remote: bool = True, **kw: object) -> ModelNeed:
    values: dict[str, object] = dict(
        name=name, layer_mib=(layer_mib,) * layers, non_layer_mib=2.0, kv_per_layer_mib=1.0, compute_mib=5.0,
        n_layers=layers, n_head=4, n_head_kv=4, tensor_parallel="auto", remote_devices=remote, layer_split=remote,
        output_mib=1.0,
    )
    values.update(kw)
    return ModelNeed(**values)  # type: ignore[arg-type]


def test_rpc_devices_take_only_engines_that_can_use_them_and_only_while_they_answer() -> None:
    devices = [rpc_gpu(0, 1, 1000), rpc_gpu(1, 2, 1000)]
    cpu = plan(layered(remote=False), devices, [], margin_mib=0)
    assert isinstance(cpu, Plan) and cpu.placement.cpu_only and "cannot use RPC devices" in cpu.reason

    result = plan(layered(), [devices[0], replace(devices[1], reachable=False)], [], margin_mib=0)
    assert isinstance(result, Plan) and [s.endpoint for s in result.placement.gpus] == ["127.0.0.1:1"]
    # No CUDA context on another machine's device: the share is the model alone.
    assert result.placement.gpus[0].vram_mib == math.ceil(8 * 11 + 2 + 5)

    none = plan(layered(), [replace(d, reachable=False) for d in devices], [], margin_mib=0)
    assert isinstance(none, Plan) and none.placement.cpu_only and "127.0.0.1:1, 127.0.0.1:2 do not answer" in none.reason


def test_a_model_too_big_for_either_device_is_split_layer_by_layer() -> None:
    devices = [rpc_gpu(0, 1, 70), rpc_gpu(1, 2, 70)]
    result = plan(layered(), devices, [], margin_mib=0)
    assert isinstance(result, Plan), result
    shares = result.placement.gpus
    # 8 layers and the output layer: 5 on the first, 3 and the output head on the last.
    assert [s.layers for s in shares] == [5, 4]
    assert [s.vram_mib for s in shares] == [5 * 11 + 5, 3 * 11 + 1 + 5]
    assert "split over" in result.reason


def test_an_rpc_device_holds_one_model_at_a_time() -> None:
    devices = [rpc_gpu(0, 1, 1000)]
    running = [RunningModel("other", {0: 10}, in_flight=1)]
    busy = plan(layered(), devices, running, margin_mib=0)
    assert not isinstance(busy, Plan) or busy.placement.cpu_only
    idle = [RunningModel("other", {0: 10})]
    evicting = plan(layered(), devices, idle, margin_mib=0)
    assert isinstance(evicting, Plan) and evicting.evict == ("other",)


def test_a_measured_placement_is_planned_with_the_engine_figures() -> None:
    devices = [rpc_gpu(0, 1, 1000), rpc_gpu(1, 2, 1000)]
    measured = MeasuredSplit(devices=(devices[0].uuid, devices[1].uuid), gpu_layers=None, cpu_moe=0, mib=(40, 30))
    result = plan(layered(measured=measured, tensor_parallel=2), devices, [], margin_mib=0)
    assert isinstance(result, Plan)
    assert [s.vram_mib for s in result.placement.gpus] == [40, 30] and [s.layers for s in result.placement.gpus] == [5, 4]
    assert "as the engine reported" in result.reason
    # Not where it was measured (a device gone): planned from the estimate.
    alone = plan(layered(measured=measured), [devices[0]], [], margin_mib=0)
    assert isinstance(alone, Plan) and alone.placement.gpus[0].vram_mib == 8 * 11 + 2 + 5


def test_the_compute_parts_add_up_to_the_single_device_buffer(tmp_path: Path) -> None:
    from llmd.daemon.placement.estimate import split_compute_bytes

    model = write_tiny_gguf(tmp_path / "m.gguf", **SPLIT_SHAPE)
    estimate = estimate_gguf(model, 512, parallel=1)
    parts = estimate.compute_parts
    assert parts is not None and parts.inputs + parts.peak + parts.outputs == estimate.compute_bytes
    assert parts.attention <= parts.peak and parts.row == 512 * 512 * 4
    # A device with only the output head computes only the logits; pipelining copies each
    # device's inputs and costs the first device most.
    only_output = split_compute_bytes(parts, first=False, holds_output=True, layers=0, last_layer=False, pipelined=True)
    assert only_output == parts.outputs
    kwargs = dict(holds_output=False, layers=4, last_layer=False)
    plain = split_compute_bytes(parts, first=True, pipelined=False, **kwargs)  # type: ignore[arg-type]
    piped = split_compute_bytes(parts, first=True, pipelined=True, **kwargs)  # type: ignore[arg-type]
    later = split_compute_bytes(parts, first=False, pipelined=True, **kwargs)  # type: ignore[arg-type]
    assert plain < later < piped


# --------------------------------------------------------------------------------------------
# The llama.cpp driver


def test_the_driver_names_rpc_devices_and_splits_by_planned_layers() -> None:
    placement = Placement(gpus=(
        GpuShare(0, "GPU-a", 5000, layers=20),
        GpuShare(1, rpc_uuid("10.0.0.2:50052"), 3000, endpoint="10.0.0.2:50052", layers=9),
        GpuShare(2, rpc_uuid("10.0.0.3:50052"), 3000, endpoint="10.0.0.3:50052", layers=4),
    ))
    args = placement_args(placement)
    assert args[args.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"
    assert args[args.index("--device") + 1] == "CUDA0,RPC0,RPC1"
    assert args[args.index("--tensor-split") + 1] == "20,9,4"
    assert placement.cuda_visible_devices() == "GPU-a"
    assert device_names(placement) == ["CUDA0", "RPC0", "RPC1"]
    # A plan that names no layers splits by memory, as before.
    assert split_shares(Placement(gpus=(GpuShare(0, "a", 200), GpuShare(1, "b", 100)))) == [200, 100]


def test_the_report_maps_buffers_to_the_placement_devices() -> None:
    placement = Placement(gpus=(
        GpuShare(0, "GPU-a", 500),
        GpuShare(3, rpc_uuid("127.0.0.1:5"), 300, endpoint="127.0.0.1:5"),
    ))
    lines = [
        "load_tensors:   CPU_Mapped model buffer size =     1.50 MiB",
        "load_tensors: RPC0[127.0.0.1:5] model buffer size =    27.50 MiB",
        "load_tensors:        CUDA0 model buffer size =    45.00 MiB",
        "llama_kv_cache:        CUDA0 KV buffer size =    10.00 MiB",
        "llama_kv_cache: RPC0[127.0.0.1:5] KV buffer size =     6.00 MiB",
        "sched_reserve:        CUDA0 compute buffer size =    29.00 MiB",
        "sched_reserve: RPC0[127.0.0.1:5] compute buffer size =    20.00 MiB",
        "sched_reserve:   CUDA_Host compute buffer size =     2.00 MiB",
        "sched_reserve: RPC0[10.9.9.9:1] compute buffer size =    99.00 MiB",
    ]
    found = {item.index: item for item in buffer_allocations(lines, placement)}
    assert set(found) == {0, 3, -1}
    assert (found[0].model_mib, found[0].kv_mib, found[0].compute_mib) == (45.0, 10.0, 29.0)
    assert found[3].total_mib == 53.5 and found[-1].total_mib == 3.5
    assert buffer_allocations(["no buffers here"], placement) == []


# --------------------------------------------------------------------------------------------
# The remote side: `llmd rpc-server` and its unit

REPO = Path(__file__).resolve().parents[1]


def test_rpc_server_listens_on_loopback_unless_told_the_network_is_private(tmp_path: Path) -> None:
    result = subprocess.run([str(BIN / "llmd"), "rpc-server", "--host", "0.0.0.0"], capture_output=True, text=True)
    assert result.returncode == 2 and "--allow-remote" in result.stderr and "no authentication" in result.stderr

    from llmd.daemon.engines.rpc_server import check_host, first_device, rpc_server_argv

    check_host("127.0.0.1", allow_remote=False)
    check_host("192.168.1.20", allow_remote=True)
    argv = rpc_server_argv(Path("/x/ggml-rpc-server"), "127.0.0.1", 50052, "CUDA1", 4, True)
    assert argv == ["/x/ggml-rpc-server", "--host", "127.0.0.1", "--port", "50052", "--device", "CUDA1",
                    "--threads", "4", "--cache"]
    # The first device llama.cpp lists, else the CPU.
    lister = tmp_path / "llama-server"
    lister.write_text("#!/bin/sh\necho 'Available devices:'\necho '  CUDA0: NVIDIA RTX 3060 (12000 MiB, 11000 MiB free)'\n")
    lister.chmod(0o755)
    assert first_device(lister) == "CUDA0"
    lister.write_text("#!/bin/sh\necho 'Available devices:'\necho '  (none)'\n")
    assert first_device(lister) == "CPU"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_rpc_unit_passes_verify_and_is_locked_down_like_llmd_service(tmp_path: Path) -> None:
    shipped = (REPO / "systemd" / "llmd-rpc@.service").read_text()
    unit = tmp_path / "llmd-rpc@50052.service"
    unit.write_text(shipped.replace("/opt/llmd/bin/llmd", str(BIN / "llmd")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rated = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True)
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", rated.stdout)
    assert score is not None and float(score.group(1)) <= 3.0, rated.stdout[-2000:]
    assert "--port %i" in shipped and "User=llmd" in shipped and "DevicePolicy=closed" in shipped


# --------------------------------------------------------------------------------------------
# Real RPC servers and a real llama-server

# A generated model whose buffers are tens of MiB: each of its 8 layers takes 10 MiB.
SPLIT_SHAPE = dict(n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8)
MOE_SHAPE = dict(n_layers=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=4, n_expert=8, n_expert_used=2)
RELATIVE = 0.10


@pytest.fixture(scope="session")
def rpc_server_bin(llama_server_bin: Path) -> Path:
    from conftest import REQUIRE_ENGINES
    from llmd.daemon.config import default_engines_dir
    from llmd.daemon.engines.rpc_server import find_rpc_server
    from llmd.daemon.errors import LlmdError

    try:
        return find_rpc_server(default_engines_dir())
    except LlmdError as exc:
        if REQUIRE_ENGINES:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@dataclass
class RpcServer:
    """One real ggml-rpc-server on loopback, serving this machine's CPU as a device."""

    binary: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port), "--device", "CPU", "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_until(lambda: probe_rpc_server(self.endpoint).status == "ok", timeout=30, what=f"{self.endpoint} to answer")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def rpc_servers(rpc_server_bin: Path) -> Iterator[list[RpcServer]]:
    from llmd.daemon.engines.supervisor import free_port

    servers: list[RpcServer] = []
    for _ in range(2):
        server = RpcServer(rpc_server_bin, free_port("127.0.0.1", {s.port for s in servers}))
        server.start()
        servers.append(server)
    yield servers
    for server in servers:
        server.kill()


def _profile(model: Path, **launch: object):  # type: ignore[no-untyped-def]
    from llmd.daemon.models.profiles import Profile

    profile = Profile.model_validate({"engine": "llama-cpp", "model": {"path": str(model)},
                                      "launch": {"ctx": 512, **launch}})
    profile.name = "m"
    return profile


def _planned(profile, model: Path, devices: list[GpuInfo]) -> Placement:  # type: ignore[no-untyped-def]
    from llmd.daemon.placement.estimate import estimate_profile
    from llmd.daemon.placement.scheduler import need_for_profile

    need = replace(need_for_profile(profile, estimate_profile(profile, model)), remote_devices=True, layer_split=True)
    result = plan(need, devices, [], margin_mib=0)
    assert isinstance(result, Plan) and not result.placement.cpu_only, result
    return result.placement


def _engine_report(llama_server: Path, profile, model: Path, placement: Placement, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start llama-server as the driver would for `placement`, wait until it is ready, and
    return what it reported allocating on each device, and its argv."""
    from llmd.daemon.engines.supervisor import free_port
    from llmd.drivers.base import LaunchRequest
    from llmd.drivers.llama_cpp import LlamaCppDriver

    port = free_port("127.0.0.1")
    spec = LlamaCppDriver().launch(LaunchRequest(profile=profile, placement=placement, model_path=model,
                                                 host="127.0.0.1", port=port, command=[str(llama_server)]))
    log_path = tmp_path / f"engine-{port}.log"
    with log_path.open("wb") as log:
        engine = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **spec.env},
                                  start_new_session=True)
    try:
        def ready() -> bool:
            assert engine.poll() is None, log_path.read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=180, interval=0.2, what="llama-server to be ready")
    finally:
        os.killpg(engine.pid, signal.SIGKILL)
        engine.wait(timeout=30)
    return buffer_allocations(log_path.read_text().splitlines(), placement), spec.argv


def _assert_within(placement: Placement, allocations, rpc: list[RpcServer]) -> None:  # type: ignore[no-untyped-def]
    reported = {item.index: item for item in allocations}
    assert len(placement.gpus) == 2 and all(share.remote for share in placement.gpus)
    for share in placement.gpus:
        engine = reported[share.index]
        assert engine.total_mib > 0, (share, engine)
        error = abs(share.vram_mib - engine.total_mib) / engine.total_mib
        assert error <= RELATIVE, (
            f"device {share.endpoint}: planned {share.vram_mib} MiB, the engine allocated {engine.total_mib:.2f} MiB "
            f"(weights {engine.model_mib}, KV {engine.kv_mib}, compute {engine.compute_mib}): {error:.0%} off"
        )



@pytest.mark.engine
def test_the_per_device_estimate_matches_the_engine_on_two_rpc_devices(
    llama_server_bin: Path, rpc_servers: list[RpcServer], tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "split.gguf", **SPLIT_SHAPE)
    devices = [rpc_gpu(i, server.port, 80, 80) for i, server in enumerate(rpc_servers)]

    # Full offload: the model fits neither device alone, so each takes half of its layers.
    profile = _profile(model, tensor_parallel="auto")
    full = _planned(profile, model, devices)
    assert full.gpu_layers is None and [s.layers for s in full.gpus] == [5, 4]
    allocations, argv = _engine_report(llama_server_bin, profile, model, full, tmp_path)
    assert argv[argv.index("--device") + 1] == "RPC0,RPC1" and argv[argv.index("--tensor-split") + 1] == "5,4"
    _assert_within(full, allocations, rpc_servers)

    # Partial offload: three layers stay on the CPU.
    profile = _profile(model, tensor_parallel=2, offload=3)
    partial = _planned(profile, model, devices)
    assert partial.gpu_layers == 5
    allocations, _ = _engine_report(llama_server_bin, profile, model, partial, tmp_path)
    assert any(item.index == -1 and item.model_mib > 0 for item in allocations)  # the CPU's layers
    _assert_within(partial, allocations, rpc_servers)


@pytest.mark.engine
def test_the_per_device_estimate_matches_the_engine_with_moe_experts_on_the_cpu(
    llama_server_bin: Path, rpc_servers: list[RpcServer], tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "moe.gguf", **MOE_SHAPE)
    estimate = estimate_gguf(model, 512, parallel=1)
    per_layer_mib = estimate.layer_bytes[0] / MIB
    # Room on each device for its layers without the experts of one of them.
    cap = math.ceil(2 * per_layer_mib + estimate.compute_bytes / MIB)
    devices = [rpc_gpu(i, server.port, cap, cap) for i, server in enumerate(rpc_servers)]
    profile = _profile(model, tensor_parallel=2, offload="moe-experts")
    placement = _planned(profile, model, devices)
    assert placement.cpu_moe_layers >= 1 and placement.gpu_layers is None
    allocations, argv = _engine_report(llama_server_bin, profile, model, placement, tmp_path)
    assert argv[argv.index("--n-cpu-moe") + 1] == str(placement.cpu_moe_layers)
    _assert_within(placement, allocations, rpc_servers)


# --------------------------------------------------------------------------------------------
# Through a real daemon


def _rpc_daemon(make_daemon, tmp_path: Path, servers: list[RpcServer], profiles: dict[str, str], cap: int = 80):  # type: ignore[no-untyped-def]
    """A daemon with no local card (an empty simulated inventory) and the servers as devices."""
    sim = tmp_path / "no-gpus.json"
    sim.write_text('{"gpus": []}')
    devices = "".join(
        f'[[gpus.rpc]]\nendpoint = "{server.endpoint}"\nname = "box{i}"\ntotal_mib = {cap}\nmargin_mib = 0\n'
        for i, server in enumerate(servers)
    )
    extra = f'[gpus]\nsimulate = "{sim}"\nrpc_check_interval = 0.3\n{devices}'
    daemon = make_daemon(profiles, extra_config=extra)
    wait_until(lambda: all(card["reachable"] for card in _gpus(daemon)), timeout=30, what="the RPC devices to answer")
    return daemon


def _gpus(daemon) -> list[dict]:  # type: ignore[no-untyped-def]
    return json.loads(daemon.llmctl("gpus", "--json").stdout)["gpus"]


def _row(daemon, name: str) -> dict:  # type: ignore[no-untyped-def]
    return next(row for row in daemon.ps() if row["model"] == name)


def _profile_toml(model: Path, **launch: object) -> str:
    lines = ['engine = "llama-cpp"', "[model]", f'path = "{model}"', "[launch]", "ctx = 512"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in launch.items()]
    return "\n".join(lines) + "\n"


def _chat(daemon, model: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=300)


@pytest.mark.engine
def test_a_model_split_over_two_rpc_devices_serves_and_survives_losing_one(
    make_daemon, rpc_servers: list[RpcServer], tmp_path: Path
) -> None:
    model = write_tiny_gguf(tmp_path / "split.gguf", **SPLIT_SHAPE)
    daemon = _rpc_daemon(make_daemon, tmp_path, rpc_servers,
                         {"m": _profile_toml(model, tensor_parallel="auto", offload="auto")})
    cards = _gpus(daemon)
    assert [(c["kind"], c["endpoint"], c["name"], c["total_mib"]) for c in cards] == [
        ("rpc", s.endpoint, f"box{i}", 80) for i, s in enumerate(rpc_servers)]
    table = daemon.llmctl("gpus").stdout
    assert all(s.endpoint in table for s in rpc_servers)

    # Too big for either device alone: split over both, and it answers.
    response = _chat(daemon, "m")
    assert response.status_code == 200, response.text
    row = _row(daemon, "m")
    assert [d["endpoint"] for d in row["devices"] if d["index"] >= 0] == [s.endpoint for s in rpc_servers]
    wait_until(lambda: all(d["reported"] for d in _row(daemon, "m")["devices"] if d["index"] >= 0),
               timeout=30, what="the engine's report in ps")
    for device in _row(daemon, "m")["devices"]:
        if device["index"] < 0:
            continue
        reported = device["reported"]["total_mib"]
        assert reported > 10 and abs(device["planned_mib"] - reported) <= RELATIVE * reported, device
    argv = row["argv"]
    assert argv[argv.index("--rpc") + 1] == ",".join(s.endpoint for s in rpc_servers)
    held = {c["endpoint"]: [m["model"] for m in c["models"]] for c in _gpus(daemon)}
    assert held == {s.endpoint: ["m"] for s in rpc_servers}

    # One server goes away: the device is unreachable, the model fails naming it, llmd lives.
    lost = rpc_servers[1]
    lost.kill()
    wait_until(lambda: not _gpus(daemon)[1]["reachable"], timeout=30, what="the lost device to be unreachable")
    wait_until(lambda: _row(daemon, "m")["state"] == "failed", timeout=60, what="the model to fail")
    assert lost.endpoint in _row(daemon, "m")["error"]
    assert daemon.process is not None and daemon.process.poll() is None
    assert "unreachable" in daemon.llmctl("gpus").stdout
    # The next plan leaves it out: what fits on the other device, the rest on the CPU.
    replanned = json.loads(daemon.llmctl("plan", "m", "--json").stdout)
    assert replanned["fits"] and [g["index"] for g in replanned["gpus"]] == [0], replanned
    # Back again: plans use it again.
    lost.start()
    wait_until(lambda: _gpus(daemon)[1]["reachable"], timeout=30, what="the device to answer again")
    again = json.loads(daemon.llmctl("plan", "m", "--json").stdout)
    assert [g["index"] for g in again["gpus"]] == [0, 1], again


@pytest.mark.engine
def test_the_second_plan_uses_what_the_engine_reported_on_a_simulated_card(make_daemon, tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "split.gguf", **SPLIT_SHAPE)
    sim = tmp_path / "gpus.json"
    sim.write_text('{"gpus": [{"name": "Sim", "total_mib": 4000, "free_mib": 4000}]}')
    daemon = make_daemon({"m": _profile_toml(model)}, extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n')
    first = json.loads(daemon.llmctl("plan", "m", "--json").stdout)
    assert first["need_source"] == "estimated from the model file"

    daemon.llmctl("load", "m")
    store = daemon.state_dir / "measured-vram.json"
    wait_until(lambda: store.exists() and "m" in json.loads(store.read_text()), timeout=30, what="the measurement")
    measured = json.loads(store.read_text())["m"]
    reported = measured["per_gpu_mib"]["0"]
    assert measured["devices"] == ["GPU-sim-0000-0"] and reported > 10
    device = _row(daemon, "m")["devices"][0]
    assert math.ceil(device["reported"]["total_mib"]) == reported

    second = json.loads(daemon.llmctl("plan", "m", "--json").stdout)
    assert "the engine reported" in second["need_source"]
    overhead = first["estimate"]["gpu_overhead_mib"]
    assert second["gpus"][0]["vram_mib"] == math.ceil(reported * 1.05) + overhead, (second, measured)
