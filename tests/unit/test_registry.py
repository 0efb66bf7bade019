"""Registry on a throwaway git repo: versions, production, rollback, idempotence, integrity."""

import subprocess

import pytest

from phiops.paths import Layout
from phiops.registry import Registry, RegistryError


@pytest.fixture
def reg(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no global git identity: the fallback must work
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    model = tmp_path / "models" / "merged"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights-v1")
    return Registry(Layout(tmp_path), "phiops-model"), model


def test_register_promote_rollback(reg):
    r, model = reg
    assert r.production() is None
    v1 = r.register(model, {"variant": "merged", "metrics": {"task_metric": 0.8}})
    r.set_production(v1["version"], approver="ana", reason="first")
    (model / "model.safetensors").write_bytes(b"weights-v2")
    v2 = r.register(model, {"variant": "merged", "metrics": {"task_metric": 0.9}})
    r.set_production(v2["version"], approver="ana", reason="better")
    assert r.production()["version"] == "v2.0.0"

    r.set_production("v1.0.0", approver="bo", reason="rollback")
    assert r.production()["version"] == "v1.0.0"
    n_events = len(r.events())
    r.set_production("v1.0.0", approver="bo", reason="again")  # idempotent: no new tag
    assert len(r.events()) == n_events
    assert [h["version"] for h in r.history()] == ["v1.0.0", "v2.0.0"]
    assert v1["files"]["model.safetensors"] != v2["files"]["model.safetensors"]


def test_flipped_byte_is_refused(reg):
    r, model = reg
    r.register(model, {"variant": "merged"})
    r.verify("v1.0.0", model)
    data = bytearray((model / "model.safetensors").read_bytes())
    data[0] ^= 1
    (model / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="changed: model.safetensors"):
        r.verify("v1.0.0", model)


def test_unknown_version_names_the_known_ones(reg):
    r, model = reg
    r.register(model, {"variant": "merged"})
    with pytest.raises(RegistryError, match="v1.0.0"):
        r.set_production("v9.0.0", approver="x", reason="y")
