"""Process-wide torch settings, taken and put back around a stage that changes them.

transformers' Trainer switches TF32 on for the whole process (``tf32=True`` goes through a cached
``enable_tf32``, never undone); other libraries flip SDPA backends, cuDNN and determinism flags.
Whatever runs later in the same process (evaluation, the decoders, the next test) would then
compute fp32 matmuls in TF32: the fused and CUDA-graph decoder equivalence tests missed their
1e-4 bound by 25-35x after the train tests for exactly that reason. A stage that needs such a
setting takes it inside :func:`scoped`, and everything in :func:`snapshot` is as before afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# torch >= 2.9 keeps TF32 per backend and operator (`fp32_precision`); setting the root one
# cascades to all. The legacy flags (`allow_tf32`, `set_float32_matmul_precision`) are views of
# the same state, and reading them after a new-style write raises, so only one API is used.
_PRECISION = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
              "mkldnn.rnn")
_SDPA = ("flash", "mem_efficient", "math", "cudnn")


def _backend(path: str) -> Any:
    import torch

    obj = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _new_precision_api() -> bool:
    import torch

    return hasattr(torch.backends, "fp32_precision")


def snapshot() -> dict[str, Any]:
    """Every process-wide torch setting that changes numerics or kernels, by name.

    Returns:
        Name -> value; equal snapshots mean the same numerics for what runs next.
    """
    import torch

    state: dict[str, Any] = {}
    if _new_precision_api():
        for path in _PRECISION:
            with contextlib.suppress(AttributeError):
                state[f"fp32_precision:{path or 'root'}"] = _backend(path).fp32_precision
        # The legacy setting is a second variable torch checks against the new one; restored too,
        # or a later legacy read (`allow_tf32`) raises "mix of the legacy and new APIs".
        with contextlib.suppress(RuntimeError):  # already mixed before us: leave it
            state["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    else:
        state["matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        state["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
        state["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    m = torch.backends.cuda.matmul
    state["matmul.fp16_reduced"] = m.allow_fp16_reduced_precision_reduction
    state["matmul.bf16_reduced"] = m.allow_bf16_reduced_precision_reduction
    for name in _SDPA:
        fn = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
        if fn is not None:
            state[f"sdp.{name}"] = fn()
    state["cudnn.enabled"] = torch.backends.cudnn.enabled
    state["cudnn.benchmark"] = torch.backends.cudnn.benchmark
    state["cudnn.deterministic"] = torch.backends.cudnn.deterministic
    state["deterministic"] = torch.are_deterministic_algorithms_enabled()
    state["deterministic.warn_only"] = torch.is_deterministic_algorithms_warn_only_enabled()
    state["default_dtype"] = torch.get_default_dtype()
    state["grad_enabled"] = torch.is_grad_enabled()
    state["anomaly"] = torch.is_anomaly_enabled()
    state["num_threads"] = torch.get_num_threads()
    state["cuda.device"] = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`snapshot` took."""
    import torch

    if _new_precision_api():
        if "float32_matmul_precision" in state:
            torch.set_float32_matmul_precision(state["float32_matmul_precision"])
        for path in _PRECISION:  # root first: setting it cascades, then each leaf as it was
            key = f"fp32_precision:{path or 'root'}"
            if key in state:
                _backend(path).fp32_precision = state[key]
    else:
        torch.backends.cuda.matmul.allow_tf32 = state["matmul.allow_tf32"]
        torch.backends.cudnn.allow_tf32 = state["cudnn.allow_tf32"]
        torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    m = torch.backends.cuda.matmul
    m.allow_fp16_reduced_precision_reduction = state["matmul.fp16_reduced"]
    m.allow_bf16_reduced_precision_reduction = state["matmul.bf16_reduced"]
    for name in _SDPA:
        if f"sdp.{name}" in state:
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(state[f"sdp.{name}"])
    torch.backends.cudnn.enabled = state["cudnn.enabled"]
    torch.backends.cudnn.benchmark = state["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = state["cudnn.deterministic"]
    torch.use_deterministic_algorithms(state["deterministic"], warn_only=state["deterministic.warn_only"])
    torch.set_default_dtype(state["default_dtype"])
    torch.set_grad_enabled(state["grad_enabled"])
    torch.set_anomaly_enabled(state["anomaly"])
    if torch.get_num_threads() != state["num_threads"]:
        torch.set_num_threads(state["num_threads"])
    if torch.cuda.is_initialized():
        torch.cuda.set_device(state["cuda.device"] if state["cuda.device"] is not None else 0)


def set_tf32(on: bool) -> None:
    """TF32 for fp32 matmuls and convolutions (CUDA), process-wide: use inside :func:`scoped`."""
    import torch

    if _new_precision_api():
        mode = "tf32" if on else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def scoped(*, tf32: bool | None = None) -> Iterator[None]:
    """Run a block that may change process-wide torch settings; put them all back after it.

    Args:
        tf32: switch TF32 on (or off) for the block; None leaves it as it is.
    """
    saved = snapshot()
    try:
        if tf32 is not None:
            set_tf32(tf32)
        yield
    finally:
        restore(saved)
