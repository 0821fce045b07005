"""Peak memory of a run: RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU."""

from __future__ import annotations

from pathlib import Path

import torch


def _read_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Resettable peak memory for one run inside a long-lived process."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sampled = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Writing 5 to clear_refs resets VmHWM (Linux), so each run of a suite gets its own peak.
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self._sampled = 0

    def sample(self) -> None:
        """Fallback where VmHWM cannot be reset: remember the largest RSS seen."""
        if self.device.type != "cuda":
            rss = _read_status_kib("VmRSS")
            if rss is not None:
                self._sampled = max(self._sampled, rss * 1024)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _read_status_kib("VmHWM")
        return max(hwm * 1024 if hwm is not None else 0, self._sampled)
