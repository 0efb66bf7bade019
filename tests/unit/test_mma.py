"""phiops.serve.mma without a GPU: its CUDA C++ builds for the GPUs it serves, with no spills, and it
says why it cannot run. CI has no GPU, so this is where a broken kernel source fails CI (NVRTC, from
the test extra, compiles it; Triton's cuobjdump reads the machine code). The kernel's results are
checked on a GPU: tests/integration/test_w4a16_gpu_kernel.py."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from phiops.serve import mma


def _resources(cubin: bytes) -> dict[str, int]:
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}


# Phi-3-mini's four matrices (K 3,072 and 8,192, group 128), and small Ks with groups 64 and 32 (the tests'
# tiny models, SmolLM2's 576): every fused stage the decoder asks for, both configs.
STAGES = {  # norm, gated, residual, zero points, float32 input, float32 output
    "qkv": (1, 0, 0, 0, 0, 0), "qkv_asym": (1, 0, 0, 1, 0, 0), "gate_up": (1, 1, 0, 0, 0, 1),
    "gate_up_bf16_out": (1, 1, 0, 1, 0, 0), "o": (0, 0, 1, 0, 1, 0), "down_asym": (0, 0, 1, 1, 1, 0),
}


@pytest.mark.parametrize("k,group", [(3072, 128), (8192, 128), (320, 64), (576, 32)])
@pytest.mark.parametrize("config", mma.CONFIGS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_the_kernel_builds_for_sm90_without_spilling(k: int, group: int, config: tuple[int, int], stage: str) -> None:
    pytest.importorskip("cuda.bindings.nvrtc")
    norm, gated, residual, zp, a_f32, out_f32 = STAGES[stage]
    defines = mma._defines(k, group, config, zp=bool(zp), norm=bool(norm), gated=bool(gated),
                           residual=bool(residual), a_f32=bool(a_f32), pdl=True, out_f32=bool(out_f32))
    cubin = mma.build(defines, "sm_90")
    res = _resources(cubin)
    assert res["STACK"] == 0 and res["LOCAL"] == 0, res  # registers only: no spill to local memory
    assert res["REG"] <= 128, res  # several blocks a multiprocessor, as the timings had
    assert res["SHARED"] <= 48 * 1024, res  # static shared memory: no opt-in needed


def test_the_kernel_builds_for_sm80() -> None:
    pytest.importorskip("cuda.bindings.nvrtc")
    assert mma.build(mma._defines(3072, 128, mma.CONFIGS[0], zp=True, norm=True, gated=True, residual=False,
                                  a_f32=False, pdl=False), "sm_80")[:4] == b"\x7fELF"


def test_a_broken_source_fails_with_nvrtcs_log(monkeypatch: Any) -> None:
    pytest.importorskip("cuda.bindings.nvrtc")
    monkeypatch.setattr(mma, "SOURCE", mma.SOURCE.replace("nib2(wl)", "nib2(w_l)", 1))
    with pytest.raises(RuntimeError, match="w_l"):
        mma.build(mma._defines(3072, 128, mma.CONFIGS[0], zp=False, norm=True, gated=False, residual=False,
                               a_f32=False, pdl=True), "sm_90")


def test_it_says_why_it_cannot_run(monkeypatch: Any) -> None:
    monkeypatch.setenv("PHIOPS_W4A16_MMA", "0")
    assert mma.disabled() == "PHIOPS_W4A16_MMA=0"
    monkeypatch.delenv("PHIOPS_W4A16_MMA")
    if torch.cuda.is_available():
        pytest.skip("the CPU reasons: this machine has CUDA")
    assert mma.disabled() == "needs CUDA"
    packed, scale = torch.zeros(16, 40, dtype=torch.int32), torch.ones(16, 5, dtype=torch.bfloat16)
    a, out = torch.zeros(320, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.bfloat16)
    assert mma.unsupported(packed, scale, None, 64, a, out) == "needs CUDA"
    with pytest.raises(ValueError, match="gemv_w4_mma: needs CUDA"):
        mma.gemv_w4_mma(packed, scale, None, 64, a, out)
