"""Child processes: run one DVC stage, and stop a process group for good.

A DVC stage runs `phiops stage ...` under `dvc repro`, two processes deep. Each run gets its own
process group so that stopping the run (SIGTERM from a worker, a cancel, Ctrl-C) stops dvc *and*
the stage it runs, instead of leaving an orphan writing outputs nobody records.
"""

from __future__ import annotations

import atexit
import gc
import importlib.abc
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phiops.data import DataError
from phiops.paths import Layout

GRACE_S = 30.0  # a stage stopped mid-write gets this long to remove its temporary files
KILL_WAIT_S = 10.0  # after SIGKILL the kernel only has to reap; longer means something is stuck


# CPython's cyclic GC in a process that imports torch and transformers (~750,000 objects that live
# as long as the process). With the default thresholds (700, 10, 10), a full collection runs each
# time the long-lived heap has grown by a quarter, so importing them walks the whole heap about a
# dozen times, and the interpreter walks it again at exit. On the 2-core Xeon, py-spy put ~40 % of
# a stage process's import-and-exit time in gc_collect_main; bench/process_gc.py: 11.5 s -> 7.9 s
# (1.46x) for a process that imports the stack and exits.
FULL_COLLECTION_EVERY = 100  # second-generation collections between full ones (CPython: 10)


def lean_gc() -> None:
    """Tune the cyclic GC for a short-lived process that imports the ML stack (the `phiops` CLI).

    Full collections run at most every 100th second-generation collection instead of every 10th
    (young objects are collected as before), and at exit every object is frozen first, so the
    interpreter's last collection has nothing to walk: the OS takes the memory back anyway.
    Finalizers still run: atexit handlers (logging's flush, ``weakref.finalize``, temporary
    directories) run before the freeze, which is registered first and so runs last.
    """
    gen0, gen1, full = gc.get_threshold()
    if full == FULL_COLLECTION_EVERY:
        return  # done already (tests call `cli.main` many times in one process)
    gc.set_threshold(gen0, gen1, FULL_COLLECTION_EVERY)
    atexit.register(gc.freeze)


# transformers 5.17 imports scikit-learn (and with it scipy) in every process that loads a model or
# a tokenizer: transformers.generation.candidate_generator takes sklearn.metrics.roc_curve when
# `is_sklearn_available()`, for assisted generation's adaptive confidence threshold, which phiops
# never uses, and has no switch for it. 2-core Xeon, bench/process_sklearn.py, medians of 16
# alternating rounds: a process importing torch, peft and transformers and building a model 11.0 s
# -> 10.3 s (peft loads scipy itself), one loading a tokenizer class 9.1 s -> 6.6 s (sklearn also
# pulls in scipy.stats and pyarrow).
_SKLEARN_USER = "transformers.generation.candidate_generator"


class _NoSklearnForTransformers(importlib.abc.MetaPathFinder):
    """Lets candidate_generator see sklearn as absent while it is imported, nothing else."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _SKLEARN_USER:
            return None
        sys.meta_path.remove(self)  # once; the real finders find the module
        spec = importlib.util.find_spec(name)
        utils = sys.modules.get("transformers.utils")
        real = getattr(utils, "is_sklearn_available", None)
        if spec is None or spec.loader is None or real is None:
            return spec  # transformers changed: import as it is (sklearn included)
        exec_module = spec.loader.exec_module

        def exec_without_sklearn(module: Any) -> None:
            utils.is_sklearn_available = lambda: False  # read by its `from ..utils import`
            try:
                exec_module(module)
            finally:
                utils.is_sklearn_available = real  # every other module keeps the real check

        spec.loader.exec_module = exec_without_sklearn
        return spec


def skip_sklearn() -> None:
    """Keep transformers from importing scikit-learn in this process (the `phiops` CLI).

    Costs nothing until transformers' candidate_generator is imported, and nothing changes
    when it was imported already or transformers no longer has that check. sklearn stays
    importable: only that module sees it as absent.
    """
    if _SKLEARN_USER not in sys.modules and not any(isinstance(f, _NoSklearnForTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoSklearnForTransformers())


class StageError(RuntimeError):
    """A DVC stage failed; its own log (streamed before this) says why."""


class DataRefused(DataError):
    """The validate stage refused the data; nothing downstream may run.

    Attributes:
        report: the row-level markdown report the stage wrote before it exited.
    """

    def __init__(self, message: str, report: Path):
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple[type, tuple[str, Path]]:
        # Prefect persists a failed run's exception; the default (cls, args) would lose `report`.
        return type(self), (str(self), self.report)


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S, kill_wait: float = KILL_WAIT_S) -> None:
    """End `proc`'s process group: SIGTERM, then SIGKILL if it is still there after `grace` s.

    Args:
        proc: a process started with ``start_new_session=True`` (it leads its own group).
        grace: seconds between SIGTERM and SIGKILL.
        kill_wait: seconds to wait for the group leader to be reaped after SIGKILL.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:  # the group is already gone
            return
        except subprocess.TimeoutExpired:
            continue


def dvc_bin() -> str:
    """The `dvc` beside this interpreter: the venv's, even when the venv is not activated."""
    return str(Path(sys.executable).with_name("dvc"))


def dvc_env() -> dict[str, str]:
    """The environment for a `dvc` child: its stages run `phiops stage ...`, found beside this
    interpreter even if the venv is not activated; their logs unbuffered, so lines stream."""
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


PROGRESS_INTERVAL_S = 10  # seconds between a progress bar's lines in a stage's log
REFUSAL_ROWS = 5  # rows a refusal's message names; the report holds the rest
# A tqdm line: "<desc>: 35%|███▌      | 7/20 [...]" (the description may be empty).
_BAR = re.compile(r"^(?P<desc>.*?):?\s*\d{1,3}%\|[^|]*\|\s*\d+/\d+")


class _Bars:
    """At most one line per PROGRESS_INTERVAL_S of each kind of progress bar, its latest state kept.

    TQDM_MININTERVAL spaces a bar's refreshes, but a bar that calls ``set_postfix`` refreshes at
    every call: llm-compressor's AWQ grid search does, one bar per linear layer ("Grid search for
    model.layers.9.mlp.up_proj"): ~2,300 lines in the embedded demo's 3.8 min AWQ stage. Bars whose
    descriptions differ only in numbers are one kind; a held-back line is let out (as the bar's
    latest state) before the next line that is not a bar, and at the end.
    """

    def __init__(self, emit: Callable[[str], None], interval: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.interval, self.clock = emit, interval, clock
        self.last: dict[str, float] = {}  # kind -> when its last line went out
        self.held: dict[str, str] = {}  # kind -> its latest line not let out

    def __call__(self, line: str) -> None:
        m = _BAR.match(line)
        if m is None:
            self.flush()
            self.emit(line)
            return
        kind, now = re.sub(r"\d+", "N", m.group("desc")), self.clock()
        if now - self.last.get(kind, -self.interval) >= self.interval:
            self.last[kind] = now
            self.held.pop(kind, None)
            self.emit(line)
        else:
            self.held[kind] = line

    def flush(self) -> None:
        for line in self.held.values():
            self.emit(line)
        self.held.clear()


def refusal_message(layout: Layout) -> str:
    """What the validate stage refused, from the report it wrote: the rule, the first rows
    (``file:line[:column]: field: what``) and where every row is; the log that carried the
    stage's own message may not be shown (a Prefect logging level, a UI that was not open)."""
    head = "the data failed validation"
    try:
        rep = json.loads(layout.validate_report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{head}; every rejected row and rule is in {layout.validate_markdown}"
    problems = [str(p) for p in rep.get("problems") or []]
    total = int(rep.get("problems_total", len(problems)))
    lines = [f"{head}: {rep.get('failure')}" if rep.get("failure") else head]
    lines += [f"  - {p}" for p in problems[:REFUSAL_ROWS]]
    if total > REFUSAL_ROWS:
        lines.append(f"  ... and {total - REFUSAL_ROWS} more")
    lines.append(f"every rejected row and rule is in {layout.validate_markdown} (the rows in data/quarantine/)")
    return "\n".join(lines)


def run_dvc_stage(root: Path, stage: str, on_line: Callable[[str], None], *,
                  grace: float = GRACE_S, kill_wait: float = KILL_WAIT_S) -> bool:
    """Reproduce one DVC stage (`dvc repro --single-item`), handing each log line to `on_line`.

    DVC stays the one caching authority: a stage whose deps and params are unchanged does
    nothing. If anything interrupts the streaming (a signal turned into an exception, Ctrl-C),
    the stage's whole process group is stopped before the exception goes on.

    Args:
        root: the project root holding dvc.yaml.
        stage: a DVC stage name (`quantize@gptq` for a foreach item).
        on_line: called with each non-empty output line, as it arrives.
        grace: seconds an interrupted stage gets between SIGTERM and SIGKILL.
        kill_wait: seconds to wait for it to be reaped after SIGKILL.

    Returns:
        True if the stage executed, False if DVC found it unchanged.

    Raises:
        DataRefused: the validate stage failed and left its row-level report.
        StageError: any other failure of the stage (or of dvc itself).
    """
    env = dvc_env()
    # Every line becomes a log record sent to the Prefect server: tqdm's default 0.1 s refresh made
    # the embedded demo's AWQ stage alone ~4,000 records (a bar per layer's grid search), and the
    # server's share of the 2 CPUs went with them. A bar now prints at its start, every
    # PROGRESS_INTERVAL_S and at its end (the user's own TQDM_MININTERVAL wins).
    env.setdefault("TQDM_MININTERVAL", str(PROGRESS_INTERVAL_S))
    proc = subprocess.Popen(
        [dvc_bin(), "repro", "--single-item", stage],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    ran = False
    errors: list[str] = []  # DVC's own `ERROR: ...` lines: the cause, for the message
    bars = _Bars(on_line)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                bars(line)
            ran |= line.startswith("Running stage")
            if line.startswith("ERROR"):
                errors.append(line)
    except BaseException:  # SIGTERM (Prefect raises TerminationSignal here), cancel, Ctrl-C
        stop_group(proc, grace, kill_wait)
        raise
    finally:
        bars.flush()
    if proc.wait() != 0:
        # reports/validate.md is an out of the validate stage: DVC deletes it before running the
        # stage, so if it exists now, this run's validation wrote it, then refused the data.
        layout = Layout(root)
        report = layout.validate_markdown
        if stage == "validate" and report.exists():
            raise DataRefused(refusal_message(layout), report)
        cause = f": {' / '.join(errors[-3:])}" if errors else ""
        raise StageError(f"DVC stage {stage!r} failed (exit {proc.returncode}){cause}; see the log above")
    return ran
