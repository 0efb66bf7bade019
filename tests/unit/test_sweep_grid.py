"""`phiops sweep`'s grid: checked against the config schema before any experiment is queued."""

from pathlib import Path

import pytest
import yaml

from phiops import cli, config, sweep

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
DVC_PARAMS = sweep.dvc_params(ROOT)


def test_grid_is_every_combination_in_the_values_dvc_writes():
    points = sweep.parse(["train.lr=1e-4,3e-4,1e-3", "train.lora.r=8,16"], PARAMS, DVC_PARAMS)
    assert points == [{"train.lr": lr, "train.lora.r": r} for lr in ("0.0001", "0.0003", "0.001") for r in ("8", "16")]
    # A key params.yaml leaves at its default, a list value, a range.
    points = sweep.parse(["train.qlora.quant_type=fp4", "train.lora.targets=[q_proj,v_proj],all-linear",
                          "train.lora.alpha=range(8,17,8)"], PARAMS, DVC_PARAMS)
    assert len(points) == 4 and points[0] == {"train.qlora.quant_type": "fp4", "train.lora.targets": "[q_proj,v_proj]",
                                              "train.lora.alpha": "8"}


def test_every_problem_is_listed_at_once():
    with pytest.raises(config.ConfigError) as err:
        sweep.parse(["train.lr=fast,1e-3,-1", "train.lora.alpah=8", "train.lr_scheduler=cosine,bogus",
                     "gate.min_task_metric=0.1,0.2", "train.batch_size=8,,16", "~train.seed", "train.lr=1e-2"],
                    PARAMS, DVC_PARAMS)
    problems = err.value.problems
    assert problems[0].startswith("train.lr: Input should be a valid number") and "'fast'" in problems[0]
    assert problems[1].startswith("train.lr: Input should be greater than 0")
    assert "train.lora.alpah: unknown key (misspelt? it is not part of the schema)" in problems
    assert any(p.startswith("train.lr_scheduler: Input should be") and "'bogus'" in p for p in problems)
    assert "gate.min_task_metric: no DVC stage reads it (dvc.yaml params), so every experiment would be the same" in problems
    assert any(p.startswith("train.batch_size=8,,16: Error parsing override") for p in problems)
    assert any(p.startswith("~train.seed: only key=value") for p in problems)
    assert "train.lr: given twice" in problems
    assert len(problems) == 8, problems


def test_a_rule_across_keys_is_checked_on_each_point():
    # Each value is fine alone (params.yaml has min_tokens 8, max_tokens 512); one point is not.
    with pytest.raises(config.ConfigError, match="min_tokens \\(100\\) must be <= max_tokens \\(50\\)"):
        sweep.parse(["validate.min_tokens=100", "validate.max_tokens=50,600"], PARAMS, DVC_PARAMS)


def test_cli_refuses_a_bad_grid_with_exit_3_before_anything_runs(tmp_path, capsys):
    for rel in ("params.yaml", "dvc.yaml"):
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    assert cli.main(["--root", str(tmp_path), "sweep", "train.lr=fast", "train.lora.r=8,16"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: sweep: 1 invalid setting(s):\n  - train.lr: Input should be a valid number")
    assert not (tmp_path / ".dvc").exists()  # not even a DVC repository was needed to refuse
