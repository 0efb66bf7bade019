import json

import pytest

from phiops.io import atomic_dir, read_jsonl, write_jsonl


def test_jsonl_roundtrip_and_no_temp_left(tmp_path):
    out = tmp_path / "a" / "rows.jsonl"
    assert write_jsonl(out, [{"x": 1}, {"y": "é"}]) == 2
    assert list(read_jsonl(out)) == [{"x": 1}, {"y": "é"}]
    assert [p.name for p in out.parent.iterdir()] == ["rows.jsonl"]


def test_failed_write_keeps_the_old_file(tmp_path):
    out = tmp_path / "rows.jsonl"
    write_jsonl(out, [{"v": 1}])

    def rows():
        yield {"v": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(out, rows())
    assert json.loads(out.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_atomic_dir_crash_leaves_previous_version(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as d:
        (d / "w.safetensors").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "w.safetensors").write_text("half")
        raise RuntimeError("crash during save")
    assert (final / "w.safetensors").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
