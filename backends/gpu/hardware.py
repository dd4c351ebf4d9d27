"""What accelerators this machine has, found without importing anything heavy at import time.

CUDA GPUs come from `nvidia-smi` when it is on PATH (fast, and it does not initialise a
CUDA context in this process); torch is only imported as a fallback, and only inside
`detect_hardware`. The parsing and the tensor-parallel choice are pure functions so they
can be tested with captured output.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = ("--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None


@dataclass(frozen=True)
class HardwareInfo:
    cuda_gpus: tuple[GpuInfo, ...] = ()
    cuda_source: str = ""  # "nvidia-smi", "torch" or "" when no CUDA GPU was found
    rocm: bool = False
    mps: bool = False
    cpu_cores: int = 1
    ram_total_bytes: int | None = None

    @property
    def gpu_count(self) -> int:
        return len(self.cuda_gpus)

    @property
    def accelerators(self) -> frozenset[str]:
        """Names for `Capabilities.hardware`."""
        found = {"cpu"}
        if self.cuda_gpus:
            found.add("cuda")
        if self.rocm:
            found.add("rocm")
        if self.mps:
            found.add("mps")
        return frozenset(found)

    def as_dict(self) -> dict[str, object]:
        facts = asdict(self)
        facts["cuda_gpus"] = [asdict(gpu) for gpu in self.cuda_gpus]
        facts["gpu_count"] = self.gpu_count
        return facts


# ---- parsing ------------------------------------------------------------------------------


def _mib(field: str) -> int | None:
    # nvidia-smi writes "[N/A]" or "[Not Supported]" for values a GPU (or MIG slice) lacks.
    try:
        return int(float(field.strip()))
    except ValueError:
        return None


def parse_nvidia_smi(output: str) -> tuple[GpuInfo, ...]:
    """Parse `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits`.

    Lines that are not three fields (warnings, blank lines) are skipped. GPU names never
    contain commas in practice, but the memory fields are split from the right anyway.
    """
    gpus: list[GpuInfo] = []
    for line in output.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) != 3 or not parts[0].strip():
            continue
        name, total, used = (part.strip() for part in parts)
        if _mib(total) is None and _mib(used) is None and not total.startswith("["):
            continue  # not a data line ("Failed to initialize NVML: ...", a header)
        gpus.append(GpuInfo(len(gpus), name, _mib(total), _mib(used)))
    return tuple(gpus)


def visible_gpus(gpus: tuple[GpuInfo, ...], cuda_visible_devices: str | None) -> tuple[GpuInfo, ...]:
    """Apply CUDA_VISIBLE_DEVICES, which nvidia-smi ignores but vLLM (via CUDA) honours.

    Integer entries select by index; UUID or MIG entries can't be matched from this query,
    so they only limit the count.
    """
    if cuda_visible_devices is None:
        return gpus
    entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
    chosen: list[GpuInfo] = []
    for entry in entries:
        if not entry.lstrip("-").isdigit():
            return gpus[: len(entries)]
        index = int(entry)
        if not 0 <= index < len(gpus):
            break  # CUDA stops enumerating at the first invalid entry
        chosen.append(gpus[index])
    return tuple(chosen)


def parse_meminfo(text: str) -> int | None:
    """Total RAM in bytes from /proc/meminfo's `MemTotal: N kB` line."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                unit = fields[2].lower() if len(fields) > 2 else "kb"
                return int(fields[1]) * (1024 if unit == "kb" else 1)
    return None


def choose_tensor_parallel_size(gpu_count: int, num_attention_heads: int | None = None) -> int:
    """The largest power of two <= `gpu_count` that divides `num_attention_heads` (vLLM
    shards attention heads evenly, so heads % tp must be 0). At least 1: with no GPU the
    engine itself reports why it cannot start."""
    if num_attention_heads is not None and num_attention_heads <= 0:
        raise ValueError(f"num_attention_heads must be positive, got {num_attention_heads}")
    size = 1
    while size * 2 <= gpu_count and (num_attention_heads is None or num_attention_heads % (size * 2) == 0):
        size *= 2
    return size


# ---- probing ------------------------------------------------------------------------------


def _nvidia_smi_gpus(executable: str, timeout_s: float) -> tuple[GpuInfo, ...] | None:
    try:
        result = subprocess.run(
            [executable, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return None
    if result.returncode != 0:
        # A driver/library mismatch or no device: nvidia-smi is present but knows no GPU.
        log.warning("nvidia-smi exited with %s: %s", result.returncode, (result.stderr or result.stdout).strip())
        return None
    return parse_nvidia_smi(result.stdout)


def _torch_gpus() -> tuple[tuple[GpuInfo, ...], bool]:
    """CUDA GPUs and MPS availability from torch; ((), False) when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return (), False
    try:
        import torch

        gpus: list[GpuInfo] = []
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                gpus.append(GpuInfo(index, props.name, props.total_memory // (1024 * 1024), None))
        mps = getattr(torch.backends, "mps", None)
        return tuple(gpus), bool(mps is not None and mps.is_available())
    except Exception as exc:  # a broken CUDA install must not take detection down
        log.warning("torch device query failed: %s", exc)
        return (), False


def _cpu_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return len(affinity(0)) or 1
    return os.cpu_count() or 1


def _ram_total_bytes() -> int | None:
    try:
        total = parse_meminfo(Path("/proc/meminfo").read_text())
        if total:
            return total
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def detect_hardware(
    *, env: Mapping[str, str] | None = None, use_torch: bool = True, nvidia_smi_timeout_s: float = 10.0
) -> HardwareInfo:
    """Blocking (runs a subprocess, may import torch): call it from a worker thread."""
    environ = os.environ if env is None else env
    path = environ.get("PATH")
    gpus: tuple[GpuInfo, ...] = ()
    source = ""
    mps = False
    smi = shutil.which("nvidia-smi", path=path)
    if smi is not None:
        found = _nvidia_smi_gpus(smi, nvidia_smi_timeout_s)
        if found is not None:
            gpus, source = visible_gpus(found, environ.get("CUDA_VISIBLE_DEVICES")), "nvidia-smi"
    # torch is a multi-second import: only pay for it when it can tell us something new.
    if use_torch and (source == "" or sys.platform == "darwin"):
        torch_gpus, mps = _torch_gpus()
        if source == "" and torch_gpus:
            gpus, source = torch_gpus, "torch"  # torch already applied CUDA_VISIBLE_DEVICES
    return HardwareInfo(
        cuda_gpus=gpus,
        cuda_source=source if gpus else "",
        rocm=shutil.which("rocm-smi", path=path) is not None,
        mps=mps,
        cpu_cores=_cpu_cores(),
        ram_total_bytes=_ram_total_bytes(),
    )
