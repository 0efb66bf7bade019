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

from phiops import card, config
from phiops.artifacts import RegistryError
from phiops.config import Params
from phiops.gate import Decision
from phiops.io import dir_manifest
from phiops.paths import Layout


class LineageError(RegistryError):
    """What produced a candidate cannot be established (dvc.lock, git or a report unreadable or
    silent): nothing is registered or promoted on a guess."""


def read_json(path: Path) -> Any:
    """A JSON report the decision reads.

    Raises:
        LineageError: missing or unparsable (named).
    """
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LineageError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc


def stage_order(root: Path) -> list[str]:
    """DVC stage names (`quantize@gptq` for foreach items) in dependency order.

    Raises:
        LineageError: DVC cannot read dvc.yaml / dvc.lock (the cause is in the message).
    """
    import networkx as nx
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph
            # DVC's graph points from a stage to what it depends on; reverse for execution order.
            return [s.addressing for s in reversed(list(nx.topological_sort(graph)))]
    except Exception as exc:  # DVC raises many kinds (parse, lock, missing file); all stop the run
        raise LineageError(f"DVC cannot read the pipeline in {root} ({type(exc).__name__}: {exc})") from exc


def changed_stages(root: Path) -> dict[str, list[Any]]:
    """What `dvc status` reports, in-process: each stage that `dvc repro` would run, and why.

    One call decides whether a run has anything to reproduce. DVC compares dvc.yaml and
    params.yaml with dvc.lock, and the workspace's deps and outs with their locked hashes (its
    state database skips files whose mtime and size are unchanged), so this sees a changed
    param, raw file or code dep, a stage missing from dvc.lock, and a deleted or edited out.
    A stage whose upstream changed is not listed yet (its deps change once the upstream runs):
    only an empty answer ("nothing to reproduce") may skip stages.

    Args:
        root: the project root holding dvc.yaml.

    Returns:
        ``{stage: [change, ...]}`` as `dvc status --json` prints it; ``{}`` when nothing changed.

    Raises:
        LineageError: DVC cannot read the pipeline or the workspace (fail closed: "could not
            tell" never reads as "nothing changed").
    """
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return dict(repo.status())
    except Exception as exc:  # DVC raises many kinds (parse, lock, missing file); all stop the run
        raise LineageError(f"DVC cannot tell what changed in {root} ({type(exc).__name__}: {exc})") from exc


def variant_dir(layout: Layout, variant: str | None) -> Path:
    if variant == "merged":
        return layout.merged
    if variant in ("gptq", "awq"):
        return layout.quantized(variant)
    raise ValueError(f"not a promotable variant: {variant!r}")


def _lock(layout: Layout) -> dict[str, Any]:
    """dvc.lock's stages; a project where no stage has run yet has none.

    Raises:
        LineageError: dvc.lock exists but cannot be read or parsed (permissions, a half-written
            or hand-edited file): "unreadable" is never "empty".
    """
    path = layout.root / "dvc.lock"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LineageError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc
    try:
        lock = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LineageError(f"{path} is not valid YAML ({exc})") from exc
    if not isinstance(lock, dict) or not isinstance(lock.get("stages", {}), dict):
        raise LineageError(f"{path} has no `stages` mapping: not a dvc.lock DVC wrote")
    return lock.get("stages") or {}


def out_hash(layout: Layout, rel_path: str) -> str | None:
    """DVC's content hash of an output (a `.dir` md5 for directories), from dvc.lock; None if not pinned."""
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


def git_rev(root: Path) -> str:
    """The commit the code ran from.

    Raises:
        LineageError: git cannot say (not a repository, no commit yet).
    """
    res = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout.strip():
        raise LineageError(f"git cannot name the commit of {root}: {res.stderr.strip() or 'no output'}")
    return res.stdout.strip()


def check_params_ran(layout: Layout, cfg: Params) -> None:
    """Check that the params about to be recorded are the ones every DVC stage ran with.

    dvc.yaml's `params:` name no file, so DVC's stages read the project's params.yaml, and
    dvc.lock records, per stage, each value as it was when the stage ran. The record holds
    `cfg`: it must be params.yaml's resolved config, and params.yaml must still hold the
    values dvc.lock says ran.

    Raises:
        LineageError: params.yaml differs from `cfg`, or a stage ran with another value than
            params.yaml holds now (each key named), or dvc.lock names another params file.
    """
    path = layout.root / config.DVC_PARAMS
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        now = config.parse(raw, str(path))
    except (OSError, yaml.YAMLError, config.ConfigError) as exc:
        raise LineageError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc
    if now.dump() != cfg.dump():
        diff = config.differences(cfg.dump(), now.dump())
        raise LineageError(f"{path} is not the params this run loaded ({'; '.join(diff[:10])}): "
                           "the DVC stages read params.yaml, so the record would not say what ran")
    differ = []
    for stage, entry in _lock(layout).items():
        for fname, values in (entry.get("params") or {}).items():
            if (layout.root / fname).resolve() != path.resolve():
                raise LineageError(f"dvc.lock: stage {stage} read params from {fname}, not {config.DVC_PARAMS}")
            for key, value in values.items():
                held = _dotted(raw, key)
                if held != value:
                    differ.append(f"{stage}: {key} ran with {value!r}, params.yaml holds {'nothing' if held is _MISSING else repr(held)}")
    if differ:
        raise LineageError(
            "dvc.lock does not match params.yaml, the stages ran with other params ("
            + "; ".join(differ[:10]) + (f"; and {len(differ) - 10} more" if len(differ) > 10 else "")
            + "): the registry would record settings that did not run")


_MISSING = object()


def _dotted(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def collect(layout: Layout, cfg: Params, decision: Decision, approval: dict[str, Any],
            flow_run_id: str | None) -> dict[str, Any]:
    """Everything a registry record says about where a version came from.

    Args:
        layout: the project.
        cfg: the params the flow loaded (recorded).
        decision: the gate's decision (its variant is the candidate).
        approval: the decision on it so far.
        flow_run_id: the flow run registering it.

    Raises:
        LineageError: the candidate's files (or the adapter and merged model it came from)
            are not pinned in dvc.lock, the data hash, the git commit or a report (eval,
            validate, train) cannot be read, or the stages ran with other params than
            `cfg`'s (:func:`check_params_ran`).
    """
    rel = str(variant_dir(layout, decision.variant).relative_to(layout.root))
    md5 = out_hash(layout, rel)
    if md5 is None:
        raise LineageError(f"dvc.lock pins no {rel}: the candidate's files are not what a DVC stage produced")
    data = data_hash(layout, cfg)
    if data is None:
        raise LineageError(f"dvc.lock records no hash for {cfg.data.raw} under the validate stage's deps")
    check_params_ran(layout, cfg)
    evals = read_json(layout.eval_report)
    validated, trained = read_json(layout.validate_report), read_json(layout.train_report)
    return {
        "variant": decision.variant,
        "dvc_out_md5": md5,
        "data_hash": data,
        "git_rev": git_rev(layout.root),
        "params": cfg.dump(),
        "metrics": evals["variants"][decision.variant],
        "eval": evals,
        "gate": asdict(decision),
        "approval": approval,
        "flow_run_id": flow_run_id,
        # What the model card says about the data and the run, kept with the version: the
        # working tree's reports belong to whichever run came last.
        "data": {k: validated[k] for k in card.DATA_KEYS if k in validated},
        "train": {k: trained[k] for k in card.TRAIN_KEYS if k in trained},
        "components": components(layout),
    }


# What a registered version was made from, beside the variant it serves: an export of the
# adapter or the unquantized merged model needs them, checked like the served files.
COMPONENTS = ("adapter", "merged")


def components(layout: Layout) -> dict[str, dict[str, Any]]:
    """The adapter and merged model this run produced: path, DVC hash and sha256 of every file.

    Raises:
        LineageError: one of them is not pinned in dvc.lock or is missing from the working tree.
    """
    out = {}
    for name in COMPONENTS:
        path = getattr(layout, name)
        rel = str(path.relative_to(layout.root))
        md5 = out_hash(layout, rel)
        if md5 is None or not path.is_dir():
            raise LineageError(f"{rel} is {'not pinned in dvc.lock' if md5 is None else 'missing'}: "
                               "a version records the adapter and merged model it came from")
        out[name] = {"model_path": rel, "dvc_out_md5": md5, "files": dir_manifest(path)}
    return out


def same_candidate(layout: Layout, record: dict[str, Any]) -> bool:
    """Is the production record the model the current dvc.lock points at?

    Only a hash on both sides counts: a record or a dvc.lock without one is "not the same"
    (so the candidate is evaluated and gated), never "the same by two unknowns".
    """
    rel = record.get("model_path")
    if rel is None or not record.get("dvc_out_md5"):
        return False
    return record["dvc_out_md5"] == out_hash(layout, rel)
