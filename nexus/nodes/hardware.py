"""The node's hardware as one typed value.

Detection (pynvml, psutil) produces a `NodeHardware`; so does a JSON fixture.
Everything downstream (tiering, worker planning, heartbeats, can-fit) reads
this value and never the devices, so it can all be tested from data.

Units: memory in MiB (what `nvidia-smi` calls MB), power in watts,
temperature in degrees Celsius, utilisation in percent. A metric the device
does not report (NVML's NotSupported, common on consumer cards) is None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index, which is PCI bus order
    name: str  # e.g. "NVIDIA GeForce RTX 4090"
    uuid: str  # e.g. "GPU-8f6b…"; stable across reboots, unlike the index
    memory_total_mb: int
    memory_free_mb: int
    compute_capability: str  # "major.minor", e.g. "9.0"
    utilization_percent: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None

    @property
    def compute_capability_tuple(self) -> tuple[int, int]:
        return parse_compute_capability(self.compute_capability)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuInfo":
        return cls(
            index=int(_require(data, "index", "gpu")),
            name=str(_require(data, "name", "gpu")),
            uuid=str(_require(data, "uuid", "gpu")),
            memory_total_mb=int(_require(data, "memory_total_mb", "gpu")),
            memory_free_mb=int(_require(data, "memory_free_mb", "gpu")),
            compute_capability=str(_require(data, "compute_capability", "gpu")),
            utilization_percent=_optional(data, "utilization_percent", int),
            temperature_c=_optional(data, "temperature_c", int),
            power_draw_w=_optional(data, "power_draw_w", float),
            power_limit_w=_optional(data, "power_limit_w", float),
        )


@dataclass(frozen=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cores: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CpuInfo":
        return cls(
            model=str(_require(data, "model", "cpu")),
            physical_cores=int(_require(data, "physical_cores", "cpu")),
            logical_cores=int(_require(data, "logical_cores", "cpu")),
        )


@dataclass(frozen=True)
class NodeHardware:
    hostname: str
    os: str  # e.g. "Linux-6.8.0-x86_64-with-glibc2.39"
    cpu: CpuInfo
    ram_total_mb: int
    ram_available_mb: int
    disk_total_mb: int
    disk_free_mb: int
    driver_version: str | None = None  # None when there is no NVIDIA driver
    cuda_version: str | None = None  # highest CUDA the driver supports, e.g. "12.4"
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def vram_total_mb(self) -> int:
        return sum(gpu.memory_total_mb for gpu in self.gpus)

    @property
    def vram_free_mb(self) -> int:
        return sum(gpu.memory_free_mb for gpu in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = [asdict(gpu) for gpu in self.gpus]  # a list, as JSON has no tuples
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NodeHardware":
        gpus = tuple(GpuInfo.from_dict(g) for g in data.get("gpus") or ())
        indexes = [gpu.index for gpu in gpus]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"duplicate GPU indexes in hardware description: {indexes}")
        return cls(
            hostname=str(_require(data, "hostname", "node")),
            os=str(_require(data, "os", "node")),
            cpu=CpuInfo.from_dict(_require(data, "cpu", "node")),
            ram_total_mb=int(_require(data, "ram_total_mb", "node")),
            ram_available_mb=int(_require(data, "ram_available_mb", "node")),
            disk_total_mb=int(_require(data, "disk_total_mb", "node")),
            disk_free_mb=int(_require(data, "disk_free_mb", "node")),
            driver_version=_optional(data, "driver_version", str),
            cuda_version=_optional(data, "cuda_version", str),
            gpus=tuple(sorted(gpus, key=lambda gpu: gpu.index)),
        )


def parse_compute_capability(text: str) -> tuple[int, int]:
    """"8.6" -> (8, 6). Tuples compare correctly where floats would not ("10.0" > "9.0")."""
    major, _, minor = str(text).strip().partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        raise ValueError(f"compute capability must look like '8.6', got {text!r}") from None


def _require(data: dict[str, Any], key: str, what: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{what} description must be an object, got {type(data).__name__}")
    if data.get(key) is None:
        raise ValueError(f"{what} description lacks {key!r}")
    return data[key]


def _optional(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    return None if value is None else kind(value)
