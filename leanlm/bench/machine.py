"""What machine the numbers come from, and how fast it can read memory (the decode ceiling)."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def describe(threads: int) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "memory_gib": round(total_memory_gib() or 0, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def memory_bandwidth_gbs(threads: int, size_mib: int = 1024, repeats: int = 7, device: str = "cpu") -> float:
    """Median GB/s of summing a large float32 array (far bigger than the caches) with `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32, device=device)
        data.sum()  # touch every page once before timing
        rates = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            data.sum()
            _sync(device)
            rates.append(data.numel() * 4 / (time.perf_counter() - started) / 1e9)
        return statistics.median(rates)
    finally:
        torch.set_num_threads(previous)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
