"""Detection parsing, tiering and queue selection over every hardware fixture (pure logic)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from nexus.agent.detect import MIB, FixtureDetector, NvmlDetector, format_cuda_version, load_hardware
from nexus.nodes.hardware import NodeHardware
from nexus.nodes.tiers import TierThresholds, classify_gpu, classify_node, gpu_class_tokens, gpu_tiers, plan_workers
from nexus.config import Settings
from nexus.queueing.tiers import Tier
from tests.agent_support import FIXTURE_NAMES, FIXTURES, hardware

THRESHOLDS = TierThresholds.from_settings(Settings())

# fixture -> (node tier, tier of each GPU by index)
EXPECTED = {
    "h100x8": (Tier.AI_FACTORY, [Tier.AI_FACTORY] * 8),
    "rtx4090": (Tier.GPU_PEER, [Tier.GPU_PEER]),
    "rtx3090x2": (Tier.GPU_PEER, [Tier.GPU_PEER] * 2),
    "rtx3060": (Tier.GPU_INFRA, [Tier.GPU_INFRA]),
    "rtx4070": (Tier.GPU_INFRA, [Tier.GPU_INFRA]),
    "cpu_only": (Tier.CPU_ONLY, []),
    "mixed_4090_3060": (Tier.GPU_PEER, [Tier.GPU_PEER, Tier.GPU_INFRA]),
    "gtx1060_legacy": (Tier.CPU_ONLY, [Tier.CPU_ONLY]),  # compute capability 6.1 < 7.0
}


def test_every_fixture_has_an_expectation():
    assert sorted(EXPECTED) == FIXTURE_NAMES


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tiering_of_every_fixture(name):
    node_tier, per_gpu = EXPECTED[name]
    hw = hardware(name)
    assert classify_node(hw, THRESHOLDS) is node_tier
    assert [gpu_tiers(hw, THRESHOLDS)[g.index] for g in hw.gpus] == per_gpu


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_worker_plan_of_every_fixture(name):
    node_tier, per_gpu = EXPECTED[name]
    plans = plan_workers(hardware(name), THRESHOLDS, take_lower_tiers=False)
    usable = [(i, t) for i, t in enumerate(per_gpu) if t is not Tier.CPU_ONLY]
    if not usable:
        assert [(p.gpu_index, p.queues) for p in plans] == [(None, ("cpu_only",))]
    else:
        assert [(p.gpu_index, p.tier, p.queues) for p in plans] == [(i, t, (t.queue,)) for i, t in usable]


def test_lower_tier_queues_when_allowed_own_tier_first():
    plans = plan_workers(hardware("mixed_4090_3060"), THRESHOLDS, take_lower_tiers=True,
                         extra_queues=["model.tiny", "gpu_infra"])
    assert plans[0].queues == ("gpu_peer", "gpu_infra", "cpu_only", "model.tiny")
    assert plans[1].queues == ("gpu_infra", "cpu_only", "model.tiny")


def test_thresholds_come_from_settings():
    strict = TierThresholds.from_settings(Settings(tier_gpu_peer_min_vram_mb=30_000, tier_ai_factory_gpu_classes="B200"))
    assert classify_node(hardware("rtx4090"), strict) is Tier.GPU_INFRA
    assert classify_node(hardware("h100x8"), strict) is Tier.GPU_PEER  # not a B200


def test_class_tokens_are_whole_words():
    assert "A100" in gpu_class_tokens("NVIDIA A100-SXM4-80GB")
    assert "A100" not in gpu_class_tokens("NVIDIA RTX A1000")
    card = hardware("rtx4090").gpus[0]
    big_workstation = card.__class__(**{**card.__dict__, "name": "NVIDIA RTX A6000", "memory_total_mb": 49140})
    assert classify_gpu(big_workstation, THRESHOLDS) is Tier.GPU_PEER  # 48 GB, but not a data-centre class


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixtures_round_trip(name):
    hw = load_hardware(FIXTURES / f"{name}.json")
    assert NodeHardware.from_dict(hw.to_dict()) == hw
    assert FixtureDetector(FIXTURES / f"{name}.json").detect() == hw


def test_bad_descriptions_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="lacks 'cpu'"):
        NodeHardware.from_dict({**hardware("cpu_only").to_dict(), "cpu": None})
    gpus = hardware("rtx3090x2").to_dict()["gpus"]
    with pytest.raises(ValueError, match="duplicate GPU indexes"):
        NodeHardware.from_dict({**hardware("rtx3090x2").to_dict(), "gpus": [gpus[0], gpus[0]]})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hardware(broken)


# --- NVML parsing: a stand-in for the driver library, answering from a fixture ---------------------------

def fake_nvml(hw: NodeHardware, unsupported: frozenset[str] = frozenset(), init_error=None):
    """pynvml's surface as the detector uses it, with pynvml's own error classes."""
    gpus = {gpu.index: gpu for gpu in hw.gpus}

    def maybe(name, value, convert=lambda v: v):
        """A metric missing from the fixture is one the card does not report: NVML says NotSupported."""
        if name in unsupported or value is None:
            raise pynvml.NVMLError_NotSupported()
        return convert(value)

    def init():
        if init_error:
            raise init_error()

    return SimpleNamespace(
        NVMLError=pynvml.NVMLError, NVMLError_LibraryNotFound=pynvml.NVMLError_LibraryNotFound,
        NVMLError_DriverNotLoaded=pynvml.NVMLError_DriverNotLoaded, NVML_TEMPERATURE_GPU=0,
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: len(gpus),
        nvmlSystemGetDriverVersion=lambda: hw.driver_version,
        nvmlSystemGetCudaDriverVersion=lambda: int(hw.cuda_version.split(".")[0]) * 1000
        + int(hw.cuda_version.split(".")[1]) * 10,
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetName=lambda g: g.name.encode(),  # older bindings answer bytes
        nvmlDeviceGetUUID=lambda g: g.uuid,
        nvmlDeviceGetMemoryInfo=lambda g: SimpleNamespace(total=g.memory_total_mb * MIB, free=g.memory_free_mb * MIB),
        nvmlDeviceGetCudaComputeCapability=lambda g: tuple(int(x) for x in g.compute_capability.split(".")),
        nvmlDeviceGetUtilizationRates=lambda g: maybe("utilization", g.utilization_percent, lambda v: SimpleNamespace(gpu=v)),
        nvmlDeviceGetTemperature=lambda g, sensor: maybe("temperature", g.temperature_c),
        nvmlDeviceGetPowerUsage=lambda g: maybe("power", g.power_draw_w, lambda w: round(w * 1000)),
        nvmlDeviceGetEnforcedPowerLimit=lambda g: maybe("power", g.power_limit_w, lambda w: round(w * 1000)),
    )


@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if hardware(n).gpus])
def test_nvml_answers_parse_into_the_same_hardware(name, tmp_path):
    expected = hardware(name)
    detected = NvmlDetector(tmp_path, nvml=fake_nvml(expected)).detect()
    assert detected.gpus == expected.gpus
    assert (detected.driver_version, detected.cuda_version) == (expected.driver_version, expected.cuda_version)


def test_metrics_a_card_does_not_report_become_none(tmp_path):
    detected = NvmlDetector(tmp_path, nvml=fake_nvml(hardware("rtx4090"), frozenset({"power", "utilization"}))).detect()
    gpu = detected.gpus[0]
    assert gpu.power_draw_w is None and gpu.power_limit_w is None and gpu.utilization_percent is None
    assert gpu.temperature_c == hardware("rtx4090").gpus[0].temperature_c


@pytest.mark.parametrize("error", [pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded])
def test_no_driver_is_a_cpu_only_node(error, tmp_path):
    detected = NvmlDetector(tmp_path, nvml=fake_nvml(hardware("rtx4090"), init_error=error)).detect()
    assert detected.gpus == () and detected.driver_version is None
    assert classify_node(detected, THRESHOLDS) is Tier.CPU_ONLY


def test_this_host_detects_without_error(tmp_path):
    """The real pynvml on this machine (no NVIDIA driver here): CPU, RAM and disk, no error."""
    detected = NvmlDetector(tmp_path / "not-yet-created").detect()
    assert detected.cpu.logical_cores >= 1 and detected.ram_total_mb > 0 and detected.disk_total_mb > 0
    assert all(gpu.memory_total_mb > 0 for gpu in detected.gpus)


def test_cuda_version_decoding():
    assert format_cuda_version(12040) == "12.4" and format_cuda_version(11080) == "11.8"
