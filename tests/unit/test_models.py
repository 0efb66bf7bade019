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
