"""Where each artifact lives, relative to the project root.

These are the same paths that dvc.yaml declares as deps/outs (a unit test keeps the two in
step). Layers follow the data's life: raw (immutable input) -> validated -> processed ->
models -> reports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


def store_name(name: str, root: Path) -> str:
    """`name` as the project at `root` calls its models and bentos in the BentoML store.

    ``<name>-<id>``, the id being the first 8 hex digits of the sha256 of the project's resolved
    path. The store (``~/bentoml``) belongs to the machine, while every project's registry starts
    at v1.0.0: with the bare name two clones would both claim ``phiops-model:v1.0.0`` for
    different weights. A project keeps its id while it stays where it is; moved, it builds its
    bento again under the new one.

    Args:
        name: the registry artifact (``phiops-model``) or the bento's name (``phiops-llm``).
        root: the project's root directory.

    Returns:
        e.g. ``"phiops-model-3f9a1c2e"``.
    """
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


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
