"""`phiops sweep`: a grid of params run as DVC experiments, ranked by the gate's metric.

``phiops sweep train.lr=1e-4,3e-4,1e-3 train.lora.r=8,16`` is six experiments. Each grid point is
checked against the config schema before anything runs (every problem listed at once). Then each
runs in a temporary copy of the repository, so the workspace, params.yaml included, is left as it
was: one after the other by default (``dvc exp run --temp -S ...``), or ``--jobs N`` at once
through DVC's queue (``dvc exp run --queue -S ...``, then ``dvc exp run --run-all --jobs N``).
One at a time does not go through the queue: its Celery worker reads a filesystem broker that
another process may be writing, and on this 2-core machine under load it died mid-sweep
("Unrecoverable error: JSONDecodeError", the race of treeverse/dvc-task#73), leaving `--run-all`
waiting for ever. DVC's stages end at `evaluate`; the gate, registration and promotion belong to the flow,
so a sweep never promotes anything.

Values use the override grammar DVC's ``-S`` itself parses (Hydra's): ``a=1,2`` is a choice,
``range(8,33,8)`` a range, ``[q_proj,v_proj]`` a list; what is checked is what DVC writes.
"""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from phiops import config, procs

# The gate's metric (phiops.gate: `task_metric`) of the model a point's params trained; the
# quantized variants are made from it. Perplexity breaks ties (lower wins), which a tiny or
# undertrained model needs: its task metric is often 0 everywhere.
METRICS_FILE = "reports/eval.json"
SORT_BY = "variants.merged.task_metric"
TIE_BREAK = "variants.merged.perplexity"


@dataclass(frozen=True)
class Result:
    """One finished experiment of the sweep."""

    name: str
    point: dict[str, str]  # key -> value as given to `-S`
    task_metric: float
    perplexity: float


def parse(specs: list[str], params: dict[str, Any], dvc_params: set[str]) -> list[dict[str, str]]:
    """The grid points of `key=v1,v2,...` specs, each checked against the config schema.

    Args:
        specs: one ``key=values`` per swept key (Hydra override grammar).
        params: params.yaml as parsed YAML, the values every point starts from.
        dvc_params: the params entries of dvc.yaml's stages (``train``, ``model.base``, ...).

    Returns:
        The points, in grid order: key -> value string, as DVC's ``-S`` takes it.

    Raises:
        config.ConfigError: every bad spec, unknown key, invalid value or key no DVC stage reads.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser, problems, axes = OverridesParser.create(), [], {}
    for spec in specs:
        try:
            (o,) = parser.parse_overrides([spec])
            if o.type != OverrideType.CHANGE or o.package is not None:
                raise HydraException("only key=value[,value...] (no +, ~ or @package)")
            sweep = o.is_sweep_override()
            values = list(o.sweep_iterator()) if sweep else [o.value()]
            strings = list(o.sweep_string_iterator()) if sweep else [o.get_value_element_as_str()]
        except HydraException as exc:
            problems.append(f"{spec}: {str(exc).splitlines()[0]}")
            continue
        key, before = o.key_or_group, len(problems)
        for value in values:  # each value alone: its problems once, not once per point
            problems += _check(params, {key: value}, problems)
        if key in axes:
            problems.append(f"{key}: given twice")
        elif len(problems) == before and not any(key == p or key.startswith(f"{p}.") for p in dvc_params):
            problems.append(f"{key}: no DVC stage reads it (dvc.yaml params), so every experiment would be the same")
        axes[key] = list(zip(strings, values))
    if not problems:  # then whole points, for the rules across keys (min_tokens <= max_tokens)
        for point in itertools.product(*axes.values()):
            problems += _check(params, {k: v for k, (_, v) in zip(axes, point)}, problems)
    if problems:
        raise config.ConfigError("sweep", problems)
    return [{k: s for k, (s, _) in zip(axes, point)} for point in itertools.product(*axes.values())]


def _check(params: dict[str, Any], overrides: dict[str, Any], known: list[str]) -> list[str]:
    """The config problems of `params` with `overrides` set, less those already in `known`."""
    data = copy.deepcopy(params)
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                return [f"{key}: {s} is a value, not a section"]
        node[leaf] = value
    try:
        config.parse(data)
    except config.ConfigError as exc:
        return [p for p in dict.fromkeys(exc.problems) if p not in known]
    return []


def dvc_params(root: Path) -> set[str]:
    """Every params entry of dvc.yaml's stages (foreach stages included)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {p for st in stages.values() for p in st.get("do", st).get("params", []) if isinstance(p, str)}


def _dvc(root: Path, *args: str, capture: bool = True) -> str:
    res = subprocess.run([procs.dvc_bin(), *args], cwd=root, env=procs.dvc_env(), text=True,
                         capture_output=capture)
    if res.returncode != 0:
        raise procs.StageError(f"dvc {' '.join(args)} failed (exit {res.returncode}): "
                               f"{(res.stderr or '').strip()[-2000:] or 'see its output above'}")
    return res.stdout


def run(root: Path, points: list[dict[str, str]], jobs: int = 1, prefix: str | None = None) -> list[Result]:
    """Run one DVC experiment per point and collect each one's gate metric.

    Args:
        root: the project root (a git + DVC repository).
        points: from :func:`parse`.
        jobs: experiments at once (above 1: DVC queue workers).
        prefix: experiment names are ``<prefix>-<n>`` (default: ``sweep-<UTC time>``).

    Returns:
        The experiments, best first (task metric, then perplexity).

    Raises:
        procs.StageError: an experiment failed (named); with ``jobs > 1``, also a DVC queue that
            already held experiments (`--run-all` would run them too).
    """
    prefix = prefix or f"sweep-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    names = {f"{prefix}-{i}": point for i, point in enumerate(points, 1)}
    # ++: sets a key params.yaml leaves at its default too (the schema checked it exists)
    args = {name: [a for k, v in point.items() for a in ("-S", f"++{k}={v}")] for name, point in names.items()}
    if jobs == 1:
        for name in names:  # each streams its log; a failure stops the sweep, named
            _dvc(root, "exp", "run", "--temp", "--name", name, *args[name], capture=False)
    else:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            waiting = [e.name or e.stash_rev[:7] for e in repo.experiments.celery_queue.iter_queued()]
        if waiting:
            raise procs.StageError(f"the DVC queue already holds {len(waiting)} experiment(s) ({', '.join(waiting)}); "
                                   "run them (`dvc exp run --run-all`) or drop them (`dvc queue remove --queued`) first")
        for name in names:
            _dvc(root, "exp", "run", "--queue", "--name", name, *args[name])
        _dvc(root, "exp", "run", "--run-all", "--jobs", str(jobs), capture=False)
    found = {rev["name"]: rev for rev in _revs(json.loads(_dvc(root, "exp", "show", "--json", "--no-pager")))}
    results, failed = [], []
    for name, point in names.items():
        try:
            variants = found[name]["data"]["metrics"][METRICS_FILE]["data"]["variants"]
            results.append(Result(name, point, variants["merged"]["task_metric"], variants["merged"]["perplexity"]))
        except (KeyError, TypeError):
            failed.append(name)
    if failed:
        raise procs.StageError(f"experiment(s) {', '.join(failed)} did not finish with {METRICS_FILE} "
                               f"(the log above; from the queue: `dvc queue logs {failed[0]}`)")
    return sorted(results, key=lambda r: (-r.task_metric, r.perplexity))


def _revs(show: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every experiment revision in `dvc exp show --json`, at any depth."""
    out = []
    for entry in show:
        for exp in entry.get("experiments") or []:
            out += [r for r in exp.get("revs", []) if r.get("name")] + _revs(exp.get("revs", []))
    return out


def table(root: Path, keys: list[str]) -> str:
    """`dvc exp show` as markdown, sorted by the gate's metric: the swept params and the metrics
    the ranking reads."""
    keep = "|".join([*(k.replace(".", r"\.") for k in keys), SORT_BY, TIE_BREAK, "eval_loss"])
    return _dvc(root, "exp", "show", "--md", "--no-pager", "--sort-by", f"{METRICS_FILE}:{SORT_BY}",
                "--sort-order", "desc", "--drop", ".*", "--keep", f"Experiment|Created|State|{keep}")


def apply(root: Path, name: str) -> None:
    """`dvc exp apply`: the experiment's params.yaml, dvc.lock and outputs into the workspace."""
    _dvc(root, "exp", "apply", name)
