"""What `phiops export --format gguf` costs on the embedded model: time and size of each GGUF, and how close it stays.

    python bench/export_gguf.py --out bench/results/export_gguf_cpu.json

SmolLM2-135M-Instruct (the builtin, fp32 safetensors from `phiops model fetch`) written by
`phiops.export.write_gguf` as f16 and as Q8_0, each timed over `--rounds` writes (the median
is reported), then loaded back by transformers' GGUF loader: the max |logit difference| from
the fp32 checkpoint on a fixed batch of test-like prompts, and how often the next-token argmax
agrees. The checkpoint's own size is recorded as the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, versions

PROMPTS = ["Classify this support ticket as JSON with category, priority and product: "
           "'My Nimbus router drops the wifi every hour since the firmware update.'",
           "Order 1234 was charged twice on the Atlas plan; please refund one of the payments."]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from phiops.export import write_gguf
    from phiops.models import ensure_builtin, load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    src = ensure_builtin()
    tok = load_tokenizer(src)  # its pad token is EOS
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(**batch).logits
    result = {"model": "SmolLM2-135M-Instruct (builtin, fp32 safetensors)",
              "checkpoint_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
              "torch_threads": torch.get_num_threads(), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f16", "q8_0"):
            path = Path(tmp) / f"smollm2-{dtype}.gguf"
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                write_gguf(src, path, dtype, "smollm2-135m-instruct")
                times.append(time.perf_counter() - t0)
            with torch.no_grad():
                got = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()(**batch).logits
            result["variants"][dtype] = {
                "write_s_median": round(statistics.median(times), 2), "write_s": [round(t, 2) for t in times],
                "bytes": path.stat().st_size,
                "size_vs_checkpoint": round(path.stat().st_size / result["checkpoint_bytes"], 4),
                "max_abs_logit_diff": round(float((got - want).abs()[mask].max()), 5),
                "max_abs_logit": round(float(want.abs()[mask].max()), 3),
                "argmax_agreement": round(float((got.argmax(-1) == want.argmax(-1))[mask].float().mean()), 4),
                "tokens_compared": int(mask.sum()),
            }
            print(dtype, json.dumps(result["variants"][dtype]))
    result.update(machine=machine(), versions=versions(("torch", "transformers", "gguf", "numpy", "safetensors")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
