"""Two projects on one machine share BentoML's store: each keeps its own models and bentos.

Every project's registry starts at v1.0.0, and ``~/bentoml`` belongs to the machine. Two git +
DVC projects register different weights as v1.0.0 and build their bentos into one
``BENTOML_HOME``: both must succeed, each bento serving its own project's model, while a tag
of one project claimed for other files is still refused.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from phiops import bento, config, deploy
from phiops.paths import Layout, store_name
from phiops.registry import Registry

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = """\
stages:
  merge:
    cmd: python -c "import shutil; shutil.copytree('weights', 'models/merged', dirs_exist_ok=True)"
    deps: [weights]
    outs: [models/merged]
"""


def _project(git_dvc_project, name: str, payload: bytes) -> tuple[Path, dict]:
    proj = git_dvc_project(DVC_YAML, dirs=("weights",), name=name)
    (proj / "weights/model.safetensors").write_bytes(payload)
    (proj / "weights/config.json").write_text("{}")
    subprocess.run(["dvc", "repro", "-q"], cwd=proj, check=True, capture_output=True)
    # A bento ships the phiops wheel built from the checkout above services/.
    shutil.copytree(ROOT / "services", proj / "services", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src/phiops", proj / "src/phiops", ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / rel, proj / rel)
    record = Registry(Layout(proj), "phiops-model").register(
        proj / "models/merged", {"variant": "merged", "data_hash": f"md5:{name}", "git_rev": name})
    assert record["version"] == "v1.0.0"
    return proj, record


def test_two_projects_build_v1_into_one_store(git_dvc_project, tmp_path, monkeypatch) -> None:
    import bentoml

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")
    cfg = config.Params()
    (a, rec_a), (b, rec_b) = (_project(git_dvc_project, "a", b"weights of a" * 100),
                              _project(git_dvc_project, "b", b"weights of b" * 100))

    built_a = deploy.build_bento(Layout(a), cfg, rec_a, lock_packages=False)
    built_b = deploy.build_bento(Layout(b), cfg, rec_b, lock_packages=False)  # was: exit 6, "already exists"

    assert built_a["model"] == f"{store_name('phiops-model', a)}:v1.0.0" != built_b["model"]
    assert built_a["bento"] == rec_a["bento"] == f"{store_name('phiops-llm', a)}:v1.0.0" != built_b["bento"]
    assert built_b["bento"] == rec_b["bento"]
    assert built_a["containerize"] == built_b["containerize"] == "phiops containerize v1.0.0"
    for built, payload in ((built_a, b"weights of a"), (built_b, b"weights of b")):
        served = bentoml.bentos.get(built["bento"], _bento_store=bento._bento_store())
        assert served.info.args["model_tag"] == built["model"]
        assert served.info.args["served_model_name"] == "phiops-model"  # clients still ask for the artifact
        model = bento._model_store().get(built["model"])
        assert Path(model.path_of("checkpoint/model.safetensors")).read_bytes() == payload * 100
    # Each again: found, not rebuilt.
    assert deploy.build_bento(Layout(a), cfg, rec_a, lock_packages=False)["bento"] == built_a["bento"]

    # Inside one project a tag is still immutable: other files under a's v1.0.0 are refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not a's weights")
    with pytest.raises(bento.BentoError, match="already exists .* with different files"):
        bento.save_model(other, store_name("phiops-model", a), "v1.0.0", {})
