"""Scheduled retraining against a real Prefect server and process worker (infra/services.sh).

One server + worker for the module, requiring API auth (PREFECT_SERVER_API_AUTH_STRING). The
deployment of prefect.yaml is triggered as the cron schedule would trigger it; the tests then:
- the run suspends for approval (its process exits), an unauthenticated `phiops approve` is
  refused, an authenticated one promotes, and the resumed run redoes no stage;
- two triggers with unchanged data: one at a time (deployment concurrency limit), each ends
  "nothing changed" with no DVC stage executed;
- after a param change, two triggers at once: only one computes; SIGTERM to it ends it Crashed
  (its dvc child with it), the waiting run then resumes without redoing finished stages, and
  `phiops reject` records the rejection.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from phiops import cli
from phiops.paths import Layout, store_name
from phiops.registry import Registry

pytestmark = pytest.mark.e2e
AUTH = "phiops:e2e-secret"
POOL = "phiops-e2e"
WAIT = 900  # seconds any one wait may take before the test gives up (a hang, not a speed check)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    def __init__(self, proj: Path, env: dict[str, str]):
        self.proj, self.env = proj, env

    def sh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.proj / "infra/services.sh"), *args], cwd=self.proj, env=self.env,
                              capture_output=True, text=True, check=check, timeout=600)

    def phiops(self, *args: str, auth: bool = True) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if not auth:
            env.pop("PREFECT_API_AUTH_STRING", None)
        return subprocess.run([sys.executable, "-m", "phiops.cli", *args], cwd=self.proj, env=env,
                              capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_models, make_project):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("scheduled")
    proj = make_project(tmp, tiny_models["llama"])
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update({
        "PHIOPS_SERVICES_DIR": str(tmp / "services"), "PHIOPS_PREFECT_PORT": str(port), "PHIOPS_WORK_POOL": POOL,
        "PHIOPS_PYTHON": sys.executable, "PREFECT_SERVER_API_AUTH_STRING": AUTH,
        "BENTOML_HOME": str(tmp / "bentoml"), "PREFECT_WORKER_QUERY_SECONDS": "2",
        # The flow runs log DVC's "Running stage" lines at INFO: the tests read them back from the server.
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(proj / "src")) if p),
    })
    svc = Services(proj, env)
    try:
        svc.sh("start")
        env.update({"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_API_AUTH_STRING": AUTH})
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: AUTH}):
            yield svc
    finally:
        svc.sh("stop", check=False)


# -- helpers ----------------------------------------------------------------------------------

def _trigger() -> str:
    from prefect.deployments import run_deployment

    return str(run_deployment("retrain/scheduled", timeout=0).id)


def _run(run_id: str):
    from prefect import get_client

    with get_client(sync_client=True) as c:
        return c.read_flow_run(run_id)


def _wait(run_id: str, until, what: str):
    deadline = time.monotonic() + WAIT
    while True:
        run = _run(run_id)
        if until(run):
            return run
        if run.state and run.state.is_final() and not until(run):
            raise AssertionError(f"flow run {run_id} ended {run.state.name} ({run.state.message}) waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {run_id} still {run.state.name if run.state else None} after {WAIT}s: {what}")
        time.sleep(1.0)


def _suspended(run) -> bool:
    return run.state is not None and run.state.is_paused()


def _final(run) -> bool:
    return run.state is not None and run.state.is_final()


def _logs(run_id: str) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as c:
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
        out, offset = [], 0
        while logs:
            out += [entry.message for entry in logs]
            offset += len(logs)
            logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200,
                               offset=offset)
    return out


def _stages_run(run_id: str) -> list[str]:
    """Stages DVC executed in this run ("Running stage 'x':" lines of its log)."""
    return [m.split("'")[1] for m in _logs(run_id) if m.startswith("Running stage '")]


def _state_names(run_id: str) -> list[str]:
    from prefect import get_client

    with get_client(sync_client=True) as c:
        return [s.name for s in c.read_flow_run_states(run_id)]


def _result(run) -> dict:
    return run.state.result(raise_on_failure=True)


def _processes_of(run_id: str) -> list[int]:
    """Pids whose environment names this flow run (the engine process and its dvc/stage children)."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _wait_gone(run_id: str) -> None:
    """Until no process of this flow run is left (it exits just after reporting its state)."""
    deadline = time.monotonic() + 120
    while pids := _processes_of(run_id):
        if time.monotonic() > deadline:
            cmds = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:200] for p in pids}
            raise AssertionError(f"flow run {run_id} still has processes: {cmds}")
        time.sleep(0.5)


def _engine_pid(run_id: str) -> int:
    """The flow run's top process: the one whose parent is not itself part of the run."""
    pids = set(_processes_of(run_id))
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid not in pids:
            return pid
    raise AssertionError(f"no process of flow run {run_id}: {pids}")


# -- tests ------------------------------------------------------------------------------------

def test_deployment_has_a_cron_schedule_on_a_process_pool_with_a_worker(services):
    from prefect import get_client

    with get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name("retrain/scheduled")
        pool = c.read_work_pool(POOL)
        workers = c.read_workers_for_work_pool(POOL)
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"] and all(s.active for s in dep.schedules)
    assert dep.work_pool_name == POOL and pool.type == "process"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert workers, "no worker polls the pool"
    status = services.sh("status").stdout
    assert "server: running" in status and "worker: running" in status and "0 3 * * 1" in status


def test_run_suspends_for_approval_and_cli_approval_promotes(services):
    run_id = _trigger()
    run = _wait(run_id, _suspended, "the approval")
    assert run.state.name == "Suspended"
    # Suspended, not paused: the run's process exits (no infrastructure held while a person decides).
    _wait_gone(run_id)
    # The approval form's description carries the eval report and the gate's verdict.
    from prefect import get_client

    keyset = run.state.state_details.run_input_keyset
    with get_client(sync_client=True) as c:
        description = json.loads(c.read_flow_run_input(run_id, keyset["description"]))
    assert "Approve phiops-model v1.0.0" in description and "gate: PASS" in description and "| merged" in description

    # Without the auth string the server refuses, and nothing changes.
    denied = services.phiops("approve", run_id, "--reason", "sneaky", auth=False)
    assert denied.returncode == cli.EXIT_REFUSED, denied
    assert "HTTP 401" in denied.stderr and "PREFECT_API_AUTH_STRING" in denied.stderr
    assert _run(run_id).state.name == "Suspended"

    listed = services.phiops("approvals")
    assert run_id in listed.stdout, listed
    ok = services.phiops("approve", run_id, "--reason", "e2e: eval report reviewed", "--approver", "ana@example")
    assert ok.returncode == 0, ok.stderr
    run = _wait(run_id, _final, "completion after approval")
    assert run.state.is_completed(), run.state
    result = _result(run)
    assert result["status"] == "promoted" and result["version"] == "v1.0.0", result
    assert result["containerize"] == "phiops containerize v1.0.0"  # the offline image build (phiops.container)
    # Resumed by rerunning the flow: persisted task results stood in, DVC ran each stage once.
    stages = _stages_run(run_id)
    assert sorted(stages) == sorted(set(stages)) and "train" in stages and "evaluate" in stages, stages

    proj = services.proj
    for rel in ("data/validated/rows.jsonl", "data/processed/train.jsonl", "models/adapter/adapter_model.safetensors",
                "models/merged/model.safetensors", "models/gptq/config.json", "models/awq/config.json",
                "reports/eval.json", "reports/eval.md", "reports/gate.json", "dvc.lock"):
        assert (proj / rel).exists(), rel
    tags = subprocess.run(["git", "tag"], cwd=proj, capture_output=True, text=True).stdout.split()
    assert "phiops-model@v1.0.0" in tags and any(t.startswith("phiops-model#production") for t in tags)
    reg = Registry(Layout(proj), "phiops-model")
    prod = reg.production()
    assert prod["version"] == "v1.0.0" and prod["flow_run_id"] == run_id and prod["variant"] == result["variant"]
    assert prod["data_hash"] and prod["files"] and prod["git_rev"] and prod["params"]["train"]["max_steps"] == 2
    assert prod["approval"]["approver"] == "ana@example" and prod["approval"]["reason"] == "e2e: eval report reviewed"
    assert reg.promotions()[-1]["approver"] == "ana@example"
    # The store's names carry the project (two clones on one machine each have a v1.0.0).
    assert prod["bento"] == f"{store_name('phiops-llm', proj)}:v1.0.0"
    assert (Path(services.env["BENTOML_HOME"]) / f"bentos/{store_name('phiops-llm', proj)}/v1.0.0/bento.yaml").exists()
    # The bento's model carries the lineage /v1/models shows: version, data hash, code revision.
    model_yaml = Path(services.env["BENTOML_HOME"]) / f"models/{store_name('phiops-model', proj)}/v1.0.0/model.yaml"
    lineage = yaml.safe_load(model_yaml.read_text())["metadata"]["registry"]
    assert (lineage["version"], lineage["data_hash"], lineage["git_rev"]) == ("v1.0.0", prod["data_hash"], prod["git_rev"])
    shown = services.phiops("registry", "show").stdout
    assert "ana@example" in shown and run_id in shown and "sha256 config.json" in shown, shown


def test_unchanged_data_twice_at_once_runs_one_at_a_time_and_changes_nothing(services):
    a, b = _trigger(), _trigger()
    runs = [_wait(r, _final, "an unchanged run") for r in (a, b)]
    for run in runs:
        res = _result(run)
        assert res["status"] == "unchanged" and res["message"].startswith("nothing changed"), res
        assert _stages_run(str(run.id)) == []
        print(f"unchanged run {run.name}: {run.total_run_time.total_seconds():.1f} s in Running")
    # The deployment's concurrency limit: one ran after the other, never both at once. (Whether the
    # second was seen in AwaitingConcurrencySlot depends on when the worker polled: not asserted.)
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert second.start_time >= first.end_time, (first.end_time, second.start_time)


def test_concurrent_triggers_one_computes_sigterm_crashes_next_resumes(services):
    params = yaml.safe_load((services.proj / "params.yaml").read_text())
    params["train"]["lr"] /= 2
    (services.proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ids = [_trigger(), _trigger()]

    # Whichever gets the slot computes; SIGTERM it once train is done and a later stage runs.
    deadline = time.monotonic() + WAIT
    while True:
        running = [i for i in ids if _run(i).state.is_running()]
        if running and "merge" in _stages_run(running[0]):
            break
        assert time.monotonic() < deadline, "no run reached merge"
        time.sleep(0.5)
    first = running[0]
    (other,) = [i for i in ids if i != first]
    assert not _run(other).state.is_running() and _stages_run(other) == []  # it waits for the slot
    os.kill(_engine_pid(first), signal.SIGTERM)
    crashed = _wait(first, _final, "the crash")
    assert crashed.state.type.value == "CRASHED", crashed.state
    _wait_gone(first)  # dvc and the stage it ran went with it (their own process group)

    run = _wait(other, _suspended, "the approval of the resumed run")
    started = _stages_run(first)
    assert started[0] == "train", started  # a train param changed: nothing before train reran
    done_before = set(started[:-1])  # the last one was interrupted
    redone = _stages_run(other)
    assert "train" in done_before and not (done_before & set(redone)), (done_before, redone)
    assert "evaluate" in redone and not {"validate", "format"} & set(redone)
    # The working tree holds the new candidate: production v1 was restored from DVC at its GTO tag,
    # checked against its sha256, scored on this test split and compared row by row.
    prod_eval = json.loads((services.proj / "reports/eval_production.json").read_text())
    assert prod_eval["version"] == "v1.0.0" and prod_eval["source"] == "DVC cache at phiops-model@v1.0.0"
    gate = json.loads((services.proj / "reports/gate.json").read_text())
    assert gate["production"] == "v1.0.0" and set(gate["vs_production"]) == {"merged", "gptq", "awq"}
    assert run.start_time >= crashed.end_time  # it started only once the crashed run let go of the slot

    no = services.phiops("reject", other, "--reason", "e2e: reject path", "--approver", "bo@example")
    assert no.returncode == 0, no.stderr
    run = _wait(other, _final, "completion after rejection")
    res = _result(run)
    assert res["status"] == "refused" and res["version"] == "v2.0.0", res
    reg = Registry(Layout(services.proj), "phiops-model")
    assert reg.production()["version"] == "v1.0.0"
    decision = reg.record("v2.0.0")["approval"]
    assert decision["approved"] is False and decision["approver"] == "bo@example"
    status = subprocess.run([str(Path(sys.executable).with_name("dvc")), "status", "--json"], cwd=services.proj,
                            capture_output=True, text=True, check=True, env=services.env)
    assert json.loads(status.stdout) == {}, status.stdout  # outputs match dvc.lock: nothing half-written


def test_unanswered_suspended_approval_times_out_as_a_policy_rejection(services):
    # A new candidate (a train param changed) whose approval nobody answers within
    # approval.timeout_hours (here ~11 s): the server fails the suspended run, and the registry
    # records the rejection as the timeout policy's, never as a person's; production stays.
    params = yaml.safe_load((services.proj / "params.yaml").read_text())
    params["train"]["lr"] *= 0.75
    params.setdefault("approval", {})["timeout_hours"] = 0.003
    (services.proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_id = _trigger()
    _wait(run_id, _suspended, "the approval")
    reg = Registry(Layout(services.proj), "phiops-model")
    staged = max(reg.history(), key=lambda r: r["number"])
    assert staged["flow_run_id"] == run_id and staged["approval"].get("approved") is None
    ended = _wait(run_id, _final, "the server's pause expiration")
    assert ended.state.is_failed() and "never resumed" in (ended.state.message or ""), ended.state

    listed = services.phiops("approvals")
    assert listed.returncode == 0, listed.stderr
    assert f"{staged['version']}: rejected by policy:timeout" in listed.stdout, listed.stdout
    decision = reg.record(staged["version"])["approval"]
    assert decision["approved"] is False and decision["approver"] == "policy:timeout" and decision["policy"] is True
    assert reg.production()["version"] == "v1.0.0"
    assert services.phiops("approvals").stdout.count("rejected by") == 0  # recorded once, not again
