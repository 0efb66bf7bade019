"""Stage `merge`: fold the adapter into the unquantized base.

The base is loaded unquantized (bf16 on CUDA, fp32 on CPU) and merged there, never into 4-bit
weights (known quality loss: peft#2321, transformers#31293). The merge is checked: the merged
model must give the same logits as base + adapter on a fixed batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiops import models
from phiops.config import Params
from phiops.io import atomic_dir, read_jsonl, write_json
from phiops.paths import Layout

log = logging.getLogger(__name__)


class MergeMismatchError(RuntimeError):
    """The merged model's logits differ from base + adapter beyond the configured bound."""


@dataclass(frozen=True)
class MergeOutputs:
    model: Path
    report: Path


def _fixed_batch(tok: Any, path: Path, n: int = 4) -> dict[str, Any]:
    import torch

    rows = [r["input_ids"] for _, r in zip(range(n), read_jsonl(path))]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def bound_for(cfg: Params, dtype: Any) -> float:
    """The equivalence bound for a merge done in `dtype` (fp32 exact up to round-off; bf16/fp16 not)."""
    import torch

    return cfg.merge.max_abs_logit_diff if dtype == torch.float32 else cfg.merge.max_abs_logit_diff_bf16


def run(cfg: Params, layout: Layout) -> MergeOutputs:
    """Merge `layout.adapter` into the base and save it at `layout.merged`.

    Returns:
        Paths of the merged checkpoint and the equivalence report (DVC metrics).

    Raises:
        MergeMismatchError: max |logit difference| above `merge.max_abs_logit_diff`.
    """
    import torch
    from peft import PeftModel

    device = models.pick_device(cfg.train.device)
    base_path = models.resolve(cfg.model.base)
    tok = models.load_tokenizer(layout.adapter)
    base = models.load_causal_lm(base_path, device=device)
    model = PeftModel.from_pretrained(base, str(layout.adapter), is_trainable=False).eval()
    batch = {k: v.to(device) for k, v in _fixed_batch(tok, layout.test_split).items()}
    with torch.no_grad():
        before = model(**batch).logits.float()
        merged = model.merge_and_unload()
        after = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (before - after).abs()[mask]
    max_diff = float(diff.max())
    agree = float((before.argmax(-1) == after.argmax(-1))[mask].float().mean())
    dtype = next(merged.parameters()).dtype
    bound = bound_for(cfg, dtype)
    report = {
        "max_abs_logit_diff": max_diff,
        "argmax_agreement": agree,
        "bound": bound,
        "dtype": str(dtype),
        "device": device,
        "tokens_compared": int(mask.sum()),
    }
    write_json(layout.merge_report, report)
    if max_diff > bound:
        raise MergeMismatchError(
            f"merged model differs from base + adapter: max |dlogit| {max_diff:.3g} > bound "
            f"{bound:g} for {dtype} (argmax agreement {agree:.4f})"
        )

    stops = models.stop_ids(tok, base_path)
    merged.generation_config.eos_token_id = stops
    if merged.generation_config.pad_token_id is None:
        merged.generation_config.pad_token_id = tok.pad_token_id
    merged.config.name_or_path = "phiops/merged"
    with atomic_dir(layout.merged) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    log.info("merge: %s", json.dumps(report))
    return MergeOutputs(layout.merged, layout.merge_report)
