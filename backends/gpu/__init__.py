"""GPU engines on this machine, run as supervised server processes (vLLM for now).

Nothing here imports torch or vLLM at import time: hardware detection shells out to
`nvidia-smi`, and the engine runs in its own process group under `ProcessSupervisor`.
"""

from backends.gpu.hardware import GpuInfo, HardwareInfo, choose_tensor_parallel_size, detect_hardware
from backends.gpu.supervisor import (
    ProcessFailedError,
    ProcessState,
    ProcessSupervisor,
    SupervisorSettings,
    backoff_delay,
)
from backends.gpu.vllm import (
    VLLM_SUPERVISION,
    VllmBackend,
    VllmMetrics,
    VllmSettings,
    build_command,
    parse_vllm_metrics,
    resolve_settings,
)

__all__ = [
    "VLLM_SUPERVISION",
    "GpuInfo",
    "HardwareInfo",
    "ProcessFailedError",
    "ProcessState",
    "ProcessSupervisor",
    "SupervisorSettings",
    "VllmBackend",
    "VllmMetrics",
    "VllmSettings",
    "backoff_delay",
    "build_command",
    "choose_tensor_parallel_size",
    "detect_hardware",
    "parse_vllm_metrics",
    "resolve_settings",
]
