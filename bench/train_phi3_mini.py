"""QLoRA training throughput on a Phi-3-mini-shaped model: the seed recipe vs phiops' train stage.

    python bench/train_phi3_mini.py --tokenizer DIR --out bench/results/train_phi3_mini_h100.json

Phi-3-mini-4k-instruct's public shape (configs/phi-3-mini.yaml) with random bf16 weights, built
on the GPU and saved once; each variant then runs in its own process (peak memory is its own),
loading that checkpoint in 4-bit NF4 with double quantization and bf16 compute through the train
stage's own `_load_base`, LoRA r=16 alpha=16 dropout 0.05 on qkv/o/gate_up/down:

* `seed`: the seed recipe: transformers `Trainer`, batch 1 x grad accum 8, gradient
  checkpointing, paged 8-bit AdamW, rows padded per batch (batch 1: no padding), no packing.
* `phiops`: `phiops.stages.train.run` with the phi-3-mini preset as is (batch 4 x grad accum 4,
  padding-free batches through TRL's SFTTrainer, gradient checkpointing, paged 8-bit AdamW),
  one crash-safe checkpoint on the way (its cost is recorded).
* `phiops-padded`: the same with `train.padding_free: false`: what padding-free buys.

Rows are random token ids (ids < vocab) with lengths drawn from a log-normal (median 300,
clipped to 32..1024, format.max_length of the preset) and the first 60 % of each row masked
as the prompt, the same rows for every variant. Random weights measure speed and memory, not
quality.

Throughput is steady state: real (non-pad) tokens of the optimizer steps after the first two,
over their wall time. MFU counts model FLOPs of LoRA training on a frozen base, 4 x N per token
(forward 2N, backward to the activations 2N; no weight gradients for the base; the gradient
checkpointing recompute is not counted), N the parameters of the linear layers and lm_head
(embeddings cost no FLOPs; attention scores add ~1 % at these lengths and are left out), against
989 TFLOP/s dense bf16 (H100 SXM; the H200 has the same compute).

`--tiny` shrinks everything for a CPU smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _common import machine, versions  # noqa: E402  (bench/, the script's own folder)

from phiops import config, models  # noqa: E402
from phiops.io import write_json, write_jsonl  # noqa: E402
from phiops.paths import Layout  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16 (H200: same compute)
VARIANTS = ("seed", "phiops", "phiops-padded")


def _versions() -> dict[str, str | None]:
    return versions(("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets"))


def _arch(tiny: bool) -> dict[str, Any]:
    arch = dict(config.load(ROOT / "configs/phi-3-mini.yaml").model.architecture)
    if tiny:
        arch.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)
    return arch


def build(work: Path, tokenizer: Path, tiny: bool, rows: int, seed: int) -> dict[str, Any]:
    """Random-weight checkpoint and a processed train/test split under `work`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    arch = _arch(tiny)
    models.tiny_random(arch, work / "base", tokenizer, seed=seed, dtype="bfloat16",
                       device="cuda" if torch.cuda.is_available() else "cpu")
    cfg = AutoConfig.for_model(arch["model_type"], **{k: v for k, v in arch.items() if k != "model_type"})
    with torch.device("meta"):  # parameter counts for MFU, without a second copy of the weights
        model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())

    rng = random.Random(seed)
    max_len = 1024 if not tiny else 128

    def row() -> dict[str, list[int]]:
        n = max(32, min(max_len, int(rng.lognormvariate(5.7, 0.5) * (1 if not tiny else 0.2))))
        ids = [rng.randrange(3, cfg.vocab_size) for _ in range(n)]
        ids[-1] = 2  # end of turn, trained like the format stage trains it
        cut = int(n * 0.6)
        return {"input_ids": ids, "labels": [-100] * cut + ids[cut:]}

    layout = Layout(work)
    write_jsonl(layout.train_split, (row() for _ in range(rows)))
    write_jsonl(layout.test_split, (row() for _ in range(8)))
    lengths = [len(json.loads(x)["input_ids"]) for x in layout.train_split.read_text().splitlines()]
    return {"build_seconds": round(time.perf_counter() - t0, 1), "params_total": total, "params_linear": linear,
            "rows": rows, "row_tokens_mean": round(sum(lengths) / len(lengths), 1), "row_tokens_max": max(lengths)}


def _cfg(work: Path, variant: str, steps: int, tiny: bool) -> config.Params:
    data = config.load(ROOT / "configs/phi-3-mini.yaml").dump()
    data["model"]["base"] = str(work / "base")
    data["model"]["chat_template"] = "auto"
    t = data["train"]
    # One log line and no periodic eval inside the timed steps (eval runs every 5 x logging_steps);
    # one checkpoint half way, timed apart from the steps.
    t.update(max_steps=steps, logging_steps=steps, save_steps=max(steps // 2, 1), warmup_steps=2)
    # Explicit both ways (the preset's `auto` picks padding-free only with flash-attention).
    t["padding_free"] = variant != "phiops-padded"
    if tiny:
        t.update(device="cpu")
    return config.parse(data)


def _timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.step_end: list[tuple[int, float, int]] = []  # (step, time, tokens seen)
            self.saves: list[tuple[int, float]] = []  # (step, seconds the checkpoint took)

        def on_step_end(self, args, state, control, **kw):
            self.step_end.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

        def on_save(self, args, state, control, **kw):
            self.saves.append((state.global_step, time.perf_counter() - self.step_end[-1][1]))

    return Timer()


def _steady(timer: Any, skip: int = 2) -> dict[str, Any]:
    (s0, t0, k0), (s1, t1, k1) = timer.step_end[skip - 1], timer.step_end[-1]
    ckpt = sum(d for s, d in timer.saves if s0 <= s < s1)  # checkpoint writes are reported apart
    sec = t1 - t0 - ckpt
    return {"steps_timed": s1 - s0, "seconds": round(sec, 3), "checkpoint_seconds_excluded": round(ckpt, 2),
            "tokens": k1 - k0, "tokens_per_s": round((k1 - k0) / sec, 1), "seconds_per_step": round(sec / (s1 - s0), 3)}


def run_variant(work: Path, variant: str, steps: int, tiny: bool) -> dict[str, Any]:
    import torch

    from phiops.stages import train

    layout = Layout(work / variant)
    (layout.root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(Layout(work).processed, layout.processed, dirs_exist_ok=True)
    cfg = _cfg(work, variant, steps, tiny)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    timer = _timer()
    t0 = time.perf_counter()
    if variant.startswith("phiops"):
        train.run(cfg, layout, callbacks=[timer])
        report = json.loads(layout.train_report.read_text())
    else:
        report = _seed(cfg, layout, device, timer)
    out = {"wall_seconds": round(time.perf_counter() - t0, 1), "steady": _steady(timer),
           "checkpoint_save_seconds": {s: round(d, 2) for s, d in timer.saves}, "report": report,
           "rows_per_step": cfg.train.batch_size * cfg.train.grad_accum if variant != "seed" else 8}
    if device == "cuda":
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_gpu_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def _seed(cfg: config.Params, layout: Layout, device: str, timer: Any) -> dict[str, Any]:
    """The seed recipe: batch 1 x accum 8, plain Trainer, padded collator, paged 8-bit AdamW."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from phiops import lora, models
    from phiops.io import read_jsonl
    from phiops.stages.train import _load_base

    tok = models.load_tokenizer(cfg.model.base)
    model, nf4 = _load_base(cfg, cfg.model.base, device)
    targets = lora.resolve_targets(model.config.model_type, "auto")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(layout.train_split)]
    steps = cfg.train.max_steps
    args = TrainingArguments(
        output_dir=str(layout.root / "seed-out"), per_device_train_batch_size=1, gradient_accumulation_steps=8,
        learning_rate=cfg.train.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=2, max_steps=steps,
        logging_steps=steps, save_strategy="no", report_to=[], seed=cfg.train.seed, optim="paged_adamw_8bit" if nf4 else "adamw_torch",
        bf16=device == "cuda", gradient_checkpointing=True, use_cpu=device == "cpu", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), callbacks=[timer])
    result = trainer.train()
    return {"steps": trainer.state.global_step, "train_loss": round(result.training_loss, 4),
            "tokens_seen": trainer.state.num_input_tokens_seen, "base_4bit_nf4": nf4}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/phiops-train-bench"))
    p.add_argument("--rows", type=int, default=384, help="train rows (seed: 8 a step, phiops: 16 a step)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process: run one variant, print its JSON
    a = p.parse_args(argv)

    if a.variant:
        steps = a.rows // (8 if a.variant == "seed" else 16)
        print("RESULT " + json.dumps(run_variant(a.workdir, a.variant, steps, a.tiny)), flush=True)
        return 0

    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    result: dict[str, Any] = {
        "benchmark": "QLoRA training throughput, Phi-3-mini shape, random weights: seed recipe vs phiops train stage",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(), "versions": _versions(), "variants": {},
    }
    result["data_and_model"] = build(a.workdir, a.tokenizer, a.tiny, a.rows, seed=0)
    write_json(a.out, result)
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--tokenizer", str(a.tokenizer), "--out", os.devnull, "--workdir",
               str(a.workdir), "--rows", str(a.rows), "--variant", v] + (["--tiny"] if a.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            result["variants"][v] = {"error": (proc.stderr or proc.stdout)[-3000:]}
            print(proc.stderr[-3000:], file=sys.stderr)
        else:
            r = json.loads(lines[-1][7:])
            n = result["data_and_model"]["params_linear"]
            r["mfu"] = round(r["steady"]["tokens_per_s"] * 4 * n / PEAK_BF16_FLOPS, 4)
            result["variants"][v] = r
        write_json(a.out, result)  # kept after each variant: a run cut short keeps what finished
        print(v, json.dumps(result["variants"][v])[:600], flush=True)
    ok = {k: v for k, v in result["variants"].items() if "steady" in v}
    if "seed" in ok:
        base = ok["seed"]["steady"]["tokens_per_s"]
        result["speedup_vs_seed"] = {k: round(v["steady"]["tokens_per_s"] / base, 2) for k, v in ok.items()}
    write_json(a.out, result)
    print(json.dumps({k: result.get(k) for k in ("speedup_vs_seed",)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
