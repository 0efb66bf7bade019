"""LoRA target projections per architecture, and the check that every one got an adapter.

Phi-3, Phi-3.5, Phi-4 and Phi-4-mini (`Phi3ForCausalLM`) fuse `qkv_proj` and `gate_up_proj`;
Phi-2 (`PhiForCausalLM`) keeps `q/k/v_proj`, `dense`, `fc1`, `fc2`; Llama-style models have
seven projections. A Llama target list applied to Phi-3 silently adapts only `o_proj` and
`down_proj`, so after wrapping we verify every intended projection of every layer.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

TARGETS: dict[str, list[str]] = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class LoraTargetError(RuntimeError):
    """Some intended projection has no adapter after wrapping."""


def resolve_targets(model_type: str, setting: str | list[str]) -> str | list[str]:
    """The `target_modules` for peft.

    Raises:
        LoraTargetError: `auto` for an architecture we have no table for.
    """
    if isinstance(setting, list) or setting == "all-linear":
        return setting
    if model_type not in TARGETS:
        raise LoraTargetError(
            f"no LoRA target table for model_type {model_type!r}; set train.lora.targets to "
            f"'all-linear' or a list of module names (known: {sorted(TARGETS)})"
        )
    return TARGETS[model_type]


def verify(peft_model: Any, targets: str | list[str]) -> dict[str, int]:
    """Check every decoder layer has an adapter on every intended projection.

    Returns:
        Trainable parameter count per module type (e.g. {"qkv_proj": 1_572_864, ...}).

    Raises:
        LoraTargetError: listing each (layer, projection) left without an adapter, a
            target name that matches no module at all, or a base parameter left trainable.
    """
    from peft.tuners.lora import LoraLayer

    adapted: dict[str, set[int]] = {}
    layer_ids: set[int] = set()
    for name, module in peft_model.named_modules():
        m = re.search(r"\.layers\.(\d+)\.", name + ".")
        if m:
            layer_ids.add(int(m.group(1)))
        if isinstance(module, LoraLayer) and m:
            adapted.setdefault(name.rsplit(".", 1)[-1], set()).add(int(m.group(1)))

    if isinstance(targets, str):  # all-linear: every linear projection inside the layers
        import torch

        intended = {
            n.rsplit(".", 1)[-1]
            for n, mod in peft_model.named_modules()
            if isinstance(mod, torch.nn.Linear)
            and ".layers." in n
            and ".lora_" not in n
            and not n.endswith(".base_layer")
        } | set(adapted)
    else:
        intended = set(targets)

    missing = []
    for t in sorted(intended):
        holes = sorted(layer_ids - adapted.get(t, set()))
        if holes:
            missing.append(f"{t}: no adapter in layer(s) {holes[:8]}{'…' if len(holes) > 8 else ''}")
    if missing:
        raise LoraTargetError("LoRA targets not adapted:\n  " + "\n  ".join(missing))

    return trainable_by_module(peft_model)


def trainable_by_module(peft_model: Any) -> dict[str, int]:
    """Trainable (adapter) parameters per adapted module type, e.g. {"o_proj": 3_145_728}.

    Raises:
        LoraTargetError: a base parameter is trainable (it would be trained, then silently
            dropped by save_pretrained).
    """
    counts: Counter[str] = Counter()
    unfrozen = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            m = re.search(r"\.([A-Za-z0-9_]+)\.lora_[AB]\.", name)
            if m:
                counts[m.group(1)] += p.numel()
            else:
                unfrozen.append(name)
    if unfrozen:
        raise LoraTargetError(f"base parameters left trainable: {unfrozen[:8]}{'…' if len(unfrozen) > 8 else ''}")
    return dict(sorted(counts.items()))
