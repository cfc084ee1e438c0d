"""Hardware detection: one interface, a real pynvml implementation, a fixture one.

`NvmlDetector` asks the NVIDIA driver through pynvml (from nvidia-ml-py) and
the OS through psutil/platform. A host without the NVIDIA driver is a normal
CPU-only node: `nvmlInit` raises NVMLError_LibraryNotFound (or
DriverNotLoaded) and detection returns no GPUs, with no error.

`FixtureDetector` reads a `NodeHardware` from JSON: tests use it, and so can
the local cluster to make a laptop pretend to be a 4090 node.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
from abc import ABC, abstractmethod
from dataclasses import replace
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import psutil

from nexus.nodes.hardware import CpuInfo, GpuInfo, NodeHardware
from nexus.config import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class Detector(ABC):
    @abstractmethod
    def detect(self) -> NodeHardware:
        """The node's hardware now (free VRAM, utilisation etc. change between calls)."""

    def close(self) -> None:
        """Release whatever the detector holds (the NVML handle)."""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> "Detector":
        """Build the detector the settings describe."""


class NvmlDetector(Detector):
    """GPUs through pynvml, host facts through psutil. Initialises NVML once."""

    def __init__(self, disk_path: Path, nvml: ModuleType | None = None) -> None:
        if nvml is None:
            import pynvml as nvml  # imported here so a missing wheel only breaks this detector
        self._nvml = nvml
        self._disk_path = disk_path
        self._nvml_ready: bool | None = None  # None: not tried yet

    @classmethod
    def from_settings(cls, settings: Settings) -> "NvmlDetector":
        return cls(disk_path=settings.data_dir)

    def detect(self) -> NodeHardware:
        host = probe_host(self._disk_path)
        if not self._ensure_nvml():
            return host
        driver, cuda = self._driver_versions()
        gpus = tuple(self._gpu(index) for index in range(self._nvml.nvmlDeviceGetCount()))
        return replace(host, driver_version=driver, cuda_version=cuda, gpus=gpus)

    def close(self) -> None:
        if self._nvml_ready:
            self._nvml.nvmlShutdown()
        self._nvml_ready = None

    def _ensure_nvml(self) -> bool:
        if self._nvml_ready is None:
            self._nvml_ready = self._init_nvml()
        return self._nvml_ready

    def _init_nvml(self) -> bool:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
            return True
        except (nvml.NVMLError_LibraryNotFound, nvml.NVMLError_DriverNotLoaded):
            log.info("no NVIDIA driver on this host: CPU-only node")
        except nvml.NVMLError as error:
            # Still useful as a CPU node; the warning tells the operator the GPUs are invisible.
            log.warning("NVML failed to start (%s): treating this host as CPU-only", error)
        return False

    def _driver_versions(self) -> tuple[str | None, str | None]:
        nvml = self._nvml
        driver = self._optional(nvml.nvmlSystemGetDriverVersion)
        cuda = self._optional(nvml.nvmlSystemGetCudaDriverVersion)
        return driver, (None if cuda is None else format_cuda_version(cuda))

    def _gpu(self, index: int) -> GpuInfo:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        utilization = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        return GpuInfo(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            memory_total_mb=int(memory.total // MIB),
            memory_free_mb=int(memory.free // MIB),
            compute_capability=f"{major}.{minor}",
            utilization_percent=None if utilization is None else int(utilization.gpu),
            temperature_c=self._optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
            power_draw_w=None if power_mw is None else power_mw / 1000.0,
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
        )

    def _optional(self, read: Callable[..., Any], *args: Any) -> Any:
        """A metric some devices do not report (NotSupported on many consumer cards) becomes None."""
        try:
            return read(*args)
        except self._nvml.NVMLError as error:
            log.debug("NVML %s unavailable: %s", getattr(read, "__name__", read), error)
            return None


class FixtureDetector(Detector):
    """Hardware read from a JSON file in `NodeHardware.to_dict()` shape."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    @classmethod
    def from_settings(cls, settings: Settings) -> "FixtureDetector":
        if not settings.agent_hardware_fixture:
            raise ValueError("the fixture detector needs NEXUS_AGENT_HARDWARE_FIXTURE (a JSON file)")
        return cls(Path(settings.agent_hardware_fixture))

    def detect(self) -> NodeHardware:
        return load_hardware(self._path)


class DetectorKind(str, Enum):
    NVML = "nvml"
    FIXTURE = "fixture"


DETECTORS: dict[DetectorKind, type[Detector]] = {
    DetectorKind.NVML: NvmlDetector,
    DetectorKind.FIXTURE: FixtureDetector,
}


def make_detector(settings: Settings) -> Detector:
    kind = DetectorKind(settings.agent_detector)
    return DETECTORS[kind].from_settings(settings)


def load_hardware(path: Path) -> NodeHardware:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    try:
        return NodeHardware.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def probe_host(disk_path: Path) -> NodeHardware:
    """CPU, RAM, disk and OS of this host, with no GPUs."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing_ancestor(disk_path)))
    logical = psutil.cpu_count(logical=True) or 1
    return NodeHardware(
        hostname=socket.gethostname(),
        os=platform.platform(),
        cpu=CpuInfo(
            model=_cpu_model(),
            physical_cores=psutil.cpu_count(logical=False) or logical,
            logical_cores=logical,
        ),
        ram_total_mb=memory.total // MIB,
        ram_available_mb=memory.available // MIB,
        disk_total_mb=disk.total // MIB,
        disk_free_mb=disk.free // MIB,
    )


def format_cuda_version(encoded: int) -> str:
    """NVML encodes CUDA 12.4 as 12040 (1000 * major + 10 * minor)."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _cpu_model() -> str:
    # platform.processor() is empty on most Linux hosts; /proc/cpuinfo has the marketing name.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _existing_ancestor(path: Path) -> Path:
    """The data directory may not exist before the first start; measure the disk it will live on."""
    path = Path(path).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value
