"""GPU telemetry: what a card is doing besides holding memory.

Temperature, power draw and limit, utilisation, fan speed and the energy counter are read only
for reports (`llmctl gpus`, the dashboard, /metrics), never for placement: each is one more
driver call per card, and the scheduler needs only memory.

Every reading is optional. Cards differ in what they report (a data-centre card has no fan,
older cards have no energy counter, some laptops report no power), so a reading the driver
refuses is None, shown as "n/a", and never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = [
    "NOT_AVAILABLE",
    "NO_TELEMETRY",
    "TELEMETRY_FIELDS",
    "GpuTelemetry",
    "has_readings",
    "read_nvml_telemetry",
    "telemetry_text",
]

# What a reading the card does not give looks like, in tables and on the dashboard.
NOT_AVAILABLE = "n/a"
_JOULES_PER_WH = 3600.0


@dataclass(frozen=True)
class GpuTelemetry:
    """One card's readings at snapshot time; None where the card does not give one."""

    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    # NVML's utilisation: the share of the last sample period in which a kernel ran (gpu), and
    # in which the card's memory was read or written (memory); 0-100.
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    # Percent of the fan's maximum speed.
    fan_pct: int | None = None
    # The card's energy counter: joules used since the driver was loaded.
    energy_j: float | None = None

    def as_dict(self) -> dict[str, int | float | None]:
        return asdict(self)


NO_TELEMETRY = GpuTelemetry()
TELEMETRY_FIELDS = tuple(field.name for field in fields(GpuTelemetry))


def read_nvml_telemetry(nvml: Any, handle: Any) -> GpuTelemetry:
    """The readings of the card behind `handle`, through the `pynvml` module `nvml`."""

    def reading(name: str, *args: Any) -> Any:
        call: Callable[..., Any] | None = getattr(nvml, name, None)
        if call is None:  # an nvidia-ml-py too old to know the call
            return None
        try:
            return call(handle, *args)
        except nvml.NVMLError:  # NotSupported above all; any refusal means "no reading"
            return None

    power_mw = reading("nvmlDeviceGetPowerUsage")
    limit_mw = reading("nvmlDeviceGetEnforcedPowerLimit")
    rates = reading("nvmlDeviceGetUtilizationRates")
    energy_mj = reading("nvmlDeviceGetTotalEnergyConsumption")
    return GpuTelemetry(
        temperature_c=_whole(reading("nvmlDeviceGetTemperature", getattr(nvml, "NVML_TEMPERATURE_GPU", 0))),
        power_w=None if power_mw is None else int(power_mw) / 1000,
        power_limit_w=None if limit_mw is None else int(limit_mw) / 1000,
        utilization_gpu_pct=_whole(getattr(rates, "gpu", None)),
        utilization_memory_pct=_whole(getattr(rates, "memory", None)),
        fan_pct=_whole(reading("nvmlDeviceGetFanSpeed")),
        energy_j=None if energy_mj is None else int(energy_mj) / 1000,
    )


def _whole(value: Any) -> int | None:
    return None if value is None else int(value)


def has_readings(card: Mapping[str, Any]) -> bool:
    """Whether a card of the GPU report gives any reading at all (a simulated card may give none)."""
    return any(card.get(key) is not None for key in TELEMETRY_FIELDS)


def telemetry_text(card: Mapping[str, Any]) -> dict[str, str]:
    """One card's readings as short texts for people, "n/a" where missing.

    `card` is a card of the GPU report (`/v1/gpus`) or `GpuTelemetry.as_dict()`; a report from a
    daemon that predates telemetry has none of the keys, which reads as all "n/a"."""
    return {
        "temperature": _reading(card.get("temperature_c"), "°C"),
        "power": _reading(card.get("power_w"), " W"),
        "power_limit": _reading(card.get("power_limit_w"), " W"),
        "utilization_gpu": _reading(card.get("utilization_gpu_pct"), "%"),
        "utilization_memory": _reading(card.get("utilization_memory_pct"), "%"),
        "fan": _reading(card.get("fan_pct"), "%"),
        "energy": _energy(card.get("energy_j")),
    }


def _reading(value: float | None, unit: str) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.0f}{unit}"


def _energy(joules: float | None) -> str:
    """Watt-hours, the unit of an electricity bill: "950 Wh", "3.41 kWh"."""
    if joules is None:
        return NOT_AVAILABLE
    wh = joules / _JOULES_PER_WH
    return f"{wh:.0f} Wh" if wh < 1000 else f"{wh / 1000:.2f} kWh"
