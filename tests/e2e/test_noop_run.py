"""An unchanged run starts no stage; a changed param or raw file still runs what changed.

The retrain flow on a real DVC pipeline and Prefect's temporary server, nothing stubbed. The
pipeline is two trivial stages (a copy, and a "model" written from the rows and a param) so the
test takes seconds: what is under test is the flow's decision, "one `dvc status`, then no
`dvc repro` per stage when nothing changed", not the stages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phiops import lineage
from phiops.io import write_json, write_jsonl
from phiops.paths import Layout
from phiops.registry import Registry

pytestmark = pytest.mark.e2e
IDS = [f"row{i}" for i in range(10)]

VALIDATE = ("import os, shutil; os.makedirs('data/validated', exist_ok=True); "
            "shutil.copy('data/raw/tickets.jsonl', 'data/validated/rows.jsonl')")
MERGE = ("import os, yaml; os.makedirs('models/merged', exist_ok=True); "
         "lr = yaml.safe_load(open('params.yaml'))['train']['lr']; "
         "open('models/merged/model.safetensors', 'w').write(open('data/validated/rows.jsonl').read() + str(lr))")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _commit(proj: Path, message: str) -> None:
    _git(proj, "add", "-A")
    _git(proj, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the registry's fallback git identity
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")  # dvc
    proj = tmp_path / "proj"
    layout = Layout(proj)
    (proj / "data/raw").mkdir(parents=True)
    (proj / "data/raw/tickets.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "validate": {"cmd": f'"{sys.executable}" -c "{VALIDATE}"', "deps": ["data/raw"],
                     "outs": ["data/validated/rows.jsonl"]},
        "merge": {"cmd": f'"{sys.executable}" -c "{MERGE}"', "deps": ["data/validated/rows.jsonl"],
                  "params": ["train.lr"], "outs": ["models/merged"]}}}))
    # No production yet: a gate nobody passes ends each changed run "rejected", before any model
    # is loaded, with the stages it ran in its result.
    (proj / "params.yaml").write_text(yaml.safe_dump({
        "train": {"lr": 0.001}, "approval": {"mode": "manual", "timeout_hours": 0.001},
        "gate": {"min_task_metric": 1.0}}))
    (proj / ".gitignore").write_text("/reports/\n/.phiops/\n")
    # The evaluation the gate reads (an evaluate stage's outputs in the real chain).
    row = {"task_metric": 0.5, "perplexity": 1.5, "size_bytes": 1000, "n_samples": len(IDS)}
    write_json(layout.eval_report, {"metric": "json_fields", "test_rows": len(IDS),
                                    "variants": {v: row for v in ("base", "merged", "gptq", "awq")}})
    write_jsonl(layout.eval_samples, [{"variant": v, "id": i, "score": 0.5}
                                      for v in ("base", "merged", "gptq", "awq") for i in IDS])
    _git(proj, "init", "-q")
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=proj, check=True)
    _commit(proj, "init")
    return proj


def _run(proj: Path) -> tuple[dict, list[str]]:
    """One flow run: its result and the names of its task runs (as the Prefect server recorded them)."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from flows.retrain import retrain

    state = retrain(root=str(proj), return_state=True)
    assert state.is_completed(), state
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run_id])))
    return state.result(), [t.name for t in tasks]


def _stage_tasks(tasks: list[str]) -> list[str]:
    return [t for t in tasks if t.startswith("dvc_stage")]


def test_unchanged_run_starts_no_stage_and_a_change_runs_what_changed(project, monkeypatch):
    proj = project
    monkeypatch.chdir(proj)

    # No dvc.lock yet: every stage runs, each as one `dvc repro` task.
    res, tasks = _run(proj)
    assert res["status"] == "rejected" and res["stages_run"] == ["validate", "merge"], res
    assert len(_stage_tasks(tasks)) == 2, tasks
    _commit(proj, "first run")

    # A param only merge reads: DVC reruns merge, finds validate up to date.
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    _commit(proj, "lr")
    res, tasks = _run(proj)
    assert res["status"] == "rejected" and res["stages_run"] == ["merge"], res
    assert len(_stage_tasks(tasks)) == 2, tasks  # both went through DVC: it decides what runs
    _commit(proj, "second run")

    # New raw data: both run again.
    with (proj / "data/raw/tickets.jsonl").open("a") as f:
        f.write('{"instruction": "c", "input": "", "output": "d"}\n')
    _commit(proj, "more data")
    res, _ = _run(proj)
    assert res["stages_run"] == ["validate", "merge"], res
    _commit(proj, "third run")

    # This candidate in production, nothing changed since: "unchanged", and not one stage task
    # (no `dvc repro` process), only the one `dvc status`.
    layout = Layout(proj)
    reg = Registry(layout, "phiops-model")
    reg.register(layout.merged, {"variant": "merged", "dvc_out_md5": lineage.out_hash(layout, "models/merged")})
    reg.set_production("v1.0.0", approver="ana", reason="e2e")
    res, tasks = _run(proj)
    assert res["status"] == "unchanged" and res["stages_run"] == [] and res["production"] == "v1.0.0", res
    assert _stage_tasks(tasks) == [] and "changed_stages" in " ".join(tasks), tasks
    assert _git(proj, "status", "--porcelain") == ""

    # A deleted output is a change too: the stages go through DVC again, which restores it (from
    # its run cache: the same model, so production is still this candidate).
    (layout.merged / "model.safetensors").unlink()
    res, tasks = _run(proj)
    assert len(_stage_tasks(tasks)) == 2 and (layout.merged / "model.safetensors").exists(), (res, tasks)
    assert res["status"] == "unchanged" and _git(proj, "status", "--porcelain") == "", res
