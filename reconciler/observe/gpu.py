"""Per-process GPU memory via NVML, when there is a GPU; otherwise say we could not observe."""

from __future__ import annotations

from typing import Any

from reconciler.domain.facts import Gpu, GpuProc

_nvml: Any = None
_init_error: str | None = None


def _init() -> Any:
    global _nvml, _init_error
    if _nvml is not None or _init_error is not None:
        return _nvml
    try:
        import pynvml

        pynvml.nvmlInit()
        _nvml = pynvml
    except ImportError:
        _init_error = "nvidia-ml-py is not installed (pip install 'ailayer[gpu]')"
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        _init_error = f"NVML unavailable: {exc}"
    return _nvml


def observe() -> Gpu:
    nvml = _init()
    if nvml is None:
        return Gpu(False, f"VRAM not observable on this machine: {_init_error}")
    try:
        found: list[GpuProc] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = (proc.usedGpuMemory or 0) / (1 << 20)
                found.append(GpuProc(int(proc.pid), round(used, 1)))
        return Gpu(True, f"{nvml.nvmlDeviceGetCount()} GPU(s) observed via NVML", tuple(found))
    except Exception as exc:
        return Gpu(False, f"NVML query failed: {exc}")
