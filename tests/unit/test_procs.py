"""Process groups and DVC stages: streamed, refused data told apart, stopped for good. No model."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phiops import procs
from phiops.data import DataError

ROOT = Path(__file__).resolve().parents[2]


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """Dead: no such process, or a zombie nobody has reaped yet (it runs nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _group(script: str) -> tuple[subprocess.Popen[str], int]:
    """Start `sh -c script` leading its own group; the script prints its child's pid first."""
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_stop_group_ends_a_polite_group_with_sigterm():
    proc, child = _group("sleep 60 & echo $!; wait")
    t = time.monotonic()
    procs.stop_group(proc, grace=10.0, kill_wait=5.0)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t < 5.0  # no need to wait for SIGKILL
    assert _gone(child)


def test_stop_group_kills_a_group_that_ignores_sigterm():
    # `trap "" TERM`: the shell and its child (which inherits the ignored signal) survive SIGTERM.
    proc, child = _group('trap "" TERM; sleep 60 & echo $!; wait')
    procs.stop_group(proc, grace=0.5, kill_wait=5.0)
    assert proc.returncode == -signal.SIGKILL
    assert _gone(child)


def test_stop_group_of_a_finished_process_is_a_no_op():
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    procs.stop_group(proc, grace=0.1, kill_wait=0.1)
    assert proc.returncode == 0


DVC_YAML = """\
stages:
  hello:
    cmd: python -c "print('hello from the stage'); open('out.txt', 'w').write('x')"
    outs: [out.txt]
  boom:
    cmd: python -c "import sys; print('about to fail'); sys.exit(3)"
  validate:
    cmd: python -c "import os, sys; os.makedirs('reports', exist_ok=True); open('reports/validate.md', 'w').write('row 3 is bad'); sys.exit(4)"
    outs:
      - reports/validate.md:
          cache: false
  bar:
    cmd: python -c "import sys, time, tqdm; [time.sleep(0.01) for _ in tqdm.tqdm(range(200), file=sys.stdout)]"
  slow:
    cmd: python -c "import os, time; open('pid', 'w').write(str(os.getpid())); print('started', flush=True); time.sleep(60)"
"""


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    proj = tmp_path_factory.mktemp("dvc")
    subprocess.run([procs.dvc_bin(), "init", "--no-scm", "-q"], cwd=proj, check=True)
    (proj / "dvc.yaml").write_text(DVC_YAML)
    return proj


def test_a_stage_runs_once_then_is_up_to_date(dvc_project):
    lines: list[str] = []
    assert procs.run_dvc_stage(dvc_project, "hello", lines.append) is True
    assert "hello from the stage" in lines and all(line == line.rstrip() and line for line in lines)
    assert (dvc_project / "out.txt").read_text() == "x"
    lines.clear()
    assert procs.run_dvc_stage(dvc_project, "hello", lines.append) is False
    assert not any(line.startswith("Running stage") for line in lines)


def test_a_progress_bar_is_a_few_log_lines_not_one_per_refresh(dvc_project):
    # 2 s of a tqdm bar: at tqdm's default 0.1 s refresh ~20 lines (each a record on the Prefect
    # server); at the stage log's interval, its first and last.
    lines: list[str] = []
    assert procs.run_dvc_stage(dvc_project, "bar", lines.append) is True
    bars = [line for line in lines if "it/s]" in line or "?it/s" in line]
    assert any("200/200" in line for line in bars) and len(bars) <= 3, bars


def test_a_failed_stage_raises_a_stage_error(dvc_project):
    lines: list[str] = []
    with pytest.raises(procs.StageError, match=r"DVC stage 'boom' failed"):
        procs.run_dvc_stage(dvc_project, "boom", lines.append)
    assert "about to fail" in lines


def test_refused_data_is_told_apart_and_survives_pickling(dvc_project):
    with pytest.raises(procs.DataRefused) as info:
        procs.run_dvc_stage(dvc_project, "validate", lambda line: None)
    exc = info.value
    assert isinstance(exc, DataError) and not isinstance(exc, procs.StageError)
    assert exc.report == dvc_project / "reports/validate.md" and exc.report.read_text() == "row 3 is bad"
    # Prefect persists a failed run's exception: the report path must come back with it.
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is procs.DataRefused and again.report == exc.report and str(again) == str(exc)


def test_an_interrupted_stage_is_stopped_with_its_group(dvc_project):
    def interrupt(line: str) -> None:
        if line == "started":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        procs.run_dvc_stage(dvc_project, "slow", interrupt, grace=10.0, kill_wait=5.0)
    # The stage's own process (dvc's child), not only dvc, is gone.
    assert _gone(int((dvc_project / "pid").read_text()))


def test_the_stage_finds_executables_beside_this_interpreter(dvc_project, monkeypatch):
    # dvc runs `phiops stage ...`: with a PATH that lacks the venv it must still find it.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    (dvc_project / "dvc.yaml").write_text(DVC_YAML + "  which:\n    cmd: python -c \"import shutil; print(shutil.which('dvc'))\"\n")
    lines: list[str] = []
    procs.run_dvc_stage(dvc_project, "which", lines.append)
    assert str(Path(sys.executable).parent / "dvc") in lines
    assert os.environ["PATH"] == "/usr/bin:/bin"


PERSIST_YAML = """\
stages:
  kept:
    cmd: python stage.py kept.txt
    deps: [in.txt, stage.py]
    outs:
      - kept.txt:
          persist: true
  plain:
    cmd: python stage.py plain.txt
    deps: [in.txt, stage.py]
    outs: [plain.txt]
"""
# Like the validate stage: refuse bad input without touching the output, else replace it in one rename.
PERSIST_STAGE = """\
import os, sys
data = open("in.txt").read()
if data == "bad":
    print("refused"); sys.exit(4)
open(sys.argv[1] + ".tmp", "w").write(data)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


def test_dvc_keeps_a_persist_output_and_dvc_lock_when_its_stage_fails(tmp_path):
    # What dvc.yaml's `persist: true` on data/validated/rows.jsonl relies on, checked on DVC itself.
    subprocess.run([procs.dvc_bin(), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(PERSIST_YAML)
    (tmp_path / "stage.py").write_text(PERSIST_STAGE)
    (tmp_path / "in.txt").write_text("good rows")
    for stage in ("kept", "plain"):
        assert procs.run_dvc_stage(tmp_path, stage, lambda line: None)
    lock = (tmp_path / "dvc.lock").read_text()

    (tmp_path / "in.txt").write_text("bad")
    for stage in ("kept", "plain"):
        with pytest.raises(procs.StageError, match=rf"DVC stage '{stage}' failed \(exit \d+\): ERROR: failed to reproduce"):
            procs.run_dvc_stage(tmp_path, stage, lambda line: None)
    assert (tmp_path / "kept.txt").read_text() == "good rows"  # the last good output
    assert not (tmp_path / "plain.txt").exists()  # DVC's default: deleted before the stage ran
    assert (tmp_path / "dvc.lock").read_text() == lock  # a failed stage records nothing


def test_a_held_dvc_lock_fails_the_stage_naming_it(dvc_project):
    # Another DVC process holds the repo lock: the stage fails, and the message says so.
    from dvc.lock import make_lock

    lock = make_lock(str(dvc_project / ".dvc" / "tmp" / "lock"), tmp_dir=str(dvc_project / ".dvc" / "tmp"))
    lock.lock()
    try:
        with pytest.raises(procs.StageError, match="ERROR: Unable to acquire lock"):
            procs.run_dvc_stage(dvc_project, "hello", lambda line: None)
    finally:
        lock.unlock()


def test_the_cli_process_runs_with_rare_full_collections_and_freezes_everything_at_exit():
    # An atexit handler registered before `phiops` runs reports after the CLI's own ones: by
    # then the GC must be frozen (the interpreter's last collection walks nothing), and while the
    # command ran, full collections were the rare kind. Twice in one process changes nothing.
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('exit', gc.get_freeze_count() > 10000, flush=True))\n"
        "from phiops import cli, procs\n"
        "default = gc.get_threshold()\n"
        "for _ in range(2):\n"
        "    assert cli.main(['config', 'check', '--params', sys.argv[1]]) == 0\n"
        "junk = [[i] for i in range(20000)]\n"
        "print('during', default[2], gc.get_threshold()[2] == procs.FULL_COLLECTION_EVERY, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "params.yaml")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == ["during 10 True", "exit True"], out.stdout


def test_the_cli_process_loads_and_runs_a_model_without_importing_sklearn():
    # transformers' candidate_generator imports sklearn (and scipy.stats, pyarrow) whenever it can,
    # for assisted generation that phiops never runs: ~1.4 s of every stage process. After the
    # CLI has run, a model loads and generates without it, while sklearn stays importable and
    # transformers' own check still says it is there.
    code = (
        "import sys\n"
        "from phiops import cli\n"
        "assert cli.main(['config', 'check', '--params', sys.argv[1]]) == 0\n"
        "import torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_config(AutoConfig.for_model('llama', vocab_size=64, hidden_size=16,"
        " intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
        "out = model.generate(torch.tensor([[1, 2, 3]]), min_new_tokens=2, max_new_tokens=2, do_sample=False,"
        " pad_token_id=0)\n"
        "print('generated', out.shape[1], flush=True)\n"
        "print('sklearn loaded', 'sklearn' in sys.modules, flush=True)\n"
        "import sklearn.metrics, transformers.utils\n"
        "print('sklearn available', transformers.utils.is_sklearn_available(), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "params.yaml")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-3:] == ["generated 5", "sklearn loaded False", "sklearn available True"], out.stdout


def test_bars_that_refresh_at_every_step_are_one_line_per_interval_and_end_in_their_last_state():
    # llm-compressor's AWQ grid search: one bar per linear layer, refreshed at every step by
    # set_postfix (TQDM_MININTERVAL cannot space it). Bars of one kind (descriptions differing only
    # in numbers) share the interval; the held-back latest state comes out before the next plain line.
    out: list[str] = []
    now = [0.0]
    bars = procs._Bars(out.append, interval=10, clock=lambda: now[0])
    for layer in range(30):
        for step in range(21):
            now[0] += 0.05
            bars(f"Grid search for model.layers.{layer}.mlp.up_proj: {step * 5:3d}%|##   | {step}/20 "
                 f"[00:00<?, ?it/s, best_error=3.7e-02]\x1b[A")
    bars("Smoothing done")
    assert len(out) == 6  # 31.5 s of bars (630 lines): at 0, 10, 20 and 30 s, the last state, the plain line
    assert out[0].startswith("Grid search for model.layers.0.") and "0/20" in out[0]
    assert out[-2].startswith("Grid search for model.layers.29.") and "20/20" in out[-2]
    assert out[-1] == "Smoothing done"
    bars("Epoch 1:  50%|#####     | 1/2")  # another kind: its own first line goes out at once
    assert out[-1].startswith("Epoch 1:")
