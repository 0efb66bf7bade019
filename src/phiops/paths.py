"""Where each artifact lives, relative to the project root.

These are the same paths that dvc.yaml declares as deps/outs (a unit test keeps the two in
step). Layers follow the data's life: raw (immutable input) -> validated -> processed ->
models -> reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def _p(self, rel: str) -> Path:
        return self.root / rel

    # validate
    @property
    def validated(self) -> Path:
        return self._p("data/validated/rows.jsonl")

    @property
    def quarantine(self) -> Path:
        return self._p("data/quarantine")

    @property
    def validate_report(self) -> Path:
        return self._p("reports/validate.json")

    @property
    def validate_markdown(self) -> Path:
        return self._p("reports/validate.md")

    @property
    def data_docs(self) -> Path:
        return self._p("reports/data_docs")

    # format
    @property
    def processed(self) -> Path:
        return self._p("data/processed")

    @property
    def train_split(self) -> Path:
        return self.processed / "train.jsonl"

    @property
    def test_split(self) -> Path:
        return self.processed / "test.jsonl"

    @property
    def format_report(self) -> Path:
        return self._p("reports/format.json")

    @property
    def format_lengths(self) -> Path:
        return self._p("reports/format_lengths.csv")

    # train
    @property
    def adapter(self) -> Path:
        return self._p("models/adapter")

    @property
    def checkpoints(self) -> Path:
        return self._p("models/checkpoints")

    @property
    def train_report(self) -> Path:
        return self._p("reports/train.json")

    @property
    def train_live(self) -> Path:
        # dvclive's directory (phiops.live): the curves as they are logged, and the latest values.
        return self._p("reports/train_live")

    @property
    def train_live_metrics(self) -> Path:
        return self.train_live / "metrics.json"

    @property
    def train_live_plots(self) -> Path:
        return self.train_live / "plots" / "metrics"

    # merge
    @property
    def merged(self) -> Path:
        return self._p("models/merged")

    @property
    def merge_report(self) -> Path:
        return self._p("reports/merge.json")

    # quantize
    def quantized(self, method: str) -> Path:
        return self._p(f"models/{method}")

    def quantize_report(self, method: str) -> Path:
        return self._p(f"reports/quantize_{method}.json")

    # evaluate
    @property
    def eval_report(self) -> Path:
        return self._p("reports/eval.json")

    @property
    def eval_markdown(self) -> Path:
        return self._p("reports/eval.md")

    @property
    def eval_samples(self) -> Path:
        return self._p("reports/eval_samples.jsonl")

    @property
    def eval_table(self) -> Path:
        return self._p("reports/eval_table.csv")

    @property
    def eval_plots(self) -> Path:
        return self._p("reports/plots")

    def eval_plot(self, name: str) -> Path:
        return self.eval_plots / f"eval_{name}.png"

    @property
    def eval_production(self) -> Path:
        # Outside DVC like the gate: production is registry state, not a content-hashed input.
        return self._p("reports/eval_production.json")

    # gate / registry / bento (outside DVC: promotion is never cached)
    @property
    def gate_report(self) -> Path:
        return self._p("reports/gate.json")

    @property
    def registry(self) -> Path:
        return self._p("registry")
