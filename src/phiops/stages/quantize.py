"""The ``quantize`` stage: 4-bit weight-only (W4A16) GPTQ or AWQ with llm-compressor.

Input is the merged fp checkpoint (``layout.merged``); output is a compressed-tensors
checkpoint (``layout.quantized(method)``) that plain ``transformers`` loads and generates
with, on CPU or CUDA, plus a JSON report (``layout.quantize_report(method)``).

Calibration uses the first ``quantize.calibration_samples`` rows of the train split, already
tokenized by the ``format`` stage, cut to ``quantize.calibration_max_length`` tokens: the
quantizer sees the exact chat-formatted text the model was fine-tuned on.

What is quantized: every ``nn.Linear`` except ``lm_head`` (symmetric int4, one scale per
``quantize.group_size`` input columns). Embeddings are not Linear and stay in full precision.
Group size is honoured exactly; a model with a Linear whose input width is not a multiple of
it is refused before calibration, with the group size that would fit.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from phiops.config import Params
from phiops.io import atomic_dir, dir_size, read_jsonl, write_json
from phiops.memory import measure_peak
from phiops.models import check_safetensors, default_dtype, load_causal_lm, load_tokenizer, pick_device
from phiops.paths import Layout

if TYPE_CHECKING:  # heavy imports stay out of module import (CLI start-up, unit tests)
    from datasets import Dataset

log = logging.getLogger(__name__)

# lm_head shares its weight with the embeddings in many small models and dominates their
# quality loss when quantized; vLLM and transformers both expect it unquantized.
IGNORE: tuple[str, ...] = ("lm_head",)

# Tokenizer, chat template and generation settings: everything a server needs beside the
# weights. generation_config.json is copied verbatim (not re-serialised) so every EOS id
# the merged model stops on survives.
_ASSET_PATTERNS: tuple[str, ...] = (
    "tokenizer*.json",
    "tokenizer.model",
    "*.tiktoken",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class QuantizeError(RuntimeError):
    """The stage cannot produce a quantized checkpoint from its inputs."""


@dataclass(frozen=True)
class QuantizeOutputs:
    """Where the stage wrote its artifacts.

    Attributes:
        model_dir: the compressed-tensors checkpoint (``layout.quantized(method)``).
        report: the JSON report (``layout.quantize_report(method)``).
    """

    model_dir: Path
    report: Path


# --------------------------------------------------------------------------------------
# The CPU pin_memory workaround
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_pinning_without_accelerator() -> Iterator[bool]:
    """Make llm-compressor's ``IntermediatesCache.pin_memory`` a no-op while no accelerator exists.

    Why: llm-compressor 0.14's ``AWQModifier._apply_smoothing`` calls
    ``IntermediatesCache.pin_memory()`` on every cached batch, unconditionally, so that the
    grid search can copy them to the GPU with ``non_blocking=True``. ``Tensor.pin_memory()``
    needs an accelerator's host allocator; with none, torch raises ``RuntimeError: Cannot
    access accelerator device when none is available`` and AWQ cannot run on CPU at all.
    There is no option to turn pinning off. Pinning only speeds host-to-device copies, and
    without an accelerator there are none (the cache is read on the CPU it lives on), so
    skipping it changes no number. The patch is applied only when no accelerator is present,
    only for the duration of the block, and the original method is put back even if the
    block raises; with CUDA it does nothing. (It is a class attribute, so it holds for the
    whole process while the block runs; without an accelerator no caller could pin anyway.)
    The explicit pin was introduced upstream by vllm-project/llm-compressor#2813; when a
    release guards it, ``test_upstream_pin_memory_still_fails_without_accelerator`` fails
    and this can go.

    Yields:
        True when the patch is active, False when it was not needed (or the method no
        longer exists in a newer llm-compressor).
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.__dict__.get("pin_memory")
    if torch.accelerator.is_available() or original is None:
        yield False
        return

    def _skip_pinning(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = _skip_pinning  # type: ignore[method-assign]
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------


@runtime_checkable
class Quantizer(Protocol):
    """One quantization algorithm, expressed as an llm-compressor recipe."""

    name: str

    def recipe(self, model: Any, scheme: dict[str, Any], ignore: Sequence[str]) -> list[Any]:
        """The llm-compressor modifiers that quantize `model` with `scheme` (a config group)."""
        ...

    def calibration_context(self) -> contextlib.AbstractContextManager[Any]:
        """A context the calibration runs inside (workarounds scoped to this algorithm)."""
        ...

    def params(self) -> dict[str, Any]:
        """The algorithm's own settings, for the report."""
        ...


@dataclass(frozen=True)
class GPTQQuantizer:
    """GPTQ (Frantar et al. 2022): second-order, column-by-column rounding with error feedback.

    Attributes:
        dampening_frac: added to the Hessian diagonal as a fraction of its mean; larger is
            more stable, smaller follows the calibration data more closely.
        block_size: columns processed per GPTQ block.
        actorder: activation ordering; None keeps llm-compressor's default ("static", which
            costs nothing at inference with group quantization).
    """

    name: str = "gptq"
    dampening_frac: float = 0.01
    block_size: int = 128
    actorder: str | None = None

    def recipe(self, model: Any, scheme: dict[str, Any], ignore: Sequence[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier

        kwargs: dict[str, Any] = {}
        if self.actorder is not None:
            kwargs["actorder"] = self.actorder
        return [
            GPTQModifier(
                config_groups={"group_0": scheme},
                ignore=list(ignore),
                dampening_frac=self.dampening_frac,
                block_size=self.block_size,
                **kwargs,
            )
        ]

    def calibration_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def params(self) -> dict[str, Any]:
        return {"dampening_frac": self.dampening_frac, "block_size": self.block_size, "actorder": self.actorder}


@dataclass(frozen=True)
class AWQQuantizer:
    """AWQ (Lin et al. 2023): per-channel scales that protect salient input channels, then RTN.

    In llm-compressor 0.14 AWQ is a transform (``AWQModifier``) followed by a
    ``QuantizationModifier`` that does the rounding; both are returned by :meth:`recipe`.

    Attributes:
        duo_scaling: scale from activations and weights (True), activations only (False),
            or search both ("both").
        n_grid: grid points in the per-layer scale search.
    """

    name: str = "awq"
    duo_scaling: bool | str = True
    n_grid: int = 20

    def recipe(self, model: Any, scheme: dict[str, Any], ignore: Sequence[str]) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [
            AWQModifier(mappings=awq_mappings(model), duo_scaling=self.duo_scaling, n_grid=self.n_grid),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=list(ignore)),
        ]

    def calibration_context(self) -> contextlib.AbstractContextManager[Any]:
        return no_pinning_without_accelerator()

    def params(self) -> dict[str, Any]:
        return {"duo_scaling": self.duo_scaling, "n_grid": self.n_grid}


QUANTIZERS: dict[str, type[GPTQQuantizer] | type[AWQQuantizer]] = {
    "gptq": GPTQQuantizer,
    "awq": AWQQuantizer,
}


def get_quantizer(method: str) -> Quantizer:
    """The quantizer registered under `method`, with its default settings.

    Args:
        method: ``"gptq"`` or ``"awq"``.

    Returns:
        A :class:`Quantizer`.

    Raises:
        QuantizeError: unknown method.
    """
    try:
        return QUANTIZERS[method]()
    except KeyError:
        raise QuantizeError(f"unknown quantization method {method!r}; known: {sorted(QUANTIZERS)}") from None


def awq_mappings(model: Any) -> list[Any]:
    """AWQ smoothing mappings (which norm/linear is scaled against which linears) for `model`.

    llm-compressor's registry covers Llama, Phi-3 (fused ``qkv_proj``/``gate_up_proj``),
    Mistral, Qwen and others. Phi-2 (``PhiForCausalLM``) is missing from it, and the fallback
    (Llama's mappings) fails on it (Phi-2 names its output projection ``dense``, not
    ``o_proj``). Phi-2's attention and MLP also read the same ``input_layernorm`` output in
    parallel, so that norm must be balanced against q/k/v *and* ``fc1`` together, or ``fc1``
    would be fed activations that nothing scales back.

    Args:
        model: the loaded causal LM.

    Returns:
        A list of ``AWQMapping``.
    """
    from llmcompressor.modifiers.transform.awq import AWQMapping, get_layer_mappings_from_model

    if type(model).__name__ == "PhiForCausalLM":
        return [
            AWQMapping(
                "re:.*input_layernorm$",
                ["re:.*self_attn.q_proj$", "re:.*self_attn.k_proj$", "re:.*self_attn.v_proj$", "re:.*mlp.fc1$"],
            ),
            AWQMapping("re:.*self_attn.v_proj$", ["re:.*self_attn.dense$"]),
            # fc1 -> fc2 is not smoothable: a GELU sits between them.
        ]
    return list(get_layer_mappings_from_model(model))


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def weight_scheme(scheme: str, group_size: int) -> dict[str, Any]:
    """A compressed-tensors config group for `scheme` with `group_size` columns per scale.

    Args:
        scheme: a compressed-tensors preset name (``"W4A16"``; ``"W4A16_ASYM"`` for experiments).
        group_size: input columns sharing one scale.

    Returns:
        A config-group dict (targets ``Linear``) accepted by llm-compressor modifiers.

    Raises:
        QuantizeError: the preset is not a grouped weight-only scheme.
    """
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = preset_name_to_scheme(scheme, ["Linear"])
    if preset.weights is None or preset.input_activations is not None or preset.weights.group_size is None:
        raise QuantizeError(f"scheme {scheme!r} is not a grouped weight-only scheme")
    weights = preset.weights.model_dump(exclude={"zp_dtype", "scale_dtype"}, exclude_none=True)
    weights["group_size"] = group_size
    return {"targets": ["Linear"], "weights": weights}


def _largest_fitting_group(widths: set[int], requested: int) -> int | None:
    g = requested
    while g >= 8:
        if all(w % g == 0 for w in widths):
            return g
        g //= 2
    return None


def check_group_size(model: Any, group_size: int, ignore: Sequence[str] = IGNORE) -> None:
    """Refuse a model whose quantized Linears cannot be split into groups of `group_size`.

    compressed-tensors packs each row in whole groups; a width that is not a multiple fails
    late (mid-save or at the first forward). Checking here fails in seconds, before
    calibration, and says which group size would fit.

    Args:
        model: the loaded causal LM.
        group_size: the requested group size.
        ignore: module-name suffixes that are not quantized.

    Raises:
        QuantizeError: listing the offending layers and the largest group size that fits.
    """
    import torch

    bad: list[tuple[str, int]] = []
    widths: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or any(name == i or name.endswith("." + i) for i in ignore):
            continue
        widths.add(module.in_features)
        if module.in_features % group_size:
            bad.append((name, module.in_features))
    if not bad:
        return
    shown = ", ".join(f"{n} ({w})" for n, w in bad[:4]) + (f", ... {len(bad) - 4} more" if len(bad) > 4 else "")
    fit = _largest_fitting_group(widths, group_size)
    hint = f"set quantize.group_size: {fit}" if fit else "no power-of-two group size >= 8 fits"
    raise QuantizeError(
        f"quantize.group_size={group_size} does not divide the input width of {len(bad)} Linear "
        f"layer(s): {shown}. Group quantization needs width % group_size == 0; {hint}."
    )


def calibration_dataset(train_split: Path, n: int, max_length: int, tokenizer: Any = None) -> "Dataset":
    """The first `n` rows of the train split as a tokenized dataset, cut to `max_length` tokens.

    Rows carry ``input_ids`` from the format stage; a row without them is tokenized from its
    ``text`` (already chat-formatted, so no special tokens are added).

    Args:
        train_split: the train JSONL.
        n: rows to take (fewer if the split is shorter; a warning says so).
        max_length: tokens kept per row.
        tokenizer: used only for rows that lack ``input_ids``.

    Returns:
        A ``datasets.Dataset`` with ``input_ids`` and ``attention_mask``.

    Raises:
        QuantizeError: the split is missing, empty, or a row has neither field.
    """
    from datasets import Dataset

    if not train_split.exists():
        raise QuantizeError(f"{train_split}: train split not found (run the format stage first)")
    rows: list[dict[str, list[int]]] = []
    for i, row in enumerate(read_jsonl(train_split)):
        if len(rows) >= n:
            break
        ids = row.get("input_ids")
        if ids is None:
            if "text" not in row or tokenizer is None:
                raise QuantizeError(f"{train_split}: row {i} has neither 'input_ids' nor 'text'")
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        ids = list(ids)[:max_length]
        if ids:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    if not rows:
        raise QuantizeError(f"{train_split}: no calibration rows")
    if len(rows) < n:
        log.warning("calibration: asked for %d samples, the train split has %d", n, len(rows))
    return Dataset.from_list(rows)


def copy_tokenizer_assets(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files, chat template and generation config from `src` to `dst`.

    Args:
        src: the merged checkpoint directory.
        dst: the quantized checkpoint directory (files there of the same name are replaced).

    Returns:
        The names copied, sorted.
    """
    copied: set[str] = set()
    for pattern in _ASSET_PATTERNS:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, dst / f.name)
                copied.add(f.name)
    if not any(n.startswith("chat_template") for n in copied):
        log.warning("%s has no chat template file; the quantized model keeps whatever tokenizer_config.json holds", src)
    return sorted(copied)


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def quantize_checkpoint(
    src: Path,
    dst: Path,
    quantizer: Quantizer,
    calibration: "Dataset",
    *,
    scheme: str = "W4A16",
    group_size: int = 128,
) -> dict[str, Any]:
    """Quantize the checkpoint at `src` into a compressed-tensors checkpoint at `dst`.

    `dst` appears in one rename once everything is written; an exception or a kill before
    that leaves whatever was at `dst` before untouched.

    Calibration runs on CUDA when it is available, else on the CPU: llm-compressor picks its
    execution device itself (the first accelerator) and moves one decoder layer at a time to
    it, so there is no device argument to pretend otherwise. Weights are loaded in bf16 for
    CUDA and fp32 for the CPU (``phiops.models.default_dtype``); the checkpoint keeps that
    dtype for what stays unquantized (embeddings, norms, scales).

    Args:
        src: a safetensors checkpoint directory (with tokenizer files).
        dst: the output directory.
        quantizer: the algorithm (see :func:`get_quantizer`).
        calibration: tokenized rows (see :func:`calibration_dataset`).
        scheme: compressed-tensors preset name.
        group_size: input columns per scale.


    Returns:
        Measurements: seconds, size_bytes, source_size_bytes, peak_rss_bytes and
        rss_scope, peak_cuda_bytes (None on CPU), device, dtype, architecture.

    Raises:
        QuantizeError: group size does not fit the model, or the output is not a
            compressed-tensors checkpoint.
        ModelError: `src` holds no safetensors weights.
    """
    from llmcompressor import oneshot

    dev = pick_device("auto")
    t0 = time.perf_counter()
    with measure_peak(dev) as mem:
        # Loaded on the CPU even with CUDA: the sequential pipeline onloads one layer at a
        # time, so models larger than the GPU still calibrate.
        dtype = default_dtype(dev)
        model = load_causal_lm(src, device="cpu", dtype=dtype)
        tokenizer = load_tokenizer(src)
        check_group_size(model, group_size)

        recipe = quantizer.recipe(model, weight_scheme(scheme, group_size), IGNORE)
        with quantizer.calibration_context():
            oneshot(
                model=model,
                processor=tokenizer,
                recipe=recipe,
                dataset=calibration,
                num_calibration_samples=len(calibration),
                max_seq_length=max(len(r) for r in calibration["input_ids"]),
                shuffle_calibration_samples=False,  # "the first N rows", reproducibly
                batch_size=1,  # no padding: every token of every row counts
                trust_remote_code_model=False,
            )

        with atomic_dir(dst) as tmp:
            model.save_pretrained(tmp, save_compressed=True)
            copy_tokenizer_assets(src, tmp)
            _verify_compressed(tmp)

    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "size_bytes": dir_size(dst),
        "source_size_bytes": dir_size(src),
        # Peaks of this call alone (phiops.memory), not of the process so far.
        "peak_rss_bytes": mem["peak_rss_bytes"],
        "rss_scope": mem["rss_scope"],
        "peak_cuda_bytes": mem["peak_cuda_bytes"],
        "device": dev,
        "dtype": str(dtype).removeprefix("torch."),
        "architecture": type(model).__name__,
    }


def _verify_compressed(path: Path) -> None:
    import json

    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("quantization_status") != "compressed":
        raise QuantizeError(f"{path}: saved checkpoint is not compressed-tensors/compressed: {qc}")


def run(cfg: Params, layout: Layout, method: str) -> QuantizeOutputs:
    """Quantize ``layout.merged`` with `method` and write the checkpoint and its report.

    Args:
        cfg: the validated params (``quantize`` section is read).
        layout: artifact paths.
        method: ``"gptq"`` or ``"awq"``.

    Returns:
        The written paths.

    Raises:
        QuantizeError: unknown method, missing/empty train split, or a group size that does
            not divide the model's Linear widths.
        ModelError: the merged checkpoint is missing or not safetensors.
    """
    import compressed_tensors
    import llmcompressor

    q = cfg.quantize
    quantizer = get_quantizer(method)
    check_safetensors(layout.merged)  # before anything slow
    tokenizer = load_tokenizer(layout.merged)
    calibration = calibration_dataset(layout.train_split, q.calibration_samples, q.calibration_max_length, tokenizer)
    out = layout.quantized(method)
    log.info("quantize[%s]: %s -> %s (%s, group %d, %d samples)", method, layout.merged, out, q.scheme, q.group_size, len(calibration))
    stats = quantize_checkpoint(
        layout.merged, out, quantizer, calibration, scheme=q.scheme, group_size=q.group_size
    )
    report = {
        "method": method,
        "scheme": q.scheme,
        "group_size": q.group_size,
        "ignore": list(IGNORE),
        "calibration_samples": len(calibration),
        "calibration_max_length": q.calibration_max_length,
        "calibration_tokens": sum(len(r) for r in calibration["input_ids"]),
        **stats,
        "size_ratio": round(stats["size_bytes"] / stats["source_size_bytes"], 4),
        "quantizer": quantizer.params(),
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__},
    }
    write_json(layout.quantize_report(method), report)
    return QuantizeOutputs(model_dir=out, report=layout.quantize_report(method))
