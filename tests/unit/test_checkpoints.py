"""Crash-safe checkpoints: only a marked directory counts, debris is removed, other runs are not resumed."""

import json

from phiops import checkpoints as C


def _written(root, step, files=("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")):
    d = C.staging(root) / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_text(f"{f} at {step}")
    return d


def test_commit_marks_moves_and_keeps_the_newest(tmp_path):
    C.commit(_written(tmp_path, 10), tmp_path, 10, "fp")
    final = C.commit(_written(tmp_path, 20), tmp_path, 20, "fp")
    assert final == tmp_path / "checkpoint-20"
    assert C.complete(tmp_path) == [final]  # keep=1: checkpoint-10 removed only after 20 is in place
    assert json.loads((final / C.MARKER).read_text()) == {"step": 20, "fingerprint": "fp"}
    assert not (C.staging(tmp_path) / "checkpoint-20").exists()


def test_unmarked_and_staged_directories_are_debris(tmp_path):
    C.commit(_written(tmp_path, 10), tmp_path, 10, "fp")
    _written(tmp_path, 20)  # killed before its marker: still in staging
    (tmp_path / "checkpoint-30").mkdir()  # a final-looking directory without a marker
    assert C.resumable(tmp_path, "fp") == tmp_path / "checkpoint-10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


def test_another_fingerprint_is_discarded_not_resumed(tmp_path):
    C.commit(_written(tmp_path, 10), tmp_path, 10, "old params")
    assert C.resumable(tmp_path, "new params") is None
    assert not (tmp_path / "checkpoint-10").exists()


def test_empty_or_missing_root(tmp_path):
    assert C.resumable(tmp_path / "nothing", "fp") is None
    assert C.complete(tmp_path) == []
