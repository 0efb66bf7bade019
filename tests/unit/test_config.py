import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phiops import config
from phiops.cli import EXIT_CONFIG, main

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    assert config.parse({}).model.base == config.BUILTIN_MODEL


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(preset):
    cfg = config.load(preset)
    if cfg.model.base.startswith("builtin:"):
        assert cfg.approval.mode == "auto"
    else:  # real Phi shapes: a person approves, and the shape is the public one
        assert cfg.approval.mode == "manual"
        arch = cfg.model.architecture
        assert arch["model_type"] in ("phi", "phi3")
        assert arch["hidden_size"] % arch["num_attention_heads"] == 0


def test_presets_cover_the_phi_family():
    assert {p.stem for p in PRESETS} >= {"phi-2", "phi-3-mini", "phi-4-mini", "phi-4", "smollm2-135m"}


def test_params_yaml_is_valid():
    config.load(ROOT / "params.yaml")


def test_every_bad_key_is_listed_once_with_its_path(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "train": {"lr": "fast", "lora": {"r": 0, "alpah": 16}},
                "evaluate": {"metric": "bleu"},
                "quantise": {},
            }
        )
    )
    with pytest.raises(config.ConfigError) as err:
        config.load(bad)
    msg = str(err.value)
    for path in ("train.lr", "train.lora.r", "train.lora.alpah", "evaluate.metric", "quantise"):
        assert f"  - {path}:" in msg, (path, msg)
    assert len(err.value.problems) == 5
    assert "unknown key" in msg and "'fast'" in msg


def test_auto_approval_only_for_builtin():
    with pytest.raises(config.ConfigError, match="approval.mode"):
        config.parse({"model": {"base": "microsoft/phi-2"}, "approval": {"mode": "auto"}})


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(config.ConfigError, match="line"):
        config.load(bad)


def test_cli_config_exit_code_and_nothing_runs(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: {epochs: -1, bogus: 1}\n")
    assert main(["--params", str(bad), "stage", "train"]) == EXIT_CONFIG == 3
    err = capsys.readouterr().err
    assert "train.epochs" in err and "train.bogus" in err
    assert not (tmp_path / "models").exists()


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "phiops.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("run", "stage", "config", "model", "data", "gate", "registry", "promote", "ask"):
        assert cmd in out


@pytest.mark.parametrize(
    "argv",
    [["run"], ["stage"], ["config"], ["config", "check"], ["config", "use"], ["model", "fetch"], ["data", "generate"],
     ["gate"], ["registry", "show"], ["registry", "history"], ["promote"], ["ask"]],
    ids=" ".join,
)
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    assert "usage: phiops" in capsys.readouterr().out


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.stem.startswith("phi-")], ids=lambda p: p.stem)
def test_phi_presets_carry_the_qlora_recipe(preset):
    from phiops.stages.train import _optim

    t = config.load(preset).train
    assert (t.qlora.quant_type, t.qlora.double_quant, t.qlora.compute_dtype) == ("nf4", True, "auto")
    assert (t.lora.r, t.lora.alpha, t.lora.dropout) == (16, 16, 0.05)
    assert t.lr_scheduler == "constant_with_warmup" and t.warmup_steps > 0 and t.gradient_checkpointing
    assert _optim(config.parse({"train": t.model_dump()}), nf4=True) == "paged_adamw_8bit"
    assert _optim(config.parse({"train": t.model_dump()}), nf4=False) == "adamw_torch"  # CPU


def test_optimizer_and_qlora_are_overridable():
    from phiops.stages.train import _optim

    cfg = config.parse({"train": {"optim": "adamw_torch_fused", "lr_scheduler": "cosine",
                                  "qlora": {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float16"}}})
    assert _optim(cfg, nf4=True) == "adamw_torch_fused"
    assert cfg.train.qlora.quant_type == "fp4" and cfg.train.lr_scheduler == "cosine"
    with pytest.raises(config.ConfigError, match="train.qlora.quant_type"):
        config.parse({"train": {"qlora": {"quant_type": "int3"}}})


def test_padding_free_auto_needs_a_varlen_attention_kernel():
    from types import SimpleNamespace

    from phiops.stages.train import resolve_padding_free

    assert config.parse({}).train.padding_free == "auto"
    assert resolve_padding_free("auto", SimpleNamespace(_attn_implementation="flash_attention_2")) is True
    # SDPA would mask the whole packed row block-diagonally: slower than padding (bench/README.md).
    assert resolve_padding_free("auto", SimpleNamespace(_attn_implementation="sdpa")) is False
    assert resolve_padding_free(True, SimpleNamespace(_attn_implementation="sdpa")) is True
    assert resolve_padding_free(False, SimpleNamespace(_attn_implementation="flash_attention_2")) is False
    assert resolve_padding_free("auto", SimpleNamespace(_attn_implementation="phiops_varlen")) is True


def test_attention_and_liger_auto_resolve_to_plain_torch_on_cpu():
    from phiops.stages.train import resolve_attention, resolve_liger

    t = config.parse({}).train
    assert (t.attention, t.liger, t.qlora.upcast_non_quantized) == ("auto", "auto", False)
    assert resolve_attention("auto", "cpu") == "sdpa"  # the varlen kernel is CUDA-only
    assert resolve_attention("eager", "cuda") == "eager"
    assert resolve_liger("auto", "cpu") is False
    assert resolve_liger(False, "cuda") is False
    with pytest.raises(ValueError, match="train.liger: true needs CUDA"):
        resolve_liger(True, "cpu")  # asked for explicitly: refused loudly, never ignored
