"""Two `phiops run` in one checkout at once: the second refuses, and the state stays consistent.

The real flow, DVC and registry run on a project whose two DVC stages are stand-ins (no model):
`evaluate` writes a candidate and its scores, and waits for a go-ahead so that a second run can
be started while the first one holds the checkout. The bento build is stubbed (its own tests
cover it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from phiops import cli, procs
from phiops.paths import Layout
from phiops.registry import Registry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

DVC_YAML = """\
stages:
  validate:
    cmd: python stage.py validate
    deps: [data/raw, stage.py]
    params: [data.raw]
    outs: [data/validated/rows.jsonl]
  evaluate:
    cmd: python stage.py evaluate
    deps: [data/validated/rows.jsonl, stage.py]
    params: [gate]
    outs:
      - models/adapter
      - models/merged
      - reports/eval_samples.jsonl:
          cache: false
    metrics:
      - reports/eval.json:
          cache: false
"""

STAGE = """\
import json, os, sys, time
from pathlib import Path
if sys.argv[1] == "validate":
    os.makedirs("data/validated", exist_ok=True)
    Path("data/validated/rows.jsonl").write_text(Path("data/raw/tickets.jsonl").read_text())
    os.makedirs("reports", exist_ok=True)  # what the model card reads
    Path("reports/validate.json").write_text(json.dumps({"rows_in": 1, "accepted": 1, "rejected": 0}))
else:
    if Path("hold").exists():  # the test lets this stage finish once the second run was tried
        Path("started").write_text("")
        while not Path("go").exists():
            time.sleep(0.1)
    for out in ("models/adapter", "models/merged"):  # a version records the adapter it came from
        os.makedirs(out, exist_ok=True)
        Path(out, "model.safetensors").write_bytes(b"candidate weights")
    ids = [f"row{i}" for i in range(20)]
    row = lambda m: {"task_metric": m, "perplexity": 1.5, "size_bytes": 1000, "n_samples": 20}
    os.makedirs("reports", exist_ok=True)
    Path("reports/train.json").write_text(json.dumps({"steps": 1}))
    Path("reports/eval.json").write_text(json.dumps({"metric": "json_fields", "test_rows": 20,
                                                     "variants": {"base": row(0.1), "merged": row(0.9)}}))
    Path("reports/eval_samples.jsonl").write_text("".join(
        json.dumps({"variant": v, "id": i, "score": float(k < (2 if v == "base" else 18))}) + "\\n"
        for v in ("base", "merged") for k, i in enumerate(ids)))
"""

# `phiops run` with the bento build stubbed: deploy.build_bento is looked up when the flow calls it.
DRIVER = """
import sys
from phiops import cli, deploy
deploy.build_bento = lambda layout, cfg, record, **kw: {
    "bento": f"phiops-llm:{record['version']}", "model": "stub", "source": "stub", "containerize": "stub"}
sys.exit(cli.main(["--root", sys.argv[1], "run"]))
"""


def _git(proj: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=proj, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def project(tmp_path):
    proj = tmp_path / "proj"
    (proj / "flows").mkdir(parents=True)
    shutil.copy(ROOT / "flows/retrain.py", proj / "flows/retrain.py")
    (proj / "data/raw").mkdir(parents=True)
    (proj / "data/raw/tickets.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    (proj / "stage.py").write_text(STAGE)
    (proj / "dvc.yaml").write_text(DVC_YAML)
    (proj / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    # The default config (embedded model: auto approval is allowed) and a gate this candidate passes.
    (proj / "params.yaml").write_text(yaml.safe_dump({"data": {"raw": "data/raw/tickets.jsonl"},
                                                      "approval": {"mode": "auto"},
                                                      "gate": {"bootstrap_samples": 200}}))
    _git(proj, "init", "-q")
    subprocess.run([procs.dvc_bin(), "init", "-q"], cwd=proj, check=True)
    _git(proj, "add", "-A")
    _git(proj, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return proj


def _env(tmp_path: Path, name: str) -> dict[str, str]:
    # Each run its own Prefect home (its own temporary server and database), as two shells would have.
    home = tmp_path / f"prefect-{name}"
    # A fresh database migrates on first start: slow on a loaded 2-core machine.
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": "", "HOME": str(tmp_path),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_a_second_run_in_the_same_checkout_refuses_and_state_stays_consistent(project, tmp_path):
    proj = project
    (proj / "hold").write_text("")  # the stage waits; removed before the git status check below
    # Its own process group: if the test fails, the run and its Prefect server are stopped together.
    first = subprocess.Popen([sys.executable, "-c", DRIVER, str(proj)], cwd=proj, env=_env(tmp_path, "a"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 1500  # Prefect's temporary server starts slowly on a loaded machine
        while not (proj / "started").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "the first run never reached its evaluate stage"
            time.sleep(0.2)

        second = subprocess.run([sys.executable, "-m", "phiops.cli", "--root", str(proj), "run"], cwd=proj,
                                env=_env(tmp_path, "b"), capture_output=True, text=True, timeout=600)
        assert second.returncode == cli.EXIT_REFUSED, second.stderr[-3000:]
        err = second.stderr
        assert "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: flow run ") and "holds .phiops/run.lock" in last, last
        assert f"(pid {first.pid}, since " in last
    finally:
        (proj / "go").write_text("")
        try:
            out, err = first.communicate(timeout=1500)
        except BaseException:
            procs.stop_group(first, grace=10)
            raise
    assert first.returncode == 0, err[-3000:]
    result = json.loads(out[out.index("{"):])
    assert result["status"] == "promoted" and result["version"] == "v1.0.0", result

    for f in ("hold", "started", "go"):
        (proj / f).unlink()
    # One version, in production, registered with the dvc.lock that produced it; nothing left
    # uncommitted; DVC finds every stage up to date with what the working tree holds.
    reg = Registry(Layout(proj), "phiops-model")
    assert [r["version"] for r in reg.history()] == ["v1.0.0"]
    assert reg.production()["version"] == "v1.0.0"
    assert _git(proj, "status", "--porcelain") == ""
    assert _git(proj, "show", "phiops-model@v1.0.0:dvc.lock") == (proj / "dvc.lock").read_text().strip()
    status = subprocess.run([procs.dvc_bin(), "status"], cwd=proj, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout

