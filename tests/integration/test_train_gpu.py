"""The train stage on CUDA: QLoRA (NF4 base), padding-free through the varlen kernel, Liger.

Skipped without CUDA (CI has no GPU): run on a GPU machine with
`PHIOPS_TEST_TOKENIZER=<tokenizer dir> pytest -m gpu` (any tokenizer directory will do; without
the variable the embedded model's tokenizer is used).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phiops import attention
from phiops.stages import format as format_stage
from phiops.stages import train

from test_train_merge import _project  # noqa: E402  (same folder; rootdir-relative import)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA on CUDA: needs a GPU (CI has none)"),
]


@pytest.fixture(scope="module")
def phi3_tiny(tmp_path_factory, tiny_configs) -> Path:
    from phiops.models import ensure_builtin, tiny_random

    tok = os.environ.get("PHIOPS_TEST_TOKENIZER") or ensure_builtin()
    return tiny_random(tiny_configs["phi3"], tmp_path_factory.mktemp("gpu") / "phi3", tokenizer_from=tok)


def test_qlora_defaults_on_cuda(phi3_tiny, tmp_path):
    cfg, layout = _project(tmp_path, phi3_tiny, gradient_checkpointing=True)
    format_stage.run(cfg, layout)
    train.run(cfg, layout)
    report = json.loads(layout.train_report.read_text())
    assert report["device"] == "cuda" and report["base_4bit_nf4"] is True
    assert report["attention"] == attention.NAME and report["padding_free"] is True
    assert report["optim"] == "paged_adamw_8bit"
    assert torch.isfinite(torch.tensor(report["eval_loss"]))
    adapter = load_file(layout.adapter / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_varlen_padding_free_learns_what_padded_sdpa_learns(phi3_tiny, tmp_path):
    runs = {}
    for pf in (False, True):
        cfg, layout = _project(tmp_path / str(pf), phi3_tiny, padding_free=pf, max_steps=3, lora={"dropout": 0.0},
                               attention="auto" if pf else "sdpa", liger=False)
        format_stage.run(cfg, layout)
        train.run(cfg, layout)
        runs[pf] = json.loads(layout.train_report.read_text())
    rp, rf = runs[False], runs[True]
    assert rf["attention"] == attention.NAME and rp["attention"] == "sdpa"
    assert rf["tokens_seen"] == rp["tokens_seen"]
    # bf16 compute: the two kernels round differently; a row attending across its border would
    # move the loss by far more than this.
    assert rf["eval_loss"] == pytest.approx(rp["eval_loss"], rel=2e-2)


def test_liger_patches_only_the_trained_instance(phi3_tiny, tmp_path):
    pytest.importorskip("liger_kernel", reason="liger-kernel is the `gpu` extra")
    from transformers.models.phi3 import modeling_phi3

    before = (modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP, modeling_phi3.apply_rotary_pos_emb)
    cfg, layout = _project(tmp_path, phi3_tiny, liger=True, max_steps=2)
    format_stage.run(cfg, layout)
    train.run(cfg, layout)
    assert json.loads(layout.train_report.read_text())["liger_kernels"] == ["rms_norm", "swiglu", "rope"]
    # Models built afterwards in this process (evaluation, serving) get plain transformers.
    assert (modeling_phi3.Phi3RMSNorm, modeling_phi3.Phi3MLP, modeling_phi3.apply_rotary_pos_emb) == before
