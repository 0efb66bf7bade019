"""Export a registered version for use outside phiops: GGUF (llama.cpp, Ollama), the LoRA adapter, or the merged model.

Every export is a folder holding the version's model card (README.md) and SHA256SUMS, written
into a temporary sibling and renamed into place. The files come through
:func:`phiops.artifacts.verified_files`, the registry's own sha256 check: the served variant's
files from the record, and the adapter or merged model it came from (recorded with the version
by :func:`phiops.lineage.components`) from the working tree when byte-identical, else from DVC's
cache at the version's GTO tag. A version whose files fail the check is refused.

GGUF follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Phi3MiniModel``), with
tensor names from gguf-py's ``TensorNameMap``, the map llama.cpp itself uses:

=================================================  ======================  =================================
Hugging Face (LlamaForCausalLM / Phi3ForCausalLM)  GGUF                    note
=================================================  ======================  =================================
model.embed_tokens.weight                          token_embd.weight
model.norm.weight                                  output_norm.weight      f32
lm_head.weight                                     output.weight           absent when tied (SmolLM2)
model.layers.N.input_layernorm.weight              blk.N.attn_norm.weight  f32
model.layers.N.self_attn.q_proj / k_proj           blk.N.attn_q / attn_k   llama: rows permuted for GGML's
                                                                           RoPE, as llama.cpp does
model.layers.N.self_attn.v_proj                    blk.N.attn_v
model.layers.N.self_attn.qkv_proj (phi3, fused)    blk.N.attn_qkv          as is: q, k, v rows in order
model.layers.N.self_attn.o_proj                    blk.N.attn_output
model.layers.N.post_attention_layernorm.weight     blk.N.ffn_norm.weight   f32
model.layers.N.mlp.gate_proj / up_proj / down_proj blk.N.ffn_gate / ffn_up / ffn_down
model.layers.N.mlp.gate_up_proj (phi3, fused)      blk.N.ffn_up            as is: gate rows, then up rows
=================================================  ======================  =================================

Metadata: ``<arch>.context_length``, ``embedding_length``, ``feed_forward_length``,
``block_count``, ``attention.head_count(_kv)``, ``attention.layer_norm_rms_epsilon``,
``rope.freq_base``, ``rope.dimension_count`` (llama: head dim; phi3: partial rotary x hidden /
heads), phi3's ``rope.scaling.original_context_length`` and ``attention.sliding_window``; the
tokenizer as ``tokenizer.ggml.*`` (tokens, types, merges, special ids, chat template): a
byte-level BPE as ``gpt2`` with llama.cpp's pre-tokenizer name (identified as llama.cpp does,
by hashing the ids of its check text), a byte-fallback BPE (Llama/Phi-3 style) as ``llama``
through gguf-py's ``LlamaHfVocab``. Other architectures (Phi-2, ...) and RoPE scaling (Phi-3
128k's LongRoPE, Llama 3.1's) are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from phiops import artifacts
from phiops.io import atomic_dir, dir_manifest
from phiops.paths import Layout
from phiops.registry import Registry

log = logging.getLogger(__name__)

Format = Literal["gguf", "adapter", "merged"]
FORMATS: tuple[Format, ...] = ("gguf", "adapter", "merged")
SUMS = "SHA256SUMS"
CARD = "README.md"
# The text llama.cpp hashes (the ids the tokenizer gives it) to name a BPE pre-tokenizer, and the
# names of the ones phiops' presets use (convert_hf_to_gguf.py, get_vocab_base_pre).
_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
           "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
           "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
           "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
_BPE_PRE = {"855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm"}


class ExportError(RuntimeError):
    """The export cannot be made: bad destination, unsupported architecture or tokenizer, missing lineage."""


def export(layout: Layout, artifact: str, version: str, fmt: Format, out: Path) -> dict[str, Any]:
    """Write `version` in format `fmt` to the folder `out`, with its model card and SHA256SUMS.

    Args:
        layout: the project (the registry and DVC's cache are read).
        artifact: the registry's artifact name.
        version: a registered version.
        fmt: ``gguf`` (f16, and Q8_0), ``adapter`` (the LoRA adapter) or ``merged`` (safetensors).
        out: the destination; it must not exist or be an empty directory.

    Returns:
        ``{"out", "files": {name: bytes}, "source"}``.

    Raises:
        RegistryError: unknown version, or its files (or the adapter/merged model it came
            from) cannot be restored or fail the sha256 check.
        ExportError: `out` is not empty, the version has no record of its adapter and merged
            model, or the architecture or tokenizer cannot go to GGUF.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty directory; choose a new folder")
    reg = Registry(layout, artifact)
    record = reg.record(version)
    card = reg.card(version)
    with _component(layout, record, "adapter" if fmt == "adapter" else "merged") as (src, source):
        with atomic_dir(out) as tmp:
            if fmt == "gguf":
                name = f"{artifact}-{version}"
                write_gguf(src, tmp / f"{name}-f16.gguf", "f16", name)
                write_gguf(src, tmp / f"{name}-q8_0.gguf", "q8_0", name)
            else:
                for f in sorted(src.rglob("*")):
                    if f.is_file() and f.relative_to(src) != Path(CARD):  # peft's own README is a stub
                        (tmp / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, tmp / f.relative_to(src))
            (tmp / CARD).write_text(card, encoding="utf-8")
            sums = dir_manifest(tmp)
            (tmp / SUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log.info("exported %s %s as %s to %s (from %s)", artifact, version, fmt, out, source)
    return {"out": str(out), "files": files, "source": source}


@contextlib.contextmanager
def _component(layout: Layout, record: dict[str, Any], name: str) -> Iterator[tuple[Path, str]]:
    """The version's adapter or merged model, checked against the sha256 recorded with the version.

    The version's own (served) files are checked too: a damaged version is refused whatever is
    exported of it.
    """
    with artifacts.verified_files(layout.root, record) as own:
        if record.get("variant") == name:
            yield own
            return
        comp = (record.get("components") or {}).get(name)
        if comp is None:
            raise ExportError(f"{record['artifact']} {record['version']} was registered without a record of its "
                              f"{name} (before phiops recorded it with each version): its files cannot be checked "
                              "against the registry, so they are not exported")
        # The same check as the served files: the working tree's copy when byte-identical, else
        # DVC's at the version's tag (the dvc.lock registered with it), refused if it differs.
        with artifacts.verified_files(layout.root, {**record, **comp}) as found:
            yield found


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def _arch(config: Any) -> Any:
    import gguf

    archs = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3}
    names = list(getattr(config, "architectures", None) or [])
    if len(names) != 1 or names[0] not in archs:
        raise ExportError(f"architecture {names or config.model_type} cannot be exported to GGUF by phiops "
                          f"(supported: {', '.join(archs)}); export --format merged and convert it with llama.cpp")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"RoPE scaling {rope.get('rope_type')!r} is not exported to GGUF by phiops (llama.cpp "
                          "needs its factors as extra tensors); export --format merged and convert it with llama.cpp")
    return archs[names[0]]


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k row permutation (HF's rotate-half RoPE layout -> GGML's); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level(pre: dict[str, Any] | None) -> bool:
    """Does a tokenizer.json pre-tokenizer map bytes to GPT-2's byte alphabet?"""
    return bool(pre) and (pre.get("type") == "ByteLevel" or any(_byte_level(p) for p in pre.get("pretokenizers") or []))


def _tokenizer(writer: Any, model_dir: Path, n_vocab: int) -> None:
    """tokenizer.ggml.*: as llama.cpp's _set_vocab_gpt2 (byte-level BPE) or _set_vocab_llama_hf (byte fallback)."""
    import gguf
    from transformers import AutoTokenizer

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if spec["model"].get("type") != "BPE":
        raise ExportError(f"{model_dir}: a {spec['model'].get('type')} tokenizer cannot be exported to GGUF by phiops")
    # Byte-level first: the embedded model's tokenizer.json (rebuilt by transformers from a GGUF)
    # also says byte_fallback, but its vocabulary is byte-level and holds no <0xNN> tokens.
    if not _byte_level(spec.get("pre_tokenizer")):
        vocab = gguf.LlamaHfVocab(model_dir)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    chkhsh = hashlib.sha256(str(tok.encode(_CHKTXT)).encode()).hexdigest()
    if chkhsh not in _BPE_PRE:
        raise ExportError(f"{model_dir}: its BPE pre-tokenizer (llama.cpp check hash {chkhsh}) is not one phiops "
                          f"knows ({', '.join(_BPE_PRE.values())}); export --format merged and convert it with llama.cpp")
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_BPE_PRE[chkhsh])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def write_gguf(model_dir: Path, path: Path, dtype: Literal["f16", "q8_0"], name: str) -> None:
    """Write the safetensors checkpoint `model_dir` as one llama.cpp GGUF file.

    Norms stay f32 (as llama.cpp writes them); 2-D weights become f16, or Q8_0 where a row
    divides into Q8_0's 32-value blocks (else f16, as llama.cpp falls back).

    Raises:
        ExportError: an architecture, RoPE scaling, tokenizer or tensor phiops cannot map.
    """
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoConfig

    from phiops.models import check_safetensors

    check_safetensors(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    arch = _arch(config)
    n_head, n_kv, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // n_head
    rope = dict(config.rope_parameters or {})
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    w.add_vocab_size(config.vocab_size)
    if arch == gguf.MODEL_ARCH.PHI3:
        w.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                        or config.max_position_embeddings)
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * hidden) // n_head)
        w.add_sliding_window(getattr(config, "sliding_window", None) or 0)  # 0 marks Phi-4 in llama.cpp
    else:
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    _tokenizer(w, model_dir, config.vocab_size)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp reads the embedding matrix for the output
                gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"{shard.name}: tensor {key} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
                data = f.get_tensor(key).float().numpy()
                if arch == gguf.MODEL_ARCH.LLAMA and key.endswith(("q_proj.weight", "k_proj.weight")):
                    data = _permute(data, n_head if key.endswith("q_proj.weight") else n_kv)
                if data.ndim == 1:
                    w.add_tensor(gguf_name, data.astype(np.float32))
                    continue
                if dtype == "q8_0":
                    try:
                        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                        w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                        continue
                    except gguf.quants.QuantError:
                        log.info("%s: rows of %d do not divide into Q8_0 blocks, kept f16", key, data.shape[-1])
                w.add_tensor(gguf_name, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


__all__ = ["ExportError", "FORMATS", "export", "write_gguf"]
