"""GPTQ and AWQ (W4A16, group 128) of a Phi-3-mini-shaped model, through phiops' own quantizers.

    python bench/quantize_phi3_mini.py --tokenizer DIR --out bench/results/quantize_phi3_mini_h100.json

The model is Phi-3-mini-4k-instruct's public shape (configs/phi-3-mini.yaml: hidden 3072, 32
layers, intermediate 8192, 32 heads, vocab 32064) with random bf16 weights, built on the GPU in
code: no hub. Calibration is `--samples` rows of `--length` random token ids, read through
`quantize.calibration_dataset` like the stage reads the train split. Each method runs through
`quantize.quantize_checkpoint` with `quantize.get_quantizer(method)`, the stage's own path, and
its output is then loaded with plain transformers (safetensors only, no remote code) and made
to generate. Random weights measure time and memory, not quality.

`--merge-layers N` first runs the merge stage on CUDA (bf16) on an N-layer model of the same
width with a random LoRA adapter: the equivalence check's numbers in bf16 on a GPU.

The JSON (GPU name, package versions, per-method seconds and peak memory) is rewritten after each
step, so a run stopped by a time limit keeps what finished. `--tiny` shrinks the shape for a CPU
smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from _common import TOKENIZER_FILES, machine, versions  # noqa: E402  (bench/, the script's own folder)

from phiops import config, models  # noqa: E402
from phiops.io import write_json, write_jsonl  # noqa: E402
from phiops.stages import quantize as Q  # noqa: E402

LIMIT_S = 300  # the bound: each method within 5 minutes on one H100


def _versions() -> dict[str, str | None]:
    return versions(("torch", "transformers", "llmcompressor", "compressed-tensors", "peft", "accelerate", "datasets"))


def build_model(arch: dict[str, Any], out: Path, tokenizer: Path, seed: int) -> float:
    """Random-weight bf16 checkpoint of `arch` at `out`, built on the GPU when there is one."""
    import torch
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    models.tiny_random(arch, out, tokenizer, seed=seed, dtype="bfloat16",
                       device="cuda" if torch.cuda.is_available() else "cpu")
    gen = GenerationConfig.from_pretrained(out)
    gen.eos_token_id = [arch["eos_token_id"]]
    gen.save_pretrained(out)
    return round(time.perf_counter() - t0, 1)


def calibration(workdir: Path, vocab: int, n: int, length: int, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g).tolist()
    write_jsonl(workdir / "train.jsonl", ({"input_ids": row} for row in ids))
    return Q.calibration_dataset(workdir / "train.jsonl", n, length)


def check_output(path: Path, vocab: int) -> dict[str, Any]:
    """Load the compressed-tensors checkpoint with plain transformers and generate."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
        device_map=dev,
    )
    load_s = time.perf_counter() - t0
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    gen_s = time.perf_counter() - t0
    new = out.shape[1] - prompt.shape[1]
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    (group,) = qc["config_groups"].values()
    return {
        "loads_and_generates": new == 16,
        "new_tokens": int(new),
        "load_seconds": round(load_s, 1),
        "generate_seconds": round(gen_s, 2),
        "format": qc.get("format"),
        "num_bits": group["weights"]["num_bits"],
        "group_size": group["weights"]["group_size"],
        "ignore": qc.get("ignore"),
    }


def merge_check(arch: dict[str, Any], layers: int, workdir: Path, tokenizer: Path) -> dict[str, Any]:
    """The merge stage on this device (bf16 on CUDA) with a random LoRA adapter on an N-layer model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from phiops import lora, models
    from phiops.paths import Layout
    from phiops.stages import merge

    small = {**arch, "num_hidden_layers": layers}
    base = workdir / "merge_base"
    build_model(small, base, tokenizer, seed=1)
    layout = Layout(workdir / "merge_project")
    torch.manual_seed(2)
    model = models.load_causal_lm(base, device="cpu", dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=lora.TARGETS["phi3"]))
    with torch.no_grad():  # lora_B starts at 0 (a no-op adapter); give it a trained-like size
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.002)
    peft_model.save_pretrained(layout.adapter, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy2(tokenizer / name, layout.adapter / name)
    g = torch.Generator().manual_seed(3)
    write_jsonl(layout.test_split, ({"input_ids": torch.randint(0, arch["vocab_size"], (96,), generator=g).tolist()} for _ in range(4)))
    cfg = config.parse({"model": {"base": str(base)}})
    t0 = time.perf_counter()
    merge.run(cfg, layout)
    report = json.loads(layout.merge_report.read_text())
    return {"layers": layers, "seconds": round(time.perf_counter() - t0, 1), **report}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", type=Path, default=ROOT / "configs" / "phi-3-mini.yaml")
    ap.add_argument("--tokenizer", type=Path, required=True, help="a directory with tokenizer files (any; ids are random)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/phiops-bench"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--merge-layers", type=int, default=0, help="also run the merge stage on an N-layer model (0: skip)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 256-wide model: CPU smoke test of this script")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    arch = dict(config.load(args.preset).model.architecture)
    arch.pop("architectures", None)
    if args.tiny:
        arch.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    result: dict[str, Any] = {
        "benchmark": "quantize W4A16 (GPTQ, AWQ) of a Phi-3-mini-shaped model with random bf16 weights",
        "command": "python bench/quantize_phi3_mini.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "versions": _versions(),
        "shape": {k: arch[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                                        "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "calibration": {"samples": args.samples, "tokens_per_sample": args.length, "source": "random token ids"},
        "scheme": "W4A16", "group_size": args.group_size, "limit_seconds": LIMIT_S,
        "methods": {},
    }

    def save() -> None:
        write_json(args.out, result)

    t_all = time.perf_counter()
    if args.merge_layers:
        try:
            result["merge_check"] = merge_check(arch, args.merge_layers, args.workdir, args.tokenizer)
        except Exception as exc:
            result["merge_check"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        print("merge check:", json.dumps(result["merge_check"])[:600], flush=True)
        save()

    base = args.workdir / "base"
    result["build_seconds"] = build_model(arch, base, args.tokenizer, args.seed)
    result["base_size_bytes"] = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    calib = calibration(args.workdir, arch["vocab_size"], args.samples, args.length, args.seed)
    print(f"built {base} in {result['build_seconds']} s; calibration {len(calib)} x {args.length}", flush=True)
    save()

    for method in args.methods.split(","):
        entry: dict[str, Any] = {}
        result["methods"][method] = entry
        try:
            quantizer = Q.get_quantizer(method)
            entry["quantizer"] = {"class": type(quantizer).__name__, **quantizer.params()}
            stats = Q.quantize_checkpoint(base, args.workdir / method, quantizer, calib, scheme="W4A16", group_size=args.group_size)
            entry.update(stats)
            entry["size_ratio"] = round(stats["size_bytes"] / stats["source_size_bytes"], 4)
            entry["within_limit"] = stats["seconds"] <= LIMIT_S
            save()
            entry["check"] = check_output(args.workdir / method, arch["vocab_size"])
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-3000:]
        print(method, json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
        save()
        shutil.rmtree(args.workdir / method, ignore_errors=True)

    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    save()
    ok = all("error" not in e and e.get("check", {}).get("loads_and_generates") for e in result["methods"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
