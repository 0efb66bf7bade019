import pytest

from phiops.models import ModelError, check_safetensors, resolve, stop_ids


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="pytorch_model.bin"):
        check_safetensors(tmp_path)
    with pytest.raises(ModelError, match="only safetensors"):
        resolve(str(tmp_path))


def test_unknown_builtin_is_named():
    with pytest.raises(ModelError, match="known"):
        resolve("builtin:gpt-5")


def test_stop_ids_keep_every_end_of_turn_token():
    class Tok:  # Phi-3 style: EOS differs from the end-of-turn token
        eos_token_id = 32000
        def get_vocab(self):
            return {"<|endoftext|>": 32000, "<|end|>": 32007, "hello": 5}

    assert stop_ids(Tok()) == [32000, 32007]


def test_every_loader_asks_for_safetensors_and_no_remote_code(tmp_path, monkeypatch):
    # Record what each loader passes to transformers instead of loading anything.
    from types import SimpleNamespace

    import transformers

    from phiops import models
    from phiops.embeddings import Embedder

    calls = []

    def fake(kind):
        def from_pretrained(cls, path, *args, **kwargs):
            calls.append((kind, kwargs))
            if kind == "AutoTokenizer":
                return SimpleNamespace(pad_token="<pad>")
            raise RuntimeError("recorded")
        return classmethod(from_pretrained)

    for cls in ("AutoModelForCausalLM", "AutoModel", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", fake(cls))
    (tmp_path / "model.safetensors").write_bytes(b"")
    models.load_tokenizer(tmp_path)
    for load in (lambda: models.load_causal_lm(tmp_path), Embedder):
        with pytest.raises(RuntimeError, match="recorded"):
            load()
    assert [k for k, _ in calls] == ["AutoTokenizer", "AutoModelForCausalLM", "AutoTokenizer", "AutoModel"]
    for kind, kwargs in calls:
        assert kwargs.get("trust_remote_code") is False, kind
        if kind != "AutoTokenizer":
            assert kwargs.get("use_safetensors") is True, kind
