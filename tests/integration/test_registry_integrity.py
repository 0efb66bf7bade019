"""Integrity of registered models on a real git + DVC repo: one flipped byte is refused.

The working tree holds a newer candidate, so production's files come from DVC's cache at the
version's GTO tag. Flip one byte of that cached copy and every path that loads a registered
model (the evaluator scoring production, promotion and rollback through the CLI) must refuse
it, naming the file, before anything reads the weights.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from phiops import cli, config
from phiops.artifacts import RegistryError
from phiops.paths import Layout
from phiops.registry import Registry
from phiops.stages import evaluate

pytestmark = pytest.mark.integration

DVC_YAML = """\
stages:
  merge:
    cmd: python -c "import shutil; shutil.copytree('weights', 'models/merged', dirs_exist_ok=True)"
    deps: [weights]
    outs: [models/merged]
"""


def _run(cwd: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def project(git_dvc_project):
    proj = git_dvc_project(DVC_YAML, dirs=("weights",))
    reg = Registry(Layout(proj), "phiops-model")
    for n, payload in ((1, b"weights of v1" * 100), (2, b"weights of v2" * 100)):
        (proj / "weights/model.safetensors").write_bytes(payload)
        (proj / "weights/config.json").write_text('{"n": %d}' % n)
        _run(proj, "dvc", "repro", "-q")
        reg.register(proj / "models/merged", {"variant": "merged", "metrics": {"task_metric": 0.5 + n / 10}})
        reg.set_production(f"v{n}.0.0", approver="ana", reason=f"release {n}")
    return proj, reg


def _flip_cached_byte(proj: Path, payload: bytes) -> None:
    md5 = hashlib.md5(payload).hexdigest()
    cached = proj / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    cached.chmod(0o644)  # DVC keeps its cache read-only
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x01
    cached.write_bytes(bytes(data))


def test_intact_version_is_restored_from_dvc(project, capsys):
    proj, reg = project
    assert reg.production()["version"] == "v2.0.0"
    # Rollback: v1's files are not in the working tree; DVC restores them, the sha256 match.
    rc = cli.main(["--root", str(proj), "--params", str(proj / "params.yaml"), "rollback",
                   "--reason", "v2 misroutes billing", "--approver", "bo", "--no-bento"])
    assert rc == 0, capsys.readouterr()
    assert "production: v2.0.0 -> v1.0.0" in capsys.readouterr().out
    assert reg.production()["version"] == "v1.0.0"
    assert reg.promotions()[-1]["approver"] == "bo"
    # Idempotent: again changes nothing, records nothing.
    n = len(reg.events())
    assert cli.main(["--root", str(proj), "--params", str(proj / "params.yaml"), "promote", "v1.0.0",
                     "--reason", "again", "--no-bento"]) == 0
    assert "already v1.0.0" in capsys.readouterr().out and len(reg.events()) == n


def test_flipped_byte_in_registered_model_is_refused_everywhere(project, capsys):
    proj, reg = project
    _flip_cached_byte(proj, b"weights of v1" * 100)
    v1 = reg.record("v1.0.0")

    # The evaluator scoring a production model.
    with pytest.raises(RegistryError, match=r"does not match phiops-model@v1.0.0: changed: model.safetensors"):
        evaluate.production(config.parse({}), Layout(proj), v1)

    # Promotion / rollback from the CLI: refused (exit 5), the file named, production unchanged.
    rc = cli.main(["--root", str(proj), "--params", str(proj / "params.yaml"), "rollback",
                   "--reason", "v2 misroutes billing", "--no-bento"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_REFUSED
    assert "changed: model.safetensors" in err and "phiops-model@v1.0.0" in err
    assert reg.production()["version"] == "v2.0.0"
