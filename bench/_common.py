"""What every benchmark records beside its numbers: the machine (CPU model and ISA, GPU) and the package versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

# Tokenizer files copied next to a random-weight checkpoint (any tokenizer will do: ids are random).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Python's and each package's version (None where it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model() -> str | None:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _cpu_isa() -> str:
    """The widest vector/matrix extensions: what CPU timings here depend on (AMX vs AVX2-only)."""
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo().splitlines() if line.startswith("flags")), [])
    return "+".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags) or "unknown"


def machine() -> dict[str, Any]:
    """The CPU, and the first GPU's name, memory and CUDA version where there is one."""
    import torch

    info: dict[str, Any] = {"cpu": _cpu_model() or platform.processor() or platform.machine(),
                            "cpu_isa": _cpu_isa(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda, gpu_uuid=str(p.uuid))
        info.update(_gpu_clocks())
    return info


def _gpu_clocks() -> dict[str, Any]:
    """The first GPU's driver, clocks and power limit (NVML, nvidia-ml-py): the same decoder with the
    same launch configs ran 5-6 % apart on two leases of the device tool's H200
    (results/decode_gate_up_ab_h200.json against results/decode_attn_prefetch_ab_h200.json), and
    these are what such a gap may follow."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {"gpu_driver": pynvml.nvmlSystemGetDriverVersion(),
                "gpu_clocks_mhz": {"sm": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                                   "sm_max": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                                   "mem": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                                   "mem_max": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)},
                "gpu_power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000}
    except Exception as exc:  # no nvidia-ml-py, or NVML refused: the record says so
        return {"gpu_clocks_error": f"{type(exc).__name__}: {exc}"[:200]}


def drive_engine(engine: Any, request_cls: Any, prompts: list[list[int]], max_new_tokens: int,
                 marks: list[list[tuple[float, int]]] | None = None,
                 errors: list[str] | None = None) -> tuple[float, int]:
    """Submit every prompt at once to a `phiops.serve.engine.Engine`, wait for all to end, close it.

    Args:
        marks: when given, filled with one list per prompt: (perf_counter time of its submit, 0),
            then (time, completion tokens so far) for each event the engine emitted for it (the
            time a client would see the text: after sampling, detokenizing and stop checks).
        errors: when given, the error message of every request that failed (e.g. an out-of-memory
            in a shared forward pass, which the engine turns into an error event per row).

    Returns:
        (wall seconds from the first submit to the last end, completion tokens produced).
    """
    import threading
    import time

    done, produced, finished = threading.Event(), [0], [0]
    own: list[list[tuple[float, int]]] = [[] for _ in prompts]

    def emitter(i: int) -> Any:
        def emit(ev: Any) -> None:
            own[i].append((time.perf_counter(), ev.completion_tokens))
            if ev.error and errors is not None:
                errors.append(ev.error)
            if ev.finish_reason or ev.error:
                produced[0] += ev.completion_tokens
                finished[0] += 1
                if finished[0] == len(prompts):
                    done.set()
        return emit

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        own[i].append((time.perf_counter(), 0))
        engine.submit(request_cls(prompt=p, max_new_tokens=max_new_tokens, emit=emitter(i)))
    done.wait()
    wall = time.perf_counter() - t0
    engine.close()
    if marks is not None:
        marks[:] = own
    return wall, produced[0]


def run_process(code: str) -> tuple[float, float]:
    """(wall s, CPU s) of a fresh interpreter running `code` (the process benches' one round)."""
    import resource
    import subprocess
    import sys
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
