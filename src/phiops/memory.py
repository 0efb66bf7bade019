"""Peak memory of one block of work (one variant's evaluation, one quantization), not of the process.

``ru_maxrss`` is the peak of the whole process life, so the second model a process loads would
report the first one's peak too. On Linux the peak RSS (``VmHWM``) can be reset by writing ``5``
to ``/proc/self/clear_refs``; freed heap is first handed back to the OS (``malloc_trim``) so the
new peak starts from what is really still held. Where that is impossible (not Linux, a sandbox
refusing the write) the process-lifetime peak is reported and ``rss_scope`` says so.
On CUDA the caching allocator's own peak counter is reset per block.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter for this process; False where that is not possible."""
    _trim_heap()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset (VmHWM), else the process-lifetime peak."""
    with contextlib.suppress(OSError, AttributeError):
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@contextlib.contextmanager
def measure_peak(device: str = "cpu") -> Iterator[dict[str, Any]]:
    """Measure the peak memory of the block; the dict is filled when the block ends.

    Args:
        device: ``"cuda"`` also measures the CUDA allocator's peak.

    Yields:
        A dict that, after the block, holds ``peak_rss_bytes``, ``rss_scope`` (``"block"`` or
        ``"process"``) and ``peak_cuda_bytes`` (None without CUDA).
    """
    stats: dict[str, Any] = {}
    scope = "block" if reset_peak_rss() else "process"
    cuda = device == "cuda"
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield stats
    finally:
        stats["peak_rss_bytes"] = peak_rss_bytes()
        stats["rss_scope"] = scope
        if cuda:
            import torch

            torch.cuda.synchronize()
            stats["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
        else:
            stats["peak_cuda_bytes"] = None
