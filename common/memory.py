"""Peak memory of the current process, reset and read around one learner step (pure: imports no Ray).

CUDA: the caching allocator's peak of allocated bytes on the device. CPU: the process's peak resident set (VmHWM),
reset through /proc/self/clear_refs (Linux >= 4.0), which counts everything the process holds, not just tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the peak then runs from the process's start
        pass


def peak_mb(device: torch.device) -> float:
    """The peak since the last reset_peak, in MiB (NaN where the platform does not tell)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
