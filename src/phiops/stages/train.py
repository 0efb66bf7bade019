"""Stage `train`: LoRA / QLoRA on the formatted train split.

On CUDA the base is loaded in 4-bit NF4 with double quantization and bf16 compute (QLoRA);
on CPU it stays fp32 (bf16 measured 4-5x slower on this CPU). The loss is on assistant tokens
only (labels come from the format stage). TRL's SFTTrainer does the loop (padding-free
batches where a flash-attention kernel makes them pay, `train.padding_free`); checkpoints are
made crash-safe by :mod:`phiops.checkpoints` and a rerun resumes from the last complete one.
We own the data, the targets, the checkpoints and the reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiops import attention, live, lm_head, lora, models, templates, torch_state
from phiops import checkpoints as ckpts
from phiops.config import Params
from phiops.io import atomic_dir, read_jsonl, sha256_file, write_json
from phiops.paths import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutputs:
    adapter: Path
    report: Path
    live: Path  # dvclive's directory: the curves and their latest values


def resolve_padding_free(setting: bool | str, model_config: Any) -> bool:
    """`train.padding_free`: as set, or (`auto`) on only with a varlen attention kernel."""
    if isinstance(setting, bool):
        return setting
    impl = str(getattr(model_config, "_attn_implementation", ""))
    return impl.startswith("flash_attention") or impl == attention.NAME


def resolve_attention(setting: str, device: str) -> str:
    """`train.attention`: as set, or (`auto`) PyTorch's varlen flash kernel on CUDA, else SDPA."""
    if setting != "auto":
        return setting
    return attention.NAME if device == "cuda" and attention.available() else "sdpa"


def resolve_liger(setting: bool | str, device: str) -> bool:
    """`train.liger`: `auto` is on with CUDA and liger-kernel; `true` demands both, loudly."""
    if setting is False:
        return False
    try:
        import liger_kernel  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    if setting == "auto":
        return device == "cuda" and installed
    if device != "cuda":
        raise ValueError("train.liger: true needs CUDA (Liger's kernels are Triton GPU kernels); set it to auto or false")
    if not installed:
        raise ValueError("train.liger: true needs liger-kernel: pip install 'phiops[gpu]'")
    return True


def _apply_liger(model: Any) -> list[str]:
    """Liger's fused RMSNorm, SwiGLU and RoPE Triton kernels, patched into this model instance.

    Its fused linear cross-entropy is left out: TRL's SFTTrainer computes the loss through its
    own fused LM head (no full logits either). RoPE is skipped for partial rotary embeddings
    (Phi-4-mini rotates 75 % of each head), which Liger's kernel does not implement. Liger also
    rebinds names in the transformers modeling module (for models built later); those are put
    back, so only this instance changes and the rest of the process keeps plain transformers.
    """
    import importlib

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    kernels = {"rms_norm": True, "swiglu": True,
               "rope": float(getattr(model.config, "partial_rotary_factor", 1.0) or 1.0) == 1.0}
    module = importlib.import_module(type(model).__module__)
    saved = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False, **kernels)
    finally:
        for name in set(vars(module)) - set(saved):
            delattr(module, name)
        for name, value in saved.items():
            if getattr(module, name, None) is not value:
                setattr(module, name, value)
    return [k for k, on in kernels.items() if on]


def _load_base(cfg: Params, base_path: str, device: str, attn: str = "sdpa") -> Any:
    import torch

    use_nf4 = cfg.train.quantize_base == "nf4" or (cfg.train.quantize_base == "auto" and device == "cuda")
    if attn == attention.NAME:
        attention.register()
    if not use_nf4:
        model = models.load_causal_lm(base_path, device=device)
        model.set_attn_implementation(attn)
        return model, False
    from transformers import BitsAndBytesConfig

    q = cfg.train.qlora
    if q.compute_dtype == "auto":
        compute = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        compute = getattr(torch, q.compute_dtype)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    model = models.load_causal_lm(
        base_path, device=device, dtype=compute, quantization_config=bnb,
        device_map={"": torch.cuda.current_device() if device == "cuda" else device},
    )
    model.set_attn_implementation(attn)
    if q.upcast_non_quantized:
        from peft import prepare_model_for_kbit_training

        # peft's recipe: norms, embeddings and lm_head to fp32 (and input grads for checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        # The base is frozen: checkpointed blocks need an input that requires grad to backprop
        # into the adapters. Norms and lm_head stay in the compute dtype (see qlora config).
        model.enable_input_require_grads()
    return model, True


def fingerprint(cfg: Params, layout: Layout) -> str:
    """What a checkpoint must share with this run to be resumed: train params, base, data.

    `save_steps` and `logging_steps` are left out: they change when state is written or
    logged, not what is learnt.
    """
    train = cfg.train.model_dump(mode="json", exclude={"save_steps", "logging_steps"})
    payload = {"train": train, "world_size": _world_size(), "base": cfg.model.base,
               "template": cfg.model.chat_template, "train_split": sha256_file(layout.train_split)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _optim(cfg: Params, nf4: bool) -> str:
    if cfg.train.optim != "auto":
        return cfg.train.optim
    return "paged_adamw_8bit" if nf4 else "adamw_torch"


def run(cfg: Params, layout: Layout, callbacks: list[Any] | None = None, *, live_metrics: bool = True) -> TrainOutputs:
    """Train a LoRA adapter and save it (safetensors) at `layout.adapter`.

    Every `train.save_steps` a complete checkpoint goes to `layout.checkpoints` (see
    :mod:`phiops.checkpoints`); a rerun after a crash resumes from the newest one of the same
    config and data. After the adapter is written the checkpoints are removed.

    Args:
        cfg: the validated params (sections `model`, `train`).
        layout: artifact paths.
        callbacks: extra `TrainerCallback`s (tests use them to slow or interrupt a run).
        live_metrics: log every logging step to dvclive (:mod:`phiops.live`); off only to
            measure what it costs (bench/dvclive_overhead.py).

    Returns:
        Paths of the adapter directory, the metrics JSON and the dvclive directory.

    Raises:
        lora.LoraTargetError: an intended projection got no adapter.
    """
    t0 = time.time()
    device = models.pick_device(cfg.train.device)
    # TF32 for what fp32 matmuls are left on CUDA (the upcast lm_head); set here and undone on
    # the way out, like every other process-wide torch flag the Trainer sets (and the current
    # GPU): evaluation, decoding and tests that run later in this process get the precision
    # they asked for.
    with torch_state.scoped(tf32=device == "cuda"):
        _bind_gpu(device)
        return _run(cfg, layout, device, t0, callbacks, live_metrics)


def _run(cfg: Params, layout: Layout, device: str, t0: float, callbacks: list[Any] | None,
         live_metrics: bool) -> TrainOutputs:
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(cfg.train.seed)  # before the adapters are built: their initial weights are random
    world = _world_size()
    built = _build_model(cfg, device)
    train_ds, eval_ds = _datasets(layout)

    ckpt_root = layout.checkpoints
    ckpt_root.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, layout)
    args = _sft_config(cfg, ckpts.staging(ckpt_root), device, world, nf4=built.nf4, padding_free=built.padding_free)
    _one_device_per_process(args, visible_gpus(device), world)
    resume = _resume_point(args, ckpt_root, fp)
    live_cb = live.callback(layout.train_live, lambda: _peak_memory(device)) if live_metrics else None
    trainer = SFTTrainer(
        model=built.model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=built.tok,
        # dvclive first: when _Progress logs a step's line, that step's live row is written (the
        # flow republishes the live table on each line).
        callbacks=[*([live_cb] if live_cb else []), *_callbacks(ckpt_root, fp, world), *(callbacks or [])],
    )
    # On CUDA TRL's head already projects only the loss positions; on CPU it projected every
    # position, prompt included (79 % of the demo's tokens): the largest cost of a CPU step.
    compact_head = device == "cpu" and lm_head.project_loss_positions_only(built.model.get_base_model())
    tokens_before = _tokens_seen(resume)
    t_train = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    train_s = time.time() - t_train
    final_eval = trainer.evaluate()  # lands in log_history like the periodic ones
    outputs = TrainOutputs(layout.adapter, layout.train_report, layout.train_live)
    if not trainer.is_world_process_zero():
        return outputs

    _save_adapter(layout, built, ckpt_root)
    report = _report(cfg, built, args, trainer.state, device=device, world=world, resume=resume,
                     final_eval=final_eval, train_s=train_s, tokens_before=tokens_before, compact_head=compact_head,
                     wall_s=time.time() - t0, live_s=live_cb.seconds if live_cb else None)
    write_json(layout.train_report, report)
    log.info("train: %s", json.dumps(report))
    return outputs


@dataclass(frozen=True)
class _Built:
    """The model under training and what was decided while building it (the report shows it)."""

    model: Any  # the base with LoRA adapters (a PeftModel)
    tok: Any
    nf4: bool  # base loaded in 4-bit NF4 (QLoRA)
    padding_free: bool
    liger: list[str]  # Liger kernels patched in
    targets: list[str]  # the modules that got adapters
    per_module: dict[str, int]  # trainable parameters by module


def _world_size() -> int:
    """Processes training together: more than one under `accelerate launch` / torchrun (DDP)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def visible_gpus(device: str) -> int:
    """CUDA devices this process can see (0 off CUDA)."""
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0


def gpus_per_process(visible: int, world: int) -> int:
    """How many GPUs one training process drives: at most one.

    Several GPUs visible to a single process (no launcher) would make Trainer wrap the model in
    `nn.DataParallel`, which TRL's SFTTrainer refuses ("does not support nn.DataParallel"). The
    stage then trains on the first one rather than launching data parallelism itself: the same
    params give the same run on any host (data parallelism multiplies the effective batch and
    the fingerprint's world size), which is what DVC's cache and a resume after a crash assume.
    Data parallelism stays one command away and is taken as it is:
    ``torchrun --nproc_per_node N $(which phiops) stage train`` (or ``accelerate launch``), one
    process per GPU (``WORLD_SIZE`` > 1).

    Args:
        visible: CUDA devices visible to this process.
        world: processes training together (``WORLD_SIZE``).

    Returns:
        0 off CUDA, else 1.
    """
    return min(visible, 1)


def _one_device_per_process(args: Any, visible: int, world: int) -> None:
    """Apply :func:`gpus_per_process` to the Trainer's arguments (its `n_gpu`), and say so."""
    n = gpus_per_process(visible, world)
    if world == 1 and visible > n:
        log.warning("%d GPUs visible to one process: training on cuda:0 only. For data parallelism run "
                    "`torchrun --nproc_per_node %d $(which phiops) stage train` (a different run: "
                    "the effective batch is %d times larger)", visible, visible, visible)
    if args.n_gpu > n:
        # TrainingArguments counts every visible GPU when no launcher is used; `_n_gpu` is the
        # one place it is kept (Trainer itself lowers it the same way for model parallelism).
        args._n_gpu = n


def _bind_gpu(device: str) -> None:
    """On CUDA each process takes its own GPU: ``LOCAL_RANK`` under `torchrun` (DDP), else the first."""
    import torch

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _build_model(cfg: Params, device: str) -> _Built:
    """The tokenizer (with the configured chat template) and the base with LoRA adapters.

    Args:
        cfg: the validated params (``model``, ``train``).
        device: where the base is loaded (decides NF4, attention kernel and Liger on ``auto``).

    Returns:
        The adapter-wrapped model, its tokenizer and the choices made on the way.

    Raises:
        lora.LoraTargetError: an intended projection got no adapter.
    """
    from peft import LoraConfig, get_peft_model

    base_path = models.resolve(cfg.model.base)
    tok = models.load_tokenizer(base_path)
    templates.apply(tok, cfg.model.chat_template)  # saved with the adapter: serving renders the same
    attn = resolve_attention(cfg.train.attention, device)
    model, nf4 = _load_base(cfg, base_path, device, attn)
    padding_free = resolve_padding_free(cfg.train.padding_free, model.config)
    liger = _apply_liger(model) if resolve_liger(cfg.train.liger, device) else []

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
    log.info("trainable parameters by module: %s (total %d)", per_module, sum(per_module.values()))
    return _Built(model, tok, nf4, padding_free, liger, targets, per_module)


def _datasets(layout: Layout) -> tuple[Any, Any]:
    """The train split and a fixed slice of the test split, as tokenized rows with labels.

    Returns:
        (train dataset, eval dataset).
    """
    from datasets import Dataset

    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(layout.train_split)]
    train_ds = Dataset.from_list(rows)
    eval_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in read_jsonl(layout.test_split)]
    eval_ds = Dataset.from_list(eval_rows[:64])  # a fixed slice: eval loss for the curve, not a metric
    return train_ds, eval_ds


def _callbacks(ckpt_root: Path, fp: str, world: int) -> list[Any]:
    """Our `TrainerCallback`s: commit each checkpoint crash-safely; log progress as lines."""
    import torch
    from transformers import TrainerCallback

    class _Commit(TrainerCallback):
        """Trainer has written every file of checkpoint-N into staging: mark it and move it in."""

        def on_save(self, args, state, control, **kw):
            if world > 1:  # every rank has written its own RNG state into the staging dir
                torch.distributed.barrier()
            if not state.is_world_process_zero:
                return
            written = ckpts.staging(ckpt_root) / f"checkpoint-{state.global_step}"
            final = ckpts.commit(written, ckpt_root, state.global_step, fp)
            log.info("checkpoint %s complete", final.name)

    class _Progress(TrainerCallback):
        """One log line per logging step: step, loss, tokens/s and ETA of this process."""

        def on_train_begin(self, args, state, control, **kw):
            self.t, self.step0, self.tok0 = time.time(), state.global_step, state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            dt = max(time.time() - self.t, 1e-9)
            done = state.global_step - self.step0
            eta = (state.max_steps - state.global_step) * dt / done if done else float("nan")
            log.info("step %d/%d  loss %.4f  %.0f tok/s  eta %s", state.global_step, state.max_steps,
                     logs["loss"], (state.num_input_tokens_seen - self.tok0) / dt, _hms(eta))

    return [_Commit(), _Progress()]


def _sft_config(cfg: Params, output_dir: Path, device: str, world: int, *, nf4: bool, padding_free: bool) -> Any:
    """TRL's training arguments from `train.*` and what was resolved at build time.

    Args:
        cfg: the validated params (``train``).
        output_dir: where Trainer writes checkpoints (the staging dir; :mod:`phiops.checkpoints`
            commits them).
        device: the training device.
        world: the number of processes (DDP).
        nf4: whether the base is 4-bit (picks the paged 8-bit optimizer on ``auto``).
        padding_free: whether batches are padding-free.

    Returns:
        The ``SFTConfig``.
    """
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_steps,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        logging_steps=cfg.train.logging_steps,
        eval_strategy="steps",
        eval_steps=max(cfg.train.logging_steps * 5, 1),
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        report_to=[],
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        optim=_optim(cfg, nf4),
        bf16=device == "cuda" and cfg.train.qlora.compute_dtype in ("auto", "bfloat16"),
        fp16=device == "cuda" and cfg.train.qlora.compute_dtype == "float16",
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        # Non-reentrant: recomputation that works with frozen inputs and keyword arguments
        # (the varlen kernel's cu_seq_lens), the one PyTorch recommends.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # TF32 is set by run() in a scope it restores: Trainer's own switch is process-wide and
        # never undone (and cached, so a second run in the process would not even set it).
        tf32=None,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,  # _Progress logs step, loss, tokens/s and ETA instead (DVC runs capture logs)
        # Real tokens, kept across a resume: the attention-mask sum when padded; padding-free
        # batches hold no pad at all (and counting `!= pad_id` would drop every <|im_end|>, the pad).
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
        padding_free=padding_free,
        packing=False,  # one row per sequence: packing rows into fixed blocks would change what a step sees
        max_length=None,  # the format stage truncated already (and counted it)
        # Rows come tokenized with the format stage's labels (-100 outside assistant turns, the
        # end-of-turn token inside): TRL's own chat templating and masking must not redo that.
        dataset_kwargs={"skip_prepare_dataset": True},
        ddp_find_unused_parameters=False if world > 1 else None,  # every adapter gets a gradient
    )


def _resume_point(args: Any, ckpt_root: Path, fp: str) -> Path | None:
    """The newest complete checkpoint of this config and data, or None (a fresh start)."""
    # Rank 0 first: it drops stale checkpoints; the others then find the same one to resume.
    with args.main_process_first(desc="find a resumable checkpoint"):
        resume = ckpts.resumable(ckpt_root, fp)
    if resume is not None:
        log.info("resuming from %s", resume)
    return resume


def _tokens_seen(resume: Path | None) -> int:
    """Tokens already trained on at the resumed checkpoint (0 on a fresh start)."""
    if resume is None:
        return 0
    return json.loads((resume / "trainer_state.json").read_text())["num_input_tokens_seen"]


def _save_adapter(layout: Layout, built: _Built, ckpt_root: Path) -> None:
    """Write the adapter and tokenizer in one rename, then drop the checkpoints."""
    with atomic_dir(layout.adapter) as tmp:
        built.model.save_pretrained(tmp, safe_serialization=True)
        built.tok.save_pretrained(tmp)
    # The adapter is in place (and DVC caches it): the checkpoints have served their purpose.
    # A crash before this line resumes from the last checkpoint and only redoes the tail.
    shutil.rmtree(ckpt_root, ignore_errors=True)
    ckpt_root.mkdir(parents=True, exist_ok=True)


def _peak_memory(device: str) -> int:
    """Bytes: the CUDA allocator's peak on GPU, else the process's peak RSS."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts ru_maxrss in KiB


def _report(cfg: Params, built: _Built, args: Any, state: Any, *, device: str, world: int, resume: Path | None,
            final_eval: dict[str, float], train_s: float, tokens_before: int, wall_s: float,
            live_s: float | None, compact_head: bool = False) -> dict[str, Any]:
    """The train metrics (DVC metrics): setup, losses, throughput and peak memory.

    Args:
        cfg: the validated params.
        built: the trained model and its build choices.
        args: the ``SFTConfig`` trained with.
        state: Trainer's state after training (its log history covers a resumed run whole).
        device: the training device.
        world: the number of processes (DDP).
        resume: the checkpoint resumed from, or None.
        final_eval: Trainer's last evaluation.
        train_s: seconds in ``trainer.train`` in this process.
        tokens_before: tokens seen at the resumed checkpoint (tokens/s counts this session only).
        wall_s: seconds since the stage started.
        live_s: seconds spent logging to dvclive (None: not logged).
        compact_head: the LM head projected only loss positions on CPU (:mod:`phiops.lm_head`).

    Returns:
        The report, as written to ``reports/train.json``.
    """
    history = state.log_history  # restored from the checkpoint on resume: the whole run
    tokens_seen = int(state.num_input_tokens_seen)
    session_tokens = tokens_seen - tokens_before
    return {
        "device": device,
        "base_4bit_nf4": built.nf4,
        "optim": args.optim.value if hasattr(args.optim, "value") else str(args.optim),
        "lr_scheduler": cfg.train.lr_scheduler,
        "padding_free": built.padding_free,
        "attention": built.model.config._attn_implementation,
        "liger_kernels": built.liger,
        "lm_head_cpu_loss_positions_only": compact_head,  # on CUDA TRL's own head does it already
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "micro_batch_rows": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "world_size": world,
        "trainable_params": sum(built.per_module.values()),
        "trainable_params_by_module": built.per_module,
        "lora_targets": built.targets,
        "steps": state.global_step,
        "resumed_from_step": int(resume.name.split("-")[1]) if resume is not None else None,
        "train_loss": _mean_train_loss(history),
        "final_train_loss": next((round(h["loss"], 4) for h in reversed(history) if "loss" in h), None),
        "eval_loss": round(final_eval["eval_loss"], 4),
        "tokens_seen": tokens_seen,  # non-pad tokens over the whole run, resumed part included
        "train_runtime_s": round(train_s, 1),  # this process only
        "tokens_per_s": round(session_tokens / train_s, 1) if train_s > 0 else None,
        "peak_memory_bytes": _peak_memory(device),
        "peak_memory_kind": "cuda_max_allocated" if device == "cuda" else "process_max_rss",
        "wall_s": round(wall_s, 1),
        "dvclive_s": round(live_s, 3) if live_s is not None else None,  # time spent logging live metrics
    }


def _hms(seconds: float) -> str:
    if seconds != seconds:  # nan: no step done yet in this process
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _mean_train_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean loss per step over the whole run, from the logged windows (each weighted by its steps).

    Trainer's own `training_loss` averages only what this process saw over all steps, which
    is wrong after a resume.
    """
    total, last = 0.0, 0
    for h in history:
        if "loss" in h:
            total += h["loss"] * (h["step"] - last)
            last = h["step"]
    return round(total / last, 4) if last else None
