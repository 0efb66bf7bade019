"""Stage `train`: LoRA / QLoRA on the formatted train split.

On CUDA the base is loaded in 4-bit NF4 with double quantization and bf16 compute (QLoRA);
on CPU it stays fp32 (bf16 measured 4-5x slower on this CPU). The loss is on assistant tokens
only (labels come from the format stage). transformers' Trainer does the loop, checkpointing
and resumption; we own the data, the targets and the reports.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiops import lora, models, templates
from phiops.config import Params
from phiops.io import atomic_dir, read_jsonl, write_json, write_text
from phiops.paths import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutputs:
    adapter: Path
    report: Path
    curve: Path


def _load_base(cfg: Params, base_path: str, device: str) -> Any:
    import torch

    use_nf4 = cfg.train.quantize_base == "nf4" or (cfg.train.quantize_base == "auto" and device == "cuda")
    if not use_nf4:
        return models.load_causal_lm(base_path, device=device), False
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # ~0.4 bit/param saved on the quantization constants
        bnb_4bit_compute_dtype=compute,
    )
    model = models.load_causal_lm(
        base_path, device=device, dtype=compute, quantization_config=bnb, device_map={"": device}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    return model, True


def run(cfg: Params, layout: Layout) -> TrainOutputs:
    """Train a LoRA adapter and save it (safetensors) at `layout.adapter`.

    Args:
        cfg: the validated params (sections `model`, `train`).
        layout: artifact paths.

    Returns:
        Paths of the adapter directory, the metrics JSON and the loss curve CSV.

    Raises:
        lora.LoraTargetError: an intended projection got no adapter.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

    t0 = time.time()
    set_seed(cfg.train.seed)
    device = models.pick_device(cfg.train.device)
    base_path = models.resolve(cfg.model.base)
    tok = models.load_tokenizer(base_path)
    templates.apply(tok, cfg.model.chat_template)  # saved with the adapter: serving renders the same
    model, nf4 = _load_base(cfg, base_path, device)

    targets = lora.resolve_targets(model.config.model_type, cfg.train.lora.targets)
    peft_cfg = LoraConfig(
        r=cfg.train.lora.r,
        lora_alpha=cfg.train.lora.alpha,
        lora_dropout=cfg.train.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    per_module = lora.verify(model, targets)
    trainable = sum(per_module.values())
    log.info("trainable parameters by module: %s (total %d)", per_module, trainable)

    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(layout.train_split)]
    train_ds = Dataset.from_list(rows)
    eval_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(layout.test_split)]
    eval_ds = Dataset.from_list(eval_rows[:64])  # a fixed slice: eval loss for the curve, not a metric
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)

    history: list[dict[str, Any]] = []

    class _Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                history.append({"step": state.global_step, **logs})

    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(
        output_dir=str(layout.checkpoints),
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.train.warmup_steps,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        logging_steps=cfg.train.logging_steps,
        eval_strategy="steps",
        eval_steps=max(cfg.train.logging_steps * 5, 1),
        save_strategy="no",
        report_to=[],
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        optim="paged_adamw_8bit" if nf4 else "adamw_torch",
        bf16=device == "cuda",
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[_Record()],
    )
    result = trainer.train()
    final_eval = trainer.evaluate()  # logged through _Record like the periodic ones

    with atomic_dir(layout.adapter) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    shutil.rmtree(layout.checkpoints, ignore_errors=True)
    layout.checkpoints.mkdir(parents=True, exist_ok=True)

    seconds = time.time() - t0
    # Rows seen x mean length: padding excluded, so this is real tokens, not padded slots.
    tokens_seen = int(trainer.state.global_step * cfg.train.batch_size * cfg.train.grad_accum * mean_len)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "device": device,
        "base_4bit_nf4": nf4,
        "trainable_params": trainable,
        "trainable_params_by_module": per_module,
        "lora_targets": targets,
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "eval_loss": round(final_eval["eval_loss"], 4),
        "tokens_seen": tokens_seen,
        "train_runtime_s": round(result.metrics["train_runtime"], 1),
        "tokens_per_s": round(tokens_seen / result.metrics["train_runtime"], 1),
        "peak_memory_bytes": peak,
        "wall_s": round(seconds, 1),
    }
    write_json(layout.train_report, report)
    write_text(layout.train_curve, _curve_csv(history))
    log.info("train: %s", json.dumps(report))
    return TrainOutputs(layout.adapter, layout.train_report, layout.train_curve)


def _curve_csv(history: list[dict[str, Any]]) -> str:
    """Loss curve for `dvc plots`: one row per logged step, train and eval columns."""
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "train_loss", "eval_loss"])
    seen = set()
    for h in history:
        row = (h["step"], h.get("loss", ""), h.get("eval_loss", ""))
        if row[1:] != ("", "") and row not in seen:  # the final eval is logged twice by Trainer
            seen.add(row)
            w.writerow(row)
    return buf.getvalue()
