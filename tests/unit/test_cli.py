"""`phiops` exit codes and options, each through `cli.main` on a case that produces it; no model."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from phiops import __version__, cli
from phiops.io import write_json

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "phiops"


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `phiops argv`; a usage error's SystemExit becomes its code, as the shell sees it."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _expected_error(err: str, code: int, rc: int) -> None:
    assert rc == code, err
    assert err.splitlines()[-1].startswith("error: ") or err.startswith("error: "), err
    assert "Traceback" not in err


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A git-initialised project with a valid params.yaml and no registry."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's fallback git identity
    proj = tmp_path / "proj"
    proj.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    (proj / "params.yaml").write_text("registry: {artifact: phiops-model}\n")
    return proj


def _args(proj: Path, *argv: str) -> list[str]:
    return ["--root", str(proj), "--params", str(proj / "params.yaml"), *argv]


# -- the table ------------------------------------------------------------------------------------

def test_the_exit_table_is_in_the_docstring_and_help_and_matches_the_constants(capsys):
    table = {int(code): word for code, word in re.findall(r"^  (\d)  (\w+)", cli.__doc__, re.M)}
    constants = {v: k for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert set(table) == set(constants) == set(range(7))
    assert table[cli.EXIT_CONFIG] == "config" and table[cli.EXIT_DATA] == "data"
    assert table[cli.EXIT_REFUSED] == "refused" and table[cli.EXIT_ARTIFACT] == "model"
    rc, out, _ = _main(capsys, "--help")
    assert rc == 0 and cli._EXIT_TABLE.strip() in out


def test_every_phiops_error_type_has_a_documented_code():
    found = []
    # The service's errors are HTTP answers (OpenAI error bodies) or end its worker (a stored model
    # that fails its sha256 check: `phiops ask` then reports the server's exit), never a command's.
    service_only = {SRC / "serve" / name for name in ("protocol.py", "sampling.py", "checkpoint.py")}
    for path in SRC.rglob("*.py"):
        if path in service_only:
            continue
        for name in re.findall(r"^class ([A-Z]\w*(?:Error|Refused))\(", path.read_text(), re.M):
            module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
            found.append(getattr(importlib.import_module(module), name))
    assert len(found) >= 14, found
    unmapped = [t.__name__ for t in found if cli.exit_code(t.__new__(t)) is None]
    assert not unmapped, f"add these to cli.ERROR_CODES: {unmapped}"


# -- 0 and 2: version, usage ------------------------------------------------------------------------

def test_version(capsys):
    rc, out, _ = _main(capsys, "--version")
    assert rc == 0 and out == f"phiops {__version__}\n"


def test_unknown_command_is_a_usage_error(capsys):
    rc, _, err = _main(capsys, "frobnicate")
    assert rc == cli.EXIT_USAGE == 2 and "invalid choice: 'frobnicate'" in err


def test_quantize_without_method_is_a_usage_error(capsys, project):
    rc, _, err = _main(capsys, *_args(project, "stage", "quantize"))
    assert rc == cli.EXIT_USAGE and "needs --method gptq|awq" in err and "usage: phiops stage" in err
    rc, _, err = _main(capsys, *_args(project, "stage", "train", "--method", "awq"))
    assert rc == cli.EXIT_USAGE and "--method applies to stage quantize" in err


def test_global_options_after_the_command(capsys, project, tmp_path):
    missing = str(tmp_path / "missing.yaml")
    # Before the command only: that value is used (and here it is missing).
    rc, _, err = _main(capsys, "--root", str(project), "--params", missing, "registry", "history")
    _expected_error(err, cli.EXIT_CONFIG, rc)
    # After the command: it wins over the one before.
    rc, out, err = _main(capsys, "--params", missing, "registry", "history",
                         "--params", str(project / "params.yaml"), "--root", str(project), "-v")
    assert rc == 0, err
    assert "phiops-model: versions" in out
    args = cli.build_parser().parse_args(["stage", "train", "-v", "--root", "r"])
    assert args.verbose is True and args.root == "r" and args.params == "params.yaml"


# -- 3: config -----------------------------------------------------------------------------------

def test_bad_params_file_is_a_config_error(capsys, project):
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": "fast", "nope": 1}}))
    rc, _, err = _main(capsys, *_args(project, "registry", "history"))
    _expected_error(err, cli.EXIT_CONFIG, rc)
    assert "train.lr" in err and "train.nope" in err


# -- 4: data -------------------------------------------------------------------------------------

def _tokenizer_dir(path: Path) -> Path:
    """A base model dir the validate stage accepts for token counting: tokenizer.json, no weights read."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "model.safetensors").write_bytes(b"")  # resolve() checks the weights are safetensors, never loads them
    return path


def test_bad_raw_file_is_a_data_error(capsys, project, tmp_path):
    (project / "data/raw").mkdir(parents=True)
    (project / "data/raw/tickets.jsonl").write_text("")
    base = _tokenizer_dir(tmp_path / "tok")
    (project / "params.yaml").write_text(yaml.safe_dump({"model": {"base": str(base)},
                                                         "data": {"raw": "data/raw/tickets.jsonl"}}))
    rc, _, err = _main(capsys, *_args(project, "stage", "validate"))
    _expected_error(err, cli.EXIT_DATA, rc)
    assert "data/raw/tickets.jsonl: file is empty" in err


# -- 5: refused ----------------------------------------------------------------------------------

def test_promoting_an_unknown_version_is_refused(capsys, project):
    rc, _, err = _main(capsys, *_args(project, "promote", "v9.9.9", "--reason", "x", "--no-bento"))
    _expected_error(err, cli.EXIT_REFUSED, rc)
    assert "no version 'v9.9.9'" in err


def test_nothing_to_roll_back_or_show_is_refused(capsys, project):
    rc, _, err = _main(capsys, *_args(project, "rollback", "--reason", "x", "--no-bento"))
    _expected_error(err, cli.EXIT_REFUSED, rc)
    assert "no earlier production version" in err
    rc, _, err = _main(capsys, *_args(project, "registry", "show"))
    _expected_error(err, cli.EXIT_REFUSED, rc)
    rc, _, err = _main(capsys, *_args(project, "ask", "hello"))
    _expected_error(err, cli.EXIT_REFUSED, rc)


def _eval_report(proj: Path, merged: float) -> None:
    row = lambda m, size: {"task_metric": m, "perplexity": 1.5, "size_bytes": size, "n_samples": 4}  # noqa: E731
    write_json(proj / "reports/eval.json", {"metric": "json_fields", "test_rows": 4,
                                            "variants": {"base": row(0.1, 1000), "merged": row(merged, 1000)}})


def test_gate_rejection_is_refused_and_a_pass_is_zero(capsys, project):
    _eval_report(project, merged=0.2)  # below gate.min_task_metric 0.5
    rc, out, err = _main(capsys, *_args(project, "gate"))
    _expected_error(err, cli.EXIT_REFUSED, rc)
    assert "gate: REJECT" in out and "task metric 0.200 < minimum 0.500" in out
    assert yaml.safe_load((project / "reports/gate.json").read_text())["passed"] is False

    _eval_report(project, merged=0.9)
    rc, out, err = _main(capsys, *_args(project, "gate"))
    assert rc == 0 and "gate: PASS -> merged" in out, err


# -- 6: model or artifact --------------------------------------------------------------------------

def test_pickle_only_base_model_is_a_model_error(capsys, project, tmp_path):
    base = tmp_path / "pickled"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"")
    (project / "params.yaml").write_text(yaml.safe_dump({"model": {"base": str(base)}}))
    rc, _, err = _main(capsys, *_args(project, "stage", "validate"))
    _expected_error(err, cli.EXIT_ARTIFACT, rc)
    assert "no *.safetensors weights" in err and "pytorch_model.bin" in err


def test_gate_without_an_evaluation_is_an_artifact_error(capsys, project):
    rc, _, err = _main(capsys, *_args(project, "gate"))
    _expected_error(err, cli.EXIT_ARTIFACT, rc)
    assert "reports/eval.json is missing" in err


# -- 1: a bug ------------------------------------------------------------------------------------

def test_an_unexpected_error_is_not_swallowed(project, monkeypatch):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_registry", broken)  # looked up when the parser is built
    with pytest.raises(KeyError, match="a bug"):
        cli.main(_args(project, "registry", "history"))


def test_flow_entrypoint_is_prefect_yamls():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["entrypoint"] for d in deployments} == {cli.FLOW_ENTRYPOINT}


def test_run_outside_a_project_is_a_usage_error(capsys, project):
    rc, _, err = _main(capsys, *_args(project, "run"))
    assert rc == cli.EXIT_USAGE and "has no flows/retrain.py" in err


# -- phiops run: --params must be what the DVC stages read -----------------------------------------

def test_run_refuses_params_the_dvc_stages_would_not_read(project, capsys):
    (project / "flows").mkdir()
    (project / "flows/retrain.py").write_text("raise SystemExit('the flow must not even load')\n")
    other = project / "other.yaml"
    other.write_text("registry: {artifact: phiops-model}\ntrain: {max_steps: 2}\ndata: {raw: data/raw/bad.jsonl}\n")
    rc, out, err = _main(capsys, "--root", str(project), "--params", str(other), "run")
    _expected_error(err, cli.EXIT_CONFIG, rc)
    assert "train.max_steps: 2 here, params.yaml has -1" in err
    assert "data.raw: 'data/raw/bad.jsonl' here, params.yaml has 'data/raw/tickets.jsonl'" in err
    assert f"cp {other} {project / 'params.yaml'}" in err


def test_run_accepts_a_copy_of_params_yaml(project):
    from phiops import config

    copy = project / "copy.yaml"
    copy.write_text("registry:\n  artifact: phiops-model\ntrain: {max_steps: -1}\n")  # the default: same config
    assert config.require_dvc_params(project, copy).train.max_steps == -1
    assert config.require_dvc_params(project, project / "params.yaml").registry.artifact == "phiops-model"
