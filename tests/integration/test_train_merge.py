"""format -> train -> merge on tiny random models of each architecture (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phiops import config, lora
from phiops import data as D
from phiops.io import write_jsonl
from phiops.paths import Layout
from phiops.stages import format as format_stage
from phiops.stages import merge, train

pytestmark = pytest.mark.integration

ROWS = [
    {"instruction": "Classify the ticket.", "input": f"Order {i} is late, product {p}.", "output": json.dumps({"p": p, "n": i % 3})}
    for i, p in enumerate(["Nimbus", "Atlas", "Orbit"] * 14)
]


def _validated(test_fraction: float) -> list[dict]:
    """ROWS as the validate stage writes them (canonical conversations with their split)."""
    out = []
    for i, r in enumerate(ROWS):
        m = D.to_messages(r, "alpaca")
        out.append({"id": D.row_id(m), "messages": m, "split": "test" if D.is_test(m, test_fraction) else "train",
                    "format": "alpaca", "source": "rows.jsonl", "source_line": i + 1, "meta": {}})
    return out


def _project(tmp_path: Path, base: Path, **train_kw) -> tuple[config.Params, Layout]:
    layout = Layout(tmp_path)
    write_jsonl(layout.validated, _validated(0.2))
    cfg = config.parse(
        {
            "model": {"base": str(base)},
            "data": {"test_fraction": 0.2},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "logging_steps": 1, "warmup_steps": 0, **train_kw},
            "format": {"max_length": 96},
        }
    )
    return cfg, layout


@pytest.mark.parametrize("arch", ["llama", "phi3", "phi"])
def test_train_adapts_every_target_and_merge_is_equivalent(arch, tiny_models, tmp_path):
    cfg, layout = _project(tmp_path, tiny_models[arch])
    format_stage.run(cfg, layout)
    out = train.run(cfg, layout)

    report = json.loads(out.report.read_text())
    assert set(report["trainable_params_by_module"]) == set(lora.TARGETS[arch])
    # lora_B starts at zero: non-zero after training means the adapter really learnt.
    adapter = load_file(out.adapter / "adapter_model.safetensors")
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)
    # The base checkpoint on disk is untouched and its weights have no adapter folded in.
    assert not any("lora" in k for k in load_file(tiny_models[arch] / "model.safetensors"))

    merge.run(cfg, layout)
    m = json.loads(layout.merge_report.read_text())
    assert m["max_abs_logit_diff"] <= cfg.merge.max_abs_logit_diff
    assert m["argmax_agreement"] == 1.0
    assert m["dtype"] == "torch.float32" and m["bound"] == cfg.merge.max_abs_logit_diff
    gen = json.loads((layout.merged / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    # What serving needs travels with the weights: the chat template renders the same prompt.
    from phiops.models import load_tokenizer

    msgs = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(layout.merged).apply_chat_template(msgs, tokenize=False) == load_tokenizer(
        tiny_models[arch]).apply_chat_template(msgs, tokenize=False)
    assert not list(layout.merged.glob("*.bin")) and list(layout.merged.glob("*.safetensors"))


def test_merge_bound_follows_the_dtype():
    cfg = config.parse({})
    assert merge.bound_for(cfg, torch.float32) == cfg.merge.max_abs_logit_diff == 1e-3
    assert merge.bound_for(cfg, torch.bfloat16) == cfg.merge.max_abs_logit_diff_bf16


def test_merge_mismatch_fails_the_stage(tiny_models, tmp_path):
    cfg, layout = _project(tmp_path, tiny_models["llama"])
    cfg = config.parse({**cfg.dump(), "merge": {"max_abs_logit_diff": 1e-12}})  # tighter than fp32 round-off
    format_stage.run(cfg, layout)
    train.run(cfg, layout)
    with pytest.raises(merge.MergeMismatchError, match="max \\|dlogit\\|"):
        merge.run(cfg, layout)
    assert json.loads(layout.merge_report.read_text())["bound"] == 1e-12  # recorded even when it fails
    assert not layout.merged.exists()


def test_base_weights_bit_identical_after_training(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, layout = _project(tmp_path, tiny_models["phi3"])
    format_stage.run(cfg, layout)
    train.run(cfg, layout)
    before = load_file(tiny_models["phi3"] / "model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["phi3"]), str(layout.adapter))
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_llama_target_list_on_phi3_fails_loudly(tiny_models, tmp_path):
    cfg, layout = _project(tmp_path, tiny_models["phi3"], lora={"targets": lora.TARGETS["llama"]})
    format_stage.run(cfg, layout)
    with pytest.raises(lora.LoraTargetError, match="q_proj"):
        train.run(cfg, layout)


def test_stop_token_is_inside_the_loss_mask(tiny_models, tmp_path):
    cfg, layout = _project(tmp_path, tiny_models["llama"])
    format_stage.run(cfg, layout)
    row = json.loads(layout.train_split.read_text().splitlines()[0])
    trained = [t for t in row["labels"] if t != -100]
    assert 2 in trained  # <|im_end|>, the embedded template's end-of-turn / EOS
    assert row["input_ids"][-len(trained):] == trained
