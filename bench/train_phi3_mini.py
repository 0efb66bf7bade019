"""QLoRA training throughput on Phi shapes: the seed recipe vs phiops' train stage, with ablations.

    python bench/train_phi3_mini.py --tokenizer DIR --out bench/results/train_phi3_mini_h100.json \
        --variants seed,phiops,phiops-padded,phiops-accum,phiops-b16,phiops-liger,phiops-upcast,phiops-no-gc
    python bench/train_phi3_mini.py --preset phi-4-mini ...       # other public shapes
    python bench/train_phi3_mini.py --variants phiops,phiops-ddp2 --rows 512 ...   # 2 GPUs: DDP scaling

A preset's public shape (configs/<preset>.yaml) with random bf16 weights, built on the GPU and
saved once; each variant then runs in its own process (peak memory is its own), loading that
checkpoint in 4-bit NF4 with double quantization and bf16 compute through the train stage's own
`_load_base`, LoRA r=16 alpha=16 dropout 0.05, paged 8-bit AdamW, constant lr with warmup:

* `seed`: the seed recipe, literally: transformers `Trainer`, batch 1 x grad accum 8, gradient
  checkpointing, peft's `prepare_model_for_kbit_training`, rows padded per batch (batch 1: no
  padding), no packing, and the seed's Llama-style target list (on Phi-3 only o_proj and
  down_proj match).
* `phiops`: `phiops.stages.train.run` with the preset as is: TRL's SFTTrainer, padding-free
  micro-batches of 32 rows through PyTorch's varlen flash kernel (`phiops.attention`), Liger's
  kernels where installed, norms and lm_head left in bf16, gradient checkpointing, targets
  resolved from the architecture (qkv/o/gate_up/down), one crash-safe checkpoint on the way
  (its cost is recorded apart).
* ablations, each `phiops` with one thing changed (VARIANTS below): `-padded` (SDPA, rows
  padded to the longest of the micro-batch), `-accum` (micro-batch 4 x accum 8: the same rows
  per step), `-b16` (micro-batch 16), `-no-liger` / `-liger` (Liger's RMSNorm/SwiGLU/RoPE kernels
  off / required; the preset's `auto` turns them on where liger-kernel is installed), `-upcast`
  (peft's fp32 norms/embeddings/lm_head), `-no-gc` (no gradient checkpointing);
  `-ddp2`: the preset on 2 GPUs under
  `accelerate launch` (DDP), for the scaling factor against `phiops` in the same run.

Rows are random token ids (ids < vocab), lengths log-normal with median 256 and mean 380 (the
issue's law; clipped to 16..2048), the first 60 % of each row masked as the prompt, the same rows
for every variant. Random weights measure speed and memory, not quality; the loss compared is
the eval loss on 8 held-out rows after every variant has seen the same rows.

Throughput is steady state: real (non-pad) tokens of the optimizer steps after the first two,
over their wall time. MFU counts model FLOPs per token, 6N (a full training step) and 4N (LoRA
on a frozen base: forward 2N, backward to the activations 2N; recompute not counted), N the
parameters of the linear layers and lm_head, against 989 TFLOP/s dense bf16 (H100 SXM).

`--tiny` shrinks everything for a CPU smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from _common import machine, versions  # noqa: E402  (bench/, the script's own folder)

from phiops import config, models  # noqa: E402
from phiops.io import write_json, write_jsonl  # noqa: E402
from phiops.paths import Layout  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16 (H200: same compute)
# The seed recipe's LoRA target list (Llama names): on Phi-3's fused projections only o_proj and
# down_proj match, which is what the seed trained.
MAX_LEN = 2048  # rows are clipped here (and format.max_length is set to it)
SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Each variant is the phi-3-mini preset with overrides (dotted keys); `seed` is its own recipe.
VARIANTS: dict[str, dict[str, Any]] = {
    "seed": {},
    "phiops": {},
    "phiops-no-liger": {"train.liger": False},
    "phiops-liger": {"train.liger": True},
    "phiops-padded": {"train.padding_free": False, "train.attention": "sdpa"},
    "phiops-accum": {"train.batch_size": 4, "train.grad_accum": 8},
    "phiops-upcast": {"train.qlora.upcast_non_quantized": True},
    "phiops-no-gc": {"train.gradient_checkpointing": False},
    "phiops-b16": {"train.batch_size": 16},
    "phiops-ddp2": {},  # the preset under `accelerate launch --num_processes 2` (DDP)
}


def _versions() -> dict[str, str | None]:
    return versions(("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets"))


def _preset(name: str) -> Path:
    return ROOT / "configs" / f"{name}.yaml"


def _arch(preset: str, tiny: bool) -> dict[str, Any]:
    arch = dict(config.load(_preset(preset)).model.architecture)
    if tiny:
        arch.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)
    return arch


def build(work: Path, tokenizer: Path, preset: str, tiny: bool, rows: int, seed: int) -> dict[str, Any]:
    """Random-weight checkpoint and a processed train/test split under `work`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.perf_counter()
    arch = _arch(preset, tiny)
    models.tiny_random(arch, work / "base", tokenizer, seed=seed, dtype="bfloat16",
                       device="cuda" if torch.cuda.is_available() else "cpu")
    cfg = AutoConfig.for_model(arch["model_type"], **{k: v for k, v in arch.items() if k != "model_type"})
    with torch.device("meta"):  # parameter counts for MFU, without a second copy of the weights
        model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())

    rng = random.Random(seed)
    max_len = MAX_LEN if not tiny else 128

    def row() -> dict[str, list[int]]:
        # The length law: log-normal with median 256 and mean 380 (sigma^2/2 = ln(380/256)).
        n = max(16, min(max_len, int(rng.lognormvariate(math.log(256), 0.889) * (1 if not tiny else 0.1))))
        ids = [rng.randrange(3, cfg.vocab_size) for _ in range(n)]
        ids[-1] = 2  # end of turn, trained like the format stage trains it
        cut = int(n * 0.6)
        return {"input_ids": ids, "labels": [-100] * cut + ids[cut:]}

    layout = Layout(work)
    write_jsonl(layout.train_split, (row() for _ in range(rows)))
    write_jsonl(layout.test_split, (row() for _ in range(8)))
    lengths = sorted(len(json.loads(x)["input_ids"]) for x in layout.train_split.read_text().splitlines())
    return {"preset": preset, "build_seconds": round(time.perf_counter() - t0, 1), "params_total": total,
            "params_linear": linear, "rows": rows, "row_tokens_mean": round(sum(lengths) / len(lengths), 1),
            "row_tokens_median": lengths[len(lengths) // 2], "row_tokens_max": lengths[-1],
            "tokens_total": sum(lengths)}


def _cfg(work: Path, preset: str, variant: str, steps: int, tiny: bool) -> config.Params:
    data = config.load(_preset(preset)).dump()
    data["model"]["base"] = str(work / "base")
    data["model"]["chat_template"] = "auto"
    data["format"]["max_length"] = MAX_LEN
    t = data["train"]
    # One log line and no periodic eval inside the timed steps (eval runs every 5 x logging_steps);
    # one checkpoint half way, timed apart from the steps.
    t.update(max_steps=steps, logging_steps=steps, save_steps=max(steps // 2, 1), warmup_steps=2)
    for key, value in VARIANTS[variant].items():
        *path, leaf = key.split(".")
        node = data
        for part in path:
            node = node[part]
        node[leaf] = value
    if tiny:
        t.update(device="cpu")
    return config.parse(data)


def _rows_per_step(cfg: config.Params, variant: str) -> int:
    if variant == "seed":
        return 8
    return cfg.train.batch_size * cfg.train.grad_accum * (2 if variant == "phiops-ddp2" else 1)


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


def run_variant(work: Path, preset: str, variant: str, rows: int, tiny: bool) -> dict[str, Any]:
    import torch

    from phiops.stages import train

    layout = Layout(work / variant)
    cfg = _cfg(work, preset, variant, 1, tiny)
    steps = rows // _rows_per_step(cfg, variant)
    cfg = _cfg(work, preset, variant, steps, tiny)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    timer = _timer()
    t0 = time.perf_counter()
    if variant.startswith("phiops"):
        train.run(cfg, layout, callbacks=[timer])
        if int(os.environ.get("RANK", "0")) != 0:  # DDP: rank 0 writes the report and prints
            return {}
        report = json.loads(layout.train_report.read_text())
    else:
        report = _seed(cfg, layout, device, timer)
    out = {"wall_seconds": round(time.perf_counter() - t0, 1), "steady": _steady(timer),
           "checkpoint_save_seconds": {s: round(d, 2) for s, d in timer.saves}, "report": report,
           "rows_per_step": _rows_per_step(cfg, variant), "overrides": VARIANTS[variant]}
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
    # The seed's QLoRA load: peft's prepare_model_for_kbit_training (fp32 norms, embeddings, lm_head).
    seed_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "qlora": cfg.train.qlora.model_copy(update={"upcast_non_quantized": True}), "gradient_checkpointing": True})})
    model, nf4 = _load_base(seed_cfg, cfg.model.base, device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=SEED_TARGETS,
                                             task_type="CAUSAL_LM"))
    per_module = lora.trainable_by_module(model)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(layout.train_split)]
    evals = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(layout.test_split)]
    steps = cfg.train.max_steps
    args = TrainingArguments(
        output_dir=str(layout.root / "seed-out"), per_device_train_batch_size=1, gradient_accumulation_steps=8,
        learning_rate=cfg.train.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=2, max_steps=steps,
        logging_steps=steps, save_strategy="no", report_to=[], seed=cfg.train.seed, optim="paged_adamw_8bit" if nf4 else "adamw_torch",
        bf16=device == "cuda", gradient_checkpointing=True, use_cpu=device == "cpu", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(evals),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100), callbacks=[timer])
    result = trainer.train()
    final_eval = trainer.evaluate()
    return {"steps": trainer.state.global_step, "train_loss": round(result.training_loss, 4),
            "eval_loss": round(final_eval["eval_loss"], 4), "tokens_seen": trainer.state.num_input_tokens_seen,
            "base_4bit_nf4": nf4, "trainable_params_by_module": per_module,
            "trainable_params": sum(per_module.values()), "lora_targets": SEED_TARGETS}


def _child(a: argparse.Namespace, variant: str) -> list[str]:
    args = [__file__, "--tokenizer", str(a.tokenizer), "--out", os.devnull, "--workdir", str(a.workdir),
            "--rows", str(a.rows), "--preset", a.preset, "--variant", variant] + (["--tiny"] if a.tiny else [])
    if variant == "phiops-ddp2":  # one process per GPU; NCCL's NVLS stays off as the host requires
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return [sys.executable, *args]


def _summary(result: dict[str, Any]) -> None:
    ok = {k: v for k, v in result["variants"].items() if "steady" in v}
    if "seed" in ok:
        seed = ok["seed"]
        result["vs_seed"] = {k: {
            "tokens_per_s": round(v["steady"]["tokens_per_s"] / seed["steady"]["tokens_per_s"], 2),
            "peak_memory": round(v["peak_gpu_memory_bytes"] / seed["peak_gpu_memory_bytes"], 2)
            if "peak_gpu_memory_bytes" in v else None,
            "eval_loss": round(v["report"]["eval_loss"] / seed["report"]["eval_loss"], 4),
        } for k, v in ok.items()}
    if "phiops" in ok and "phiops-ddp2" in ok:
        result["ddp2_scaling"] = round(ok["phiops-ddp2"]["steady"]["tokens_per_s"] / ok["phiops"]["steady"]["tokens_per_s"], 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="phi-3-mini", help="a configs/ preset: phi-3-mini, phi-4-mini, phi-4")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/phiops-train-bench"))
    p.add_argument("--rows", type=int, default=192, help="train rows, the same for every variant")
    p.add_argument("--variants", default="seed,phiops")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process: run one variant, print its JSON
    a = p.parse_args(argv)
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    if a.variant:
        r = run_variant(a.workdir, a.preset, a.variant, a.rows, a.tiny)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(r), flush=True)
        return 0

    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    result: dict[str, Any] = {
        "benchmark": f"QLoRA training throughput, {a.preset} shape, random weights: seed recipe vs phiops train stage",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(), "versions": _versions(), "variants": {},
    }
    result["data_and_model"] = build(a.workdir, a.tokenizer, a.preset, a.tiny, a.rows, seed=0)
    write_json(a.out, result)
    n = result["data_and_model"]["params_linear"]
    for v in a.variants.split(","):
        layout = Layout(a.workdir / v)  # prepared here, once, also when the variant runs as 2 processes
        shutil.copytree(Layout(a.workdir).processed, layout.processed, dirs_exist_ok=True)
        env = dict(os.environ)
        if v != "phiops-ddp2":  # one process on one GPU (SFTTrainer refuses DataParallel over several)
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        proc = subprocess.run(_child(a, v), capture_output=True, text=True, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            result["variants"][v] = {"error": (proc.stderr or proc.stdout)[-3000:]}
            print(proc.stderr[-3000:], file=sys.stderr)
        else:
            r = json.loads(lines[-1][7:])
            tps = r["steady"]["tokens_per_s"]
            # Model FLOPs per token: 6N counts a full training step; 4N what LoRA on a frozen base
            # must do (no weight gradients for the base). Recompute is not counted in either.
            r["mfu_6n"] = round(tps * 6 * n / PEAK_BF16_FLOPS, 4)
            r["mfu_4n"] = round(tps * 4 * n / PEAK_BF16_FLOPS, 4)
            result["variants"][v] = r
        _summary(result)
        write_json(a.out, result)  # kept after each variant: a run cut short keeps what finished
        print(v, json.dumps(result["variants"][v])[:400], flush=True)
    _summary(result)
    write_json(a.out, result)
    print(json.dumps({k: result.get(k) for k in ("vs_seed", "ddp2_scaling")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
