"""dvc.yaml and paths.py must describe the same artifacts, and the flow must see every stage."""

from pathlib import Path

import yaml

from phiops.cli import STAGES
from phiops.config import QUANT_METHODS
from phiops.eval_report import PLOTS
from phiops.lineage import stage_order
from phiops.paths import Layout

ROOT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
L = Layout()


def _paths(entries):
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_every_stage_is_a_phiops_command():
    assert set(DVC) == set(STAGES)
    for name, st in DVC.items():
        cmd = st.get("do", st)["cmd"]
        assert cmd.startswith(f"phiops stage {name}")


def test_outs_match_layout():
    assert str(L.validated) in _paths(DVC["validate"]["outs"])
    assert str(L.processed) in _paths(DVC["format"]["outs"])
    assert str(L.validate_markdown) in _paths(DVC["validate"]["outs"])
    assert str(L.format_lengths) in _paths(DVC["format"]["plots"])
    assert str(L.adapter) in _paths(DVC["train"]["outs"])
    assert {str(L.train_report), str(L.train_live_metrics)} == _paths(DVC["train"]["metrics"])
    assert {str(L.train_live_plots)} == _paths(DVC["train"]["plots"])
    assert str(L.merged) in _paths(DVC["merge"]["outs"])
    assert DVC["quantize"]["foreach"] == list(QUANT_METHODS)
    assert {str(L.quantized(m)) for m in QUANT_METHODS} <= _paths(DVC["evaluate"]["deps"])
    assert str(L.eval_report) in _paths(DVC["evaluate"]["metrics"])
    # Every PNG the evaluate stage writes is declared as a DVC plot, beside the CSV table.
    assert {str(L.eval_table), *(str(L.eval_plot(p)) for p in PLOTS)} == _paths(DVC["evaluate"]["plots"])


def test_stage_order_follows_dependencies():
    order = stage_order(ROOT)
    assert order[:4] == ["validate", "format", "train", "merge"]
    assert set(order[4:6]) == {"quantize@gptq", "quantize@awq"} and order[-1] == "evaluate"


def test_validate_tracks_the_default_raw_data_and_its_params():
    from phiops.config import load

    cfg = load(ROOT / "params.yaml")
    deps = _paths(DVC["validate"]["deps"])
    assert any(cfg.data.raw.is_relative_to(d) for d in deps), "DVC would not see a change of the raw data"
    params = set(DVC["validate"]["params"])
    assert {"data.raw", "data.test", "data.format", "data.test_fraction", "validate"} <= params


def test_checkpoints_survive_a_dvc_rerun():
    # DVC deletes a stage's outs before rerunning it; the resume-after-crash checkpoints must not be one.
    for st in DVC.values():
        for kind in ("outs", "metrics", "plots"):
            assert str(L.checkpoints) not in _paths(st.get("do", st).get(kind, []))
    assert "src/phiops/checkpoints.py" in DVC["train"]["deps"]


def test_what_changed_is_never_guessed_when_dvc_cannot_tell(tmp_path):
    # Fail closed: "DVC could not read the pipeline" must stop the run, never read as "nothing changed".
    import pytest

    from phiops.lineage import LineageError, changed_stages

    (tmp_path / "dvc.yaml").write_text("stages: [not, a, mapping]\n")
    with pytest.raises(LineageError, match="DVC cannot tell what changed"):
        changed_stages(tmp_path)
