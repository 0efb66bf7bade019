"""Where a QLoRA step's time goes on a Phi-3-mini shape: a diagnostic for the train benchmark.

    python bench/qlora_profile.py --tokenizer DIR --out OUT.json [--tiny]

Builds the Phi-3-mini shape with random weights, loads it the way the train stage does (NF4,
double quantization, bf16 compute, `prepare_model_for_kbit_training`), wraps LoRA r=16 on the
fused projections, then times forward+backward (no optimizer) over a grid of micro-batch
shapes with and without gradient checkpointing, one 4-bit linear layer alone (dequantize vs
matmul), and prints a profiler table for one shape. Every section is independent: one that
fails records its error and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from _common import machine, versions  # noqa: E402

from phiops import config, lora, models  # noqa: E402


def _env() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("flash_attn", "liger_kernel", "torch.nn.attention.varlen"):
        try:
            __import__(name)
            out[name] = True
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            out[name] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        import bitsandbytes as bnb
        from bitsandbytes import cextension

        out["bnb_lib"] = str(getattr(cextension, "BNB_BACKEND", "")) + " " + str(getattr(cextension.lib, "_name", cextension.lib))
        out["bnb_version"] = bnb.__version__
    except Exception as exc:  # noqa: BLE001
        out["bnb_lib"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


DEV = "cuda"


def _sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def _time(fn, warm: int = 2, iters: int = 5) -> float:
    for _ in range(warm):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - t) / iters


def linear_micro(tiny: bool) -> dict[str, Any]:
    """One NF4 linear (3072 -> 9216, qkv-sized): dequantize alone, forward, forward+backward."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    i, o = (64, 192) if tiny else (3072, 9216)
    lin = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True).to(DEV)
    w = lin.weight
    res: dict[str, Any] = {"shape": [i, o]}
    res["dequant_ms"] = round(_time(lambda: F.dequantize_4bit(w.data, w.quant_state)) * 1e3, 3)
    dense = torch.nn.Linear(i, o, bias=False, dtype=torch.bfloat16, device=DEV)
    for t in (512, 2048, 8192):
        x = torch.randn(t, i, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        res[f"nf4_fwd_ms_T{t}"] = round(_time(lambda: lin(x)) * 1e3, 3)
        res[f"bf16_fwd_ms_T{t}"] = round(_time(lambda: dense(x)) * 1e3, 3)
        res[f"nf4_fwdbwd_ms_T{t}"] = round(_time(lambda: lin(x).sum().backward()) * 1e3, 3)
    return res


def build_model(work: Path, tokenizer: Path, tiny: bool, gc: bool, attn: str = "sdpa") -> Any:
    from peft import LoraConfig, get_peft_model

    from phiops.stages.train import _load_base

    cfgd = config.load(ROOT / "configs/phi-3-mini.yaml").dump()
    arch = dict(cfgd["model"]["architecture"])
    if tiny:
        arch.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)
    base = work / "base"
    if not (base / "config.json").exists():
        models.tiny_random(arch, base, tokenizer, dtype="bfloat16", device=DEV)
    cfgd["model"]["base"] = str(base)
    cfgd["model"]["chat_template"] = "auto"
    cfgd["train"]["gradient_checkpointing"] = gc
    cfg = config.parse(cfgd)
    model, _ = _load_base(cfg, str(base), DEV)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    targets = lora.resolve_targets(model.config.model_type, "auto")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _sync()
    return model


def step_grid(model: Any, shapes: list[tuple[int, int]], vocab: int) -> dict[str, Any]:
    import torch

    out = {}
    for bs, seqlen in shapes:
        key = f"b{bs}xL{seqlen}"
        try:
            ids = torch.randint(3, vocab, (bs, seqlen), device=DEV)
            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def step() -> None:
                with torch.autocast(DEV, dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()

            s = _time(step, warm=2, iters=4)
            out[key] = {"s": round(s, 4), "tok_s": round(bs * seqlen / s, 1),
                        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEV == "cuda" else None}
        except Exception as exc:  # noqa: BLE001
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(key, out[key], flush=True)
    return out


def packed(model: Any, rows: int, seqlen: int, vocab: int) -> dict[str, Any]:
    """One padding-free micro-batch (rows x seqlen tokens in one sequence): SDPA with the
    block-diagonal mask transformers builds vs phiops' varlen kernel; same loss expected."""
    import torch

    from phiops import attention

    attention.register()
    n = rows * seqlen
    ids = torch.randint(3, vocab, (1, n), device=DEV)
    pos = torch.arange(seqlen, device=DEV).repeat(rows)[None]
    cu = torch.arange(0, n + 1, seqlen, device=DEV, dtype=torch.int32)
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=seqlen, max_length_k=seqlen)
    out: dict[str, Any] = {}
    for impl in ("sdpa", attention.NAME):
        model.set_attn_implementation(impl)
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step() -> float:
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False, **kw).loss
            loss.backward()
            return loss

        s = _time(step, warm=2, iters=4)
        out[impl] = {"s": round(s, 4), "tok_s": round(n / s, 1), "loss": float(step()),
                     "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEV == "cuda" else None}
        print(impl, out[impl], flush=True)
    model.set_attn_implementation("sdpa")
    return out


def liger(model: Any, shapes: list[tuple[int, int]], vocab: int) -> dict[str, Any]:
    """Liger's RMSNorm, SwiGLU and RoPE kernels patched into the same model instance."""
    from liger_kernel.transformers import apply_liger_kernel_to_phi3

    apply_liger_kernel_to_phi3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                               fused_linear_cross_entropy=False, model=model.get_base_model())
    return step_grid(model, shapes, vocab)


def profile(model: Any, bs: int, seqlen: int, vocab: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile as prof

    ids = torch.randint(3, vocab, (bs, seqlen), device=DEV)

    def step() -> None:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    step()
    _sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with prof(activities=acts) as p:
        for _ in range(2):
            step()
        _sync()
    ka = p.key_averages()
    return (ka.table(sort_by="cuda_time_total" if DEV == "cuda" else "cpu_time_total", row_limit=25, max_name_column_width=60)
            + "\n" + ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-profile"))
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    import torch

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"

    res: dict[str, Any] = {"machine": machine(), "versions": versions(("torch", "transformers", "peft", "bitsandbytes",
                                                                        "liger_kernel", "trl")), "env": _env()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(res["env"]), flush=True)

    def section(name: str, fn) -> Any:
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001
            res[name] = {"error": traceback.format_exc()[-1500:]}
        print(f"== {name} ({time.perf_counter() - t:.1f}s)", json.dumps(res[name])[:1500], flush=True)
        a.out.write_text(json.dumps(res, indent=1))

    section("linear_micro", lambda: linear_micro(a.tiny))
    vocab = 32064 if not a.tiny else 1000
    shapes = [(1, 384), (4, 384), (16, 512), (8, 2048)] if not a.tiny else [(1, 32), (2, 32)]
    model = build_model(a.workdir, a.tokenizer, a.tiny, gc=True)
    section("grid_gc_on", lambda: step_grid(model, shapes, vocab))
    prof_txt = profile(model, 4, 384 if not a.tiny else 32, vocab)
    (a.out.parent / "profile.txt").write_text(prof_txt)
    print(prof_txt[:9000], flush=True)
    section("packed_gc_on", lambda: packed(model, 16, 384 if not a.tiny else 16, vocab))
    model.gradient_checkpointing_disable()
    section("grid_gc_off", lambda: step_grid(model, shapes, vocab))
    section("packed_gc_off", lambda: packed(model, 16, 384 if not a.tiny else 16, vocab))
    section("liger_gc_off", lambda: liger(model, shapes[1:3], vocab))
    a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
