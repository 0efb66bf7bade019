"""The quantize stage on tiny random Llama- and Phi-3-shaped models (seconds each).

Widths are multiples of 128 so the default group size (128) applies unchanged. Calibration
is 4 rows of 16 tokens: enough to exercise every code path, not to measure quality.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from phiops.config import parse
from phiops.io import write_jsonl
from phiops.models import ensure_builtin, load_tokenizer, tiny_random
from phiops.paths import Layout
from phiops.stages import quantize as Q
from phiops.stages import format as format_stage

pytestmark = pytest.mark.integration

_COMMON = dict(
    vocab_size=49152,  # the builtin tokenizer's
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
ARCHS = {
    # GQA (kv heads < heads) and tied embeddings, like SmolLM2 and Llama 3.
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **_COMMON),
    # Fused qkv_proj / gate_up_proj, untied lm_head, like Phi-3-mini.
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, **_COMMON),
}
CFG = parse({"quantize": {"calibration_samples": 4, "calibration_max_length": 16}})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = ensure_builtin()
    root = tmp_path_factory.mktemp("tiny")
    return {name: tiny_random(arch, root / name, tokenizer_from=base) for name, arch in ARCHS.items()}


def _train_rows(model_dir: Path, n: int = 6) -> list[dict]:
    tok = load_tokenizer(model_dir)
    rows = []
    for i in range(n):
        msgs = [
            {"role": "user", "content": f"Ticket #{i}: printer on floor {i} jams every morning, urgent."},
            {"role": "assistant", "content": json.dumps({"category": "hardware", "priority": "high", "floor": i})},
        ]
        rows.append(format_stage.encode_batch(tok, [msgs], 512)[0])
    return rows


def _layout(tmp_path: Path, model_dir: Path) -> Layout:
    layout = Layout(tmp_path)
    layout.merged.parent.mkdir(parents=True)
    layout.merged.symlink_to(model_dir, target_is_directory=True)
    write_jsonl(layout.train_split, _train_rows(model_dir))
    return layout


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


# ---------------------------------------------------------------------------------------
# The pin_memory workaround, unit level
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the bug shows only without an accelerator")
def test_upstream_pin_memory_still_fails_without_accelerator() -> None:
    # If this starts passing, llm-compressor fixed it: drop no_pinning_without_accelerator.
    from llmcompressor.pipelines.cache import IntermediatesCache

    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"x": torch.ones(2)})
    with pytest.raises(RuntimeError, match="accelerator"):
        cache.pin_memory(0)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the patch is applied only without an accelerator")
def test_pinning_patch_is_scoped_and_restored() -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.__dict__["pin_memory"]
    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"x": torch.ones(2)})
    with Q.no_pinning_without_accelerator() as active:
        assert active
        assert IntermediatesCache.__dict__["pin_memory"] is not original
        cache.pin_memory(0)  # no error, nothing pinned
        assert not cache.fetch(0)["x"].is_pinned()
    assert IntermediatesCache.__dict__["pin_memory"] is original

    with pytest.raises(ValueError, match="boom"):
        with Q.no_pinning_without_accelerator():
            raise ValueError("boom")
    assert IntermediatesCache.__dict__["pin_memory"] is original


def test_pinning_patch_not_applied_with_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.__dict__["pin_memory"]
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    with Q.no_pinning_without_accelerator() as active:
        assert not active
        assert IntermediatesCache.__dict__["pin_memory"] is original


def test_only_awq_uses_the_pinning_patch() -> None:
    assert isinstance(Q.get_quantizer("gptq").calibration_context(), contextlib.nullcontext)
    with Q.get_quantizer("awq").calibration_context() as active:
        assert active == (not torch.accelerator.is_available())


# ---------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------


def test_unknown_method_is_refused() -> None:
    with pytest.raises(Q.QuantizeError, match="unknown quantization method 'int3'"):
        Q.get_quantizer("int3")


def test_group_size_mismatch_is_refused_with_a_fitting_size() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    # SmolLM2-like widths: 576 = 4.5 x 128.
    cfg = AutoConfig.for_model(**{**ARCHS["llama"], "hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1})
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(Q.QuantizeError, match=r"group_size: 64") as err:
        Q.check_group_size(model, 128)
    assert "q_proj" in str(err.value)
    Q.check_group_size(model, 64)  # fits: no error


def test_awq_mappings_follow_the_architecture(models: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    def smooth_layers(arch: dict) -> list[str]:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
        return [m.smooth_layer for m in Q.awq_mappings(model)]

    phi3 = smooth_layers(ARCHS["phi3"])
    assert "re:.*qkv_proj$" in phi3 and "re:.*gate_up_proj$" in phi3  # fused projections
    assert "re:.*up_proj$" in smooth_layers(ARCHS["llama"])
    # Phi-2: parallel attention+MLP, so the input norm must balance fc1 too.
    phi2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**_COMMON, "model_type": "phi", "num_attention_heads": 4}))
    first = Q.awq_mappings(phi2)[0]
    assert first.smooth_layer == "re:.*input_layernorm$" and "re:.*mlp.fc1$" in first.balance_layers


def test_calibration_takes_first_rows_truncated(tmp_path: Path, models: dict[str, Path]) -> None:
    rows = _train_rows(models["llama"], n=5)
    rows[1] = {"text": rows[1]["text"]}  # no input_ids: tokenized from text
    write_jsonl(tmp_path / "train.jsonl", rows)
    ds = Q.calibration_dataset(tmp_path / "train.jsonl", 3, 10, load_tokenizer(models["llama"]))
    assert len(ds) == 3
    assert ds[0]["input_ids"] == rows[0]["input_ids"][:10]
    assert all(len(r) == 10 for r in ds["input_ids"]) and all(sum(m) == 10 for m in ds["attention_mask"])
    with pytest.raises(Q.QuantizeError, match="not found"):
        Q.calibration_dataset(tmp_path / "missing.jsonl", 3, 10)


# ---------------------------------------------------------------------------------------
# The stage, end to end
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq"])  # awq on CPU exercises the pin_memory fix
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_quantize_roundtrip(tmp_path: Path, models: dict[str, Path], arch: str, method: str) -> None:
    from transformers import AutoModelForCausalLM

    layout = _layout(tmp_path, models[arch])
    out = Q.run(CFG, layout, method)

    assert out.model_dir == layout.quantized(method) and out.report == layout.quantize_report(method)
    report = json.loads(out.report.read_text())
    assert report["method"] == method and report["scheme"] == "W4A16" and report["group_size"] == 128
    assert report["calibration_samples"] == 4 and report["device"] in ("cpu", "cuda")
    assert report["size_bytes"] > 0 and report["peak_rss_bytes"] > 0 and report["seconds"] > 0

    # Packed compressed-tensors checkpoint: int4 groups of 128, lm_head and embeddings left alone.
    qc = json.loads((out.model_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 128
    assert group["weights"]["strategy"] == "group" and group["input_activations"] is None

    original = AutoModelForCausalLM.from_pretrained(models[arch], use_safetensors=True)
    linears = _linear_names(original)
    with safe_open(out.model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for name in linears:
            assert f"{name}.weight_packed" in keys and f"{name}.weight_scale" in keys, name
            assert f"{name}.weight" not in keys, name
            assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
            # 8 int4 values per int32, group of 128 -> one scale per 128 columns.
            rows_, cols = original.get_submodule(name).weight.shape
            assert tuple(f.get_tensor(f"{name}.weight_packed").shape) == (rows_, cols // 8)
            assert tuple(f.get_tensor(f"{name}.weight_scale").shape) == (rows_, cols // 128)
        assert f.get_tensor("model.embed_tokens.weight").is_floating_point()
        if not ARCHS[arch]["tie_word_embeddings"]:
            assert f.get_tensor("lm_head.weight").is_floating_point()

    # Tokenizer, chat template and generation config (EOS ids) travel byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out.model_dir / name).read_bytes() == (models[arch] / name).read_bytes(), name

    # Plain transformers loads it (safetensors only, no remote code) and generates.
    model, info = AutoModelForCausalLM.from_pretrained(
        out.model_dir, use_safetensors=True, trust_remote_code=False, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(hasattr(model.get_submodule(n), "weight_packed") for n in linears)  # still int4 in memory
    tok = load_tokenizer(out.model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 4
    # compressed-tensors dequantizes on the first forward; the weights are then the int4
    # grid's, near but not equal to the originals (a random-init load would be far off).
    for name in linears:
        w0, wq = original.get_submodule(name).weight, model.get_submodule(name).weight
        rel = ((wq - w0).norm() / w0.norm()).item()
        assert 0 < rel < 0.35, (name, rel)


def test_crash_mid_save_leaves_no_output(tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _layout(tmp_path, models["llama"])
    seen: list[Path] = []

    def killed(src: Path, dst: Path) -> list[str]:
        # Weights are on disk in the temporary directory; the "kill" lands before the rename.
        assert (dst / "model.safetensors").exists() and dst != layout.quantized("gptq")
        seen.append(dst)
        raise KeyboardInterrupt("simulated kill mid-save")

    monkeypatch.setattr(Q, "copy_tokenizer_assets", killed)
    with pytest.raises(KeyboardInterrupt):
        Q.run(CFG, layout, "gptq")
    assert seen, "the save never reached the simulated kill"
    assert not layout.quantized("gptq").exists()
    assert not seen[0].exists()  # the temporary directory is cleaned up too
    assert not layout.quantize_report("gptq").exists()
