"""Lineage of a candidate: what data, params, code and decisions produced it.

Read from DVC's own records (dvc.yaml for the stage order, dvc.lock for content hashes), so
there is one source of truth for what changed.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from phiops.config import Params
from phiops.gate import Decision
from phiops.paths import Layout


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def stage_order(root: Path) -> list[str]:
    """DVC stage names (`quantize@gptq` for foreach items) in dependency order."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        # DVC's graph points from a stage to what it depends on; reverse for execution order.
        return [s.addressing for s in reversed(list(nx.topological_sort(graph)))]


def variant_dir(layout: Layout, variant: str | None) -> Path:
    if variant == "merged":
        return layout.merged
    if variant in ("gptq", "awq"):
        return layout.quantized(variant)
    raise ValueError(f"not a promotable variant: {variant!r}")


def _lock(layout: Layout) -> dict[str, Any]:
    path = layout.root / "dvc.lock"
    return yaml.safe_load(path.read_text())["stages"] if path.exists() else {}


def out_hash(layout: Layout, rel_path: str) -> str | None:
    """DVC's content hash of an output (a `.dir` md5 for directories), from dvc.lock."""
    for stage in _lock(layout).values():
        for out in stage.get("outs", []):
            if out["path"] == rel_path:
                return out.get("md5") or out.get("hash")
    return None


def data_hash(layout: Layout, cfg: Params) -> str | None:
    """The raw data's content hash as DVC recorded it for the validate stage.

    That is the md5 of the dependency holding ``data.raw``: the file itself, or the directory
    DVC tracks (``data/raw``, an ``.dir`` hash over every file in it, ``data.test`` included).
    """
    raw = Path(cfg.data.raw)
    for dep in _lock(layout).get("validate", {}).get("deps", []):
        if raw.is_relative_to(dep["path"]):  # the file itself, or a directory holding it
            return dep.get("md5")
    return None


def git_rev(root: Path) -> str | None:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return res.stdout.strip() or None


def collect(layout: Layout, cfg: Params, decision: Decision, approval: dict[str, Any], flow_run_id: str | None) -> dict[str, Any]:
    """Everything a registry record says about where a version came from."""
    rel = str(variant_dir(layout, decision.variant).relative_to(layout.root))
    evals = read_json(layout.eval_report)
    return {
        "variant": decision.variant,
        "dvc_out_md5": out_hash(layout, rel),
        "data_hash": data_hash(layout, cfg),
        "git_rev": git_rev(layout.root),
        "params": cfg.dump(),
        "metrics": evals["variants"][decision.variant],
        "eval": evals,
        "gate": asdict(decision),
        "approval": approval,
        "flow_run_id": flow_run_id,
    }


def same_candidate(layout: Layout, record: dict[str, Any]) -> bool:
    """Is the production record the model the current dvc.lock points at?"""
    rel = record.get("model_path")
    return rel is not None and record.get("dvc_out_md5") == out_hash(layout, rel)
