"""Accelerator detection: parsing captured `nvidia-smi` output, the tensor-parallel choice,
and detection end to end with stand-in `nvidia-smi`/`rocm-smi` programs on PATH."""

from __future__ import annotations

import shutil
import stat
import time
from pathlib import Path

import pytest

from backends.gpu.hardware import (
    GpuInfo,
    HardwareInfo,
    choose_tensor_parallel_size,
    detect_hardware,
    parse_meminfo,
    parse_nvidia_smi,
    visible_gpus,
)

# `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits`
H100_X2 = "NVIDIA H100 80GB HBM3, 81559, 0\nNVIDIA H100 80GB HBM3, 81559, 67425\n"
RTX_4090_CRLF = "NVIDIA GeForce RTX 4090, 24564, 1265\r\n"
MIG_NA = "NVIDIA A100-SXM4-40GB, [N/A], [N/A]\n"
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)
WITH_HEADER = "name, memory.total [MiB], memory.used [MiB]\nTesla T4, 15360, 3\n"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            H100_X2,
            (
                GpuInfo(0, "NVIDIA H100 80GB HBM3", 81559, 0),
                GpuInfo(1, "NVIDIA H100 80GB HBM3", 81559, 67425),
            ),
        ),
        (RTX_4090_CRLF, (GpuInfo(0, "NVIDIA GeForce RTX 4090", 24564, 1265),)),
        (MIG_NA, (GpuInfo(0, "NVIDIA A100-SXM4-40GB", None, None),)),
        (NO_DRIVER, ()),
        ("No devices were found\n", ()),
        ("", ()),
        (WITH_HEADER, (GpuInfo(0, "Tesla T4", 15360, 3),)),
        ("Weird, Name, With Commas, 1024, 10\n", (GpuInfo(0, "Weird, Name, With Commas", 1024, 10),)),
    ],
)
def test_nvidia_smi_output_is_parsed_into_gpus(output: str, expected: tuple[GpuInfo, ...]) -> None:
    assert parse_nvidia_smi(output) == expected


@pytest.mark.parametrize(
    ("visible", "names"),
    [
        (None, ["a", "b", "c"]),
        ("", []),
        ("2,0", ["c", "a"]),
        ("1,7,2", ["b"]),  # CUDA stops at the first invalid index
        ("GPU-8f2a1b7c-0000-1111-2222-333344445555", ["a"]),
        ("-1", []),
    ],
)
def test_cuda_visible_devices_selects_the_gpus_vllm_will_see(visible: str | None, names: list[str]) -> None:
    gpus = tuple(GpuInfo(i, name) for i, name in enumerate(["a", "b", "c"]))
    assert [gpu.name for gpu in visible_gpus(gpus, visible)] == names


@pytest.mark.parametrize(
    ("gpus", "heads", "expected"),
    [
        (0, None, 1),
        (1, None, 1),
        (2, None, 2),
        (3, None, 2),
        (4, None, 4),
        (7, None, 4),
        (8, None, 8),
        (8, 32, 8),
        (8, 12, 4),
        (8, 14, 2),
        (8, 7, 1),
        (4, 40, 4),
        (16, 40, 8),
        (2, 1, 1),
    ],
)
def test_tensor_parallel_size_is_the_largest_power_of_two_dividing_the_heads(
    gpus: int, heads: int | None, expected: int
) -> None:
    assert choose_tensor_parallel_size(gpus, heads) == expected


def test_tensor_parallel_choice_rejects_nonsense_head_counts() -> None:
    with pytest.raises(ValueError, match="num_attention_heads"):
        choose_tensor_parallel_size(4, 0)


def test_meminfo_total_is_read_in_bytes() -> None:
    meminfo = "MemTotal:       131891268 kB\nMemFree:        120000000 kB\n"
    assert parse_meminfo(meminfo) == 131891268 * 1024
    assert parse_meminfo("MemFree: 1 kB\n") is None


def _program(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_detection_runs_nvidia_smi_and_honours_cuda_visible_devices(tmp_path: Path) -> None:
    escaped = H100_X2.replace("\n", "\\n")
    _program(tmp_path, "nvidia-smi", f"printf '{escaped}'")
    _program(tmp_path, "rocm-smi", "exit 0")
    info = detect_hardware(env={"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "1"}, use_torch=False)
    assert info.cuda_gpus == (GpuInfo(1, "NVIDIA H100 80GB HBM3", 81559, 67425),)
    assert info.cuda_source == "nvidia-smi"
    assert info.rocm
    assert info.accelerators == frozenset({"cpu", "cuda", "rocm"})
    assert info.cpu_cores >= 1
    assert info.ram_total_bytes and info.ram_total_bytes > 0
    assert info.as_dict()["gpu_count"] == 1


def test_a_hanging_nvidia_smi_is_given_up_on_after_the_timeout(tmp_path: Path) -> None:
    _program(tmp_path, "nvidia-smi", f"exec {shutil.which('sleep')} 30")
    started = time.monotonic()
    info = detect_hardware(env={"PATH": str(tmp_path)}, use_torch=False, nvidia_smi_timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert info.cuda_gpus == ()
    assert info.cuda_source == ""


def test_a_failing_nvidia_smi_means_no_gpus(tmp_path: Path) -> None:
    _program(tmp_path, "nvidia-smi", f'echo "{NO_DRIVER.strip()}"; exit 9')
    info = detect_hardware(env={"PATH": str(tmp_path)}, use_torch=False)
    assert info == HardwareInfo(cpu_cores=info.cpu_cores, ram_total_bytes=info.ram_total_bytes)
    assert info.accelerators == frozenset({"cpu"})
