"""Registry on a throwaway git repo: versions, production, rollback, idempotence, integrity."""

import re
import subprocess

import pytest

from phiops.artifacts import RegistryError
from phiops.paths import Layout, store_name
from phiops.registry import Registry, bento_tag
from phiops.registry_view import render_promotions, render_record, render_table


@pytest.fixture
def reg(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no global git identity: the fallback must work
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    model = tmp_path / "models" / "merged"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights-v1")
    return Registry(Layout(tmp_path), "phiops-model"), model


def test_store_names_are_the_projects(tmp_path, monkeypatch):
    # Two clones on one machine share BentoML's store, and each registry starts at v1.0.0.
    a, b = tmp_path / "a" / "phiops", tmp_path / "b" / "phiops"
    a.mkdir(parents=True), b.mkdir(parents=True)
    (tmp_path / "link").symlink_to(a)
    monkeypatch.chdir(a)
    assert store_name("phiops-model", a) == store_name("phiops-model", tmp_path / "link") == store_name("phiops-model", ".")
    assert store_name("phiops-model", a) != store_name("phiops-model", b)
    assert re.fullmatch(r"phiops-llm-[0-9a-f]{8}:v1\.0\.0", bento_tag(a, "v1.0.0"))
    assert bento_tag(a, "v1.0.0") != bento_tag(b, "v1.0.0")


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


def test_register_is_idempotent_and_stages_the_candidate(reg):
    r, model = reg
    v1 = r.register(model, {"variant": "merged"})
    again = r.register(model, {"variant": "merged", "flow_run_id": "other"})  # a resumed run
    assert again["version"] == v1["version"] and len(r.history()) == 1
    staged = [e for e in r.events() if e.get("event") == "assignment" and e.get("stage") == "staging"]
    assert [e["version"] for e in staged] == ["v1.0.0"]
    assert r.production() is None  # staging is not production


def test_decision_is_written_into_the_record_once(reg):
    r, model = reg
    r.register(model, {"variant": "merged", "approval": {"status": "pending"}})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=r.root, capture_output=True, text=True).stdout
    decision = {"approved": True, "approver": "ana@host", "reason": "beats v0 on billing"}
    assert r.record_decision("v1.0.0", decision)["approval"] == decision
    head2 = subprocess.run(["git", "rev-parse", "HEAD"], cwd=r.root, capture_output=True, text=True).stdout
    assert head2 != head  # committed
    r.record_decision("v1.0.0", decision)
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=r.root, capture_output=True, text=True).stdout == head2
    assert r.record("v1.0.0")["approval"]["approver"] == "ana@host"


def test_promotions_log_and_previous_production(reg):
    r, model = reg
    r.register(model, {"variant": "merged"})
    (model / "model.safetensors").write_bytes(b"weights-v2")
    r.register(model, {"variant": "merged"})
    assert r.previous_production() is None
    r.set_production("v1.0.0", approver="ana", reason="first")
    r.set_production("v2.0.0", approver="ana", reason="better")
    assert r.previous_production()["version"] == "v1.0.0"
    r.set_production("v1.0.0", approver="bo", reason="rollback: v2 misroutes billing")
    log = r.promotions()
    assert [(p["version"], p["approver"], p["reason"]) for p in log] == [
        ("v1.0.0", "ana", "first"), ("v2.0.0", "ana", "better"), ("v1.0.0", "bo", "rollback: v2 misroutes billing")]
    table = render_promotions(log)
    assert "rollback: v2 misroutes billing" in table and table.count("\n") == 4  # header, rule, 3 rows


def test_tables_show_lineage(reg):
    r, model = reg
    rec = r.register(model, {"variant": "merged", "data_hash": "abcdef0123456789", "git_rev": "0123456789abcdef",
                             "metrics": {"task_metric": 0.9}, "flow_run_id": "1234abcd-0000",
                             "params": {"train": {"lr": 0.001}}, "gate": {"passed": True, "variant": "merged"}})
    r.record_decision("v1.0.0", {"approved": True, "approver": "ana", "reason": "ok"})
    r.set_production("v1.0.0", approver="ana", reason="ok")
    versions = render_table(r.history(), production="v1.0.0")
    assert versions.splitlines()[2].split()[:4] == ["*", "v1.0.0", "merged", "0.9"]
    assert "abcdef012345" in versions and "approved" in versions and "1234abcd" in versions
    shown = render_record(r.record("v1.0.0"))
    digest = rec["files"]["model.safetensors"]
    assert re.search(rf"^sha256 model.safetensors +{digest}$", shown, re.M)
    for field in ("data hash (dvc.lock)", "git rev (code)", "flow run id", "approver", "gate", "params"):
        assert field in shown, field


# -- fail closed: "could not read" is never "nothing there" --------------------------------------

def _promoted(reg):
    r, model = reg
    r.register(model, {"variant": "merged"})
    r.set_production("v1.0.0", approver="ana", reason="first")
    return r


def test_a_gto_failure_stops_instead_of_reading_as_no_production(reg, monkeypatch):
    import gto.api

    r = _promoted(reg)

    def broken(*a, **k):
        raise RuntimeError("tag storage unreadable")

    monkeypatch.setattr(gto.api, "history", broken)
    for read in (r.production, r.promotions, r.previous_production, r.events):
        with pytest.raises(RegistryError, match="could not read the registry of phiops-model.*tag storage unreadable"):
            read()


@pytest.mark.parametrize("tag", ["phiops-model#production#x", "phiops-model@vbad"])
def test_a_tag_gto_cannot_parse_is_named_not_skipped(reg, tag):
    # GTO itself skips tags it cannot parse: a corrupt production tag would silently vanish.
    r = _promoted(reg)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", tag, "-m", "{}"], cwd=r.root, check=True)
    with pytest.raises(RegistryError, match=re.escape(tag) + ".*not valid GTO tags"):
        r.production()


def test_a_lightweight_assignment_tag_is_refused(reg):
    r = _promoted(reg)
    subprocess.run(["git", "tag", "phiops-model#production#9"], cwd=r.root, check=True)
    with pytest.raises(RegistryError, match="phiops-model#production#9"):
        r.production()


def test_a_damaged_record_is_named(reg):
    r = _promoted(reg)
    (r.dir / "v1.0.0.json").write_text("{half a rec")
    with pytest.raises(RegistryError, match="v1.0.0.json"):
        r.history()
    with pytest.raises(RegistryError, match="v1.0.0.json"):
        r.production()


def test_no_git_repository_is_an_error_not_an_empty_registry(tmp_path):
    r = Registry(Layout(tmp_path), "phiops-model")
    with pytest.raises(RegistryError, match="could not read the registry.*not a git repository"):
        r.production()


def test_a_gto_write_failure_is_a_registry_error(reg, monkeypatch):
    import gto.api

    r = _promoted(reg)
    (r.root / "models/merged/model.safetensors").write_bytes(b"weights-v2")
    r.register(r.root / "models/merged", {"variant": "merged"})

    def refuse(*a, **k):
        raise ValueError("cannot create tag")

    monkeypatch.setattr(gto.api, "assign", refuse)
    with pytest.raises(RegistryError, match="GTO could not assign phiops-model v2.0.0 to production: .*cannot create tag"):
        r.set_production("v2.0.0", approver="ana", reason="better")
    assert r.production()["version"] == "v1.0.0"
