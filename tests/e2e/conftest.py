"""A throwaway phiops project on a tiny random model, shared by the e2e tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _make_project(tmp: Path, base: Path, *, rows: int = 160) -> Path:
    """Copy the pipeline (dvc.yaml, the package's source and pyproject, services, flows, infra, prefect.yaml) and a data slice
    into `tmp/proj`, with params cut down for a tiny random model and an open gate; git init."""
    proj = tmp / "proj"
    proj.mkdir()
    # pyproject.toml and README.md: a bento ships phiops as a wheel built from the checkout.
    for rel in ("dvc.yaml", ".gto", "src", "services", "flows", "infra", "prefect.yaml", "pyproject.toml", "README.md"):
        src = ROOT / rel
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        (shutil.copytree(src, proj / rel, ignore=ignore) if src.is_dir() else shutil.copy(src, proj / rel))
    (proj / ".dvc").mkdir()
    for rel in ("config", ".gitignore"):  # .gitignore: DVC's own tmp/ and cache/ stay out of git status
        shutil.copy(ROOT / ".dvc" / rel, proj / ".dvc" / rel)
    (proj / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    lines = (ROOT / "data/raw/tickets.jsonl").read_text().splitlines()[:rows]
    (proj / "data/raw").mkdir(parents=True)
    (proj / "data/raw/tickets.jsonl").write_text("\n".join(lines) + "\n")
    params = yaml.safe_load((ROOT / "configs/smollm2-135m.yaml").read_text())
    params["model"]["base"] = str(base)
    params["approval"] = {"mode": "manual", "timeout_hours": 1}
    params["validate"]["min_tokens"] = 2
    params["train"].update(max_steps=2, batch_size=4, logging_steps=1)
    params["quantize"].update(group_size=128, calibration_samples=8, calibration_max_length=64)
    params["evaluate"].update(max_samples=4, max_new_tokens=4, batch_size=4)
    # A random model cannot learn the task in 2 steps: open the gate so promotion is exercised.
    params["gate"] = {"min_task_metric": 0.0, "min_gain_over_base": -1.0, "max_loss_vs_production": 1.0,
                      "max_quantized_ppl_increase": 100.0, "max_quantized_metric_decrease": 1.0}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = lambda *a: subprocess.run(["git", *a], cwd=proj, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return proj


@pytest.fixture(scope="session")
def make_project():
    """``make_project(tmp_dir, base_model) -> project dir`` (see :func:`_make_project`)."""
    return _make_project
