"""Live training metrics: dvclive files written at every logging step, read back while training runs.

The train stage's callback (:func:`callback`) writes dvclive's layout under `reports/train_live/`:
`plots/metrics/{train,eval}/<name>.tsv` (one row per logged step) and `metrics.json` (the latest
values). dvc.yaml declares both as the train stage's plots and metrics, so they show in
`dvc plots show` and `dvc exp show`. dvclive writes nothing else: no dvc.yaml of its own
(`dvcyaml=None`) and no experiment of its own (`save_dvc_exp=False`); DVC records the stage.

:func:`read` and :func:`markdown` read the TSVs back for a table; the flow publishes it as a
Prefect artifact while the stage runs. Nothing here imports Prefect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Trainer's log keys -> the dvclive metric they become. tokens_per_s and peak_memory_bytes are
# ours: the callback adds them to Trainer's log record, so a checkpoint keeps them for a resume.
TRAIN = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
         "tokens_per_s": "train/tokens_per_s", "peak_memory_bytes": "train/peak_memory_bytes"}
EVAL = {"eval_loss": "eval/loss"}


def callback(directory: Path, memory: Callable[[], int]) -> Any:
    """A `TrainerCallback` that logs every logging step of rank 0 to dvclive under `directory`.

    On a resumed run the directory starts again from the checkpoint's log history (restored by
    Trainer before `on_train_begin`), so the curve holds the whole run once, without the steps
    of the crashed process that came after its last checkpoint.

    Args:
        directory: the dvclive directory (`Layout.train_live`).
        memory: returns the peak memory in bytes so far (the same kind `reports/train.json` has).

    Returns:
        The callback; its `seconds` attribute is the time spent in dvclive (its overhead).
    """
    from dvclive import Live
    from transformers import TrainerCallback

    class _Live(TrainerCallback):
        def __init__(self) -> None:
            self.live: Live | None = None
            self.seconds = 0.0
            self._eval_step = -1

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            t = time.perf_counter()
            # resume=False empties the directory: what a resumed run keeps comes from its history.
            self.live = Live(str(directory), save_dvc_exp=False, dvcyaml=None)
            for record in state.log_history:
                self._write(record)
            self._t, self._tokens = time.time(), state.num_input_tokens_seen
            self.seconds += time.perf_counter() - t

        def on_log(self, args, state, control, logs=None, **kw):
            if self.live is None or not logs:
                return
            t = time.perf_counter()
            record = state.log_history[-1]  # what Trainer just appended for these logs
            if "loss" in record:
                now = time.time()
                record["tokens_per_s"] = round((state.num_input_tokens_seen - self._tokens) / max(now - self._t, 1e-9), 1)
                record["peak_memory_bytes"] = memory()
                self._t, self._tokens = now, state.num_input_tokens_seen
            self._write(record)
            self.seconds += time.perf_counter() - t

        def _write(self, record: dict[str, Any]) -> None:
            self.live.step = record["step"]
            names = dict(TRAIN) if "loss" in record else {}
            # An eval that ends training on an eval step is logged twice by Trainer (the
            # periodic one, then trainer.evaluate()): one point per step.
            if "eval_loss" in record and record["step"] != self._eval_step:
                names |= EVAL
                self._eval_step = record["step"]
            for key, name in names.items():
                if key in record:
                    self.live.log_metric(name, record[key])
            if names:
                self.live.make_summary()

    return _Live()


def read(directory: Path) -> list[dict[str, Any]]:
    """Every logged step so far, one dict per step: {"step": n, "train/loss": x, ...}.

    Safe while the stage is still writing: dvclive appends rows, and a row without its line
    end yet is left for the next read.

    Args:
        directory: the dvclive directory (`Layout.train_live`).

    Returns:
        Rows sorted by step; a metric not logged at a step is absent from its row.
    """
    rows: dict[int, dict[str, Any]] = {}
    root = directory / "plots" / "metrics"
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        text = tsv.read_text(encoding="utf-8")
        for line in text[: text.rfind("\n") + 1].splitlines()[1:]:  # header first, then complete rows
            step, value = line.split("\t")[-2:]
            rows.setdefault(int(step), {"step": int(step)})[name] = float(value)
    return [rows[s] for s in sorted(rows)]


# (metric, column, format, scale) of the live table.
COLUMNS = (("train/loss", "loss", "{:.4f}", 1), ("train/learning_rate", "lr", "{:.2e}", 1),
           ("train/grad_norm", "grad norm", "{:.3f}", 1), ("train/tokens_per_s", "tokens/s", "{:.0f}", 1),
           ("train/peak_memory_bytes", "peak memory MiB", "{:.0f}", 2**-20), ("eval/loss", "eval loss", "{:.4f}", 1))


def markdown(rows: list[dict[str, Any]], title: str = "Training, live") -> str:
    """The rows of :func:`read` as a markdown table, newest step last."""
    head = ["step", *(label for _, label, _, _ in COLUMNS)]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["step"]), *(fmt.format(r[k] * scale) if k in r else "" for k, _, fmt, scale in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
