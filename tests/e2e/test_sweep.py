"""`phiops sweep` on a tiny random model: DVC experiments from the queue, ranked, the best applied.

Real DVC (queue, temporary copies, cache), real stages; nothing stubbed.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from phiops import cli, procs, sweep

pytestmark = pytest.mark.e2e


def test_two_point_sweep_gives_two_experiments_applies_the_best_and_promotes_nothing(
        tiny_models, make_project, tmp_path, capfd):
    proj = make_project(tmp_path, tiny_models["llama"])
    git = lambda *a: subprocess.run(["git", *a], cwd=proj, check=True, capture_output=True, text=True).stdout  # noqa: E731
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["evaluate"]["embedding_similarity"] = False  # seconds per experiment; not what is under test
    params["quantize"]["calibration_samples"] = 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "faster")
    head, branches, lr_before = git("rev-parse", "HEAD"), git("branch"), params["train"]["lr"]

    assert cli.main(["--root", str(proj), "sweep", "train.lr=1e-4,1e-2", "--apply-best"]) == cli.EXIT_OK
    out = capfd.readouterr().out

    # Two experiments, one per point, each with its own params and metrics (kept in DVC's cache).
    show = json.loads(subprocess.run([procs.dvc_bin(), "exp", "show", "--json"], cwd=proj, check=True,
                                     capture_output=True, text=True).stdout)
    exps = {r["name"]: r["data"] for r in sweep._revs(show)}
    assert len(exps) == 2 and all(name.startswith("sweep-") for name in exps)
    lrs = {name: d["params"]["params.yaml"]["data"]["train"]["lr"] for name, d in exps.items()}
    assert sorted(lrs.values()) == [1e-4, 1e-2]
    merged = {name: d["metrics"]["reports/eval.json"]["data"]["variants"]["merged"] for name, d in exps.items()}
    train_eval = {name: d["metrics"]["reports/train.json"]["data"]["eval_loss"] for name, d in exps.items()}
    assert len({m["perplexity"] for m in merged.values()}) == 2 and len(set(train_eval.values())) == 2
    assert all("train" in d["metrics"]["reports/train_live/metrics.json"]["data"] for d in exps.values())

    # The table is dvc exp show's, sorted by the gate's metric; the best (task metric, then
    # perplexity) is named and its params are now params.yaml's.
    assert "variants.merged.task_metric" in out and "train.lr" in out and all(name in out for name in exps)
    best = max(exps, key=lambda n: (merged[n]["task_metric"], -merged[n]["perplexity"]))
    assert f"best: {best} (train.lr=" in out
    applied = yaml.safe_load((proj / "params.yaml").read_text())
    assert applied["train"]["lr"] == lrs[best] != lr_before
    assert {k: v for k, v in applied.items() if k != "train"} == {k: v for k, v in params.items() if k != "train"}

    # No debris: the applied params and DVC's lock are the only changes; no stash, branch, tag or
    # commit was added; nothing was registered or promoted.
    assert sorted(git("status", "--porcelain", "--untracked-files=all").splitlines()) == [" M params.yaml", "?? dvc.lock"]
    assert git("rev-parse", "HEAD") == head and git("branch") == branches
    assert git("tag") == "" and git("stash", "list") == ""
    assert not (proj / "registry").exists() and not (proj / "reports/gate.json").exists()
