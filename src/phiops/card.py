"""The model card of a registered version: a Hugging Face README.md made from its registry record.

Every number comes from the record (:mod:`phiops.registry`), which holds `reports/eval.json`
whole (``eval``), the gate's decision with its bootstrap intervals (``gate``), the resolved
params, the validate and train reports' summaries and the approval. Nothing here reads a file
or writes a number of its own, so the card of a version can be rendered again at any time and
says the same thing. Numbers are printed as recorded (no rounding), so a reader, or a test,
can match each one to its source.

The registry writes the card beside the record when it registers a version and again when the
decision is recorded; the bento's model and every export carry it as README.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from phiops.config import BUILTIN_MODEL
from phiops.gate import CANDIDATES

# Where the builtin model comes from (the card's base_model must be a hub id a reader can find).
BUILTIN_HUB_IDS = {BUILTIN_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}
# The base models of configs/ with the license their model cards state; anything else: "other".
LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "microsoft/phi-2": "mit",
    "microsoft/Phi-3-mini-4k-instruct": "mit",
    "microsoft/Phi-4-mini-instruct": "mit",
    "microsoft/phi-4": "mit",
}
# The evaluation table's columns: eval.json's names, so each cell maps to one recorded value.
EVAL_COLUMNS = ("task_metric", "json_validity", "embedding_similarity", "perplexity", "size_bytes",
                "tokens_per_s", "latency_s_per_request", "n_samples")
CI_COLUMNS = ("diff", "ci_low", "ci_high", "n")
# Summaries of the validate and train reports kept in the record (lineage.collect) for the card.
DATA_KEYS = ("source", "test_source", "rows_in", "accepted", "rejected", "rejected_by_rule", "warnings_by_rule",
             "splits", "passed", "policy", "files")
TRAIN_KEYS = ("device", "base_4bit_nf4", "optim", "lr_scheduler", "steps", "train_loss", "eval_loss", "tokens_seen",
              "trainable_params", "lora_targets", "train_runtime_s", "world_size")


def base_model(record: dict[str, Any]) -> str | None:
    """The base model as a hub id where it has one (the builtin's origin), else as configured."""
    base = (record.get("params") or {}).get("model", {}).get("base")
    return BUILTIN_HUB_IDS.get(base, base)


def _v(value: Any) -> str:
    """A recorded value as it is (a number unrounded, so it matches its source); '-' if absent."""
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(head: tuple[str, ...], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_v(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _front_matter(record: dict[str, Any]) -> dict[str, Any]:
    evals, variant = record.get("eval") or {}, record.get("variant")
    row = (evals.get("variants") or {}).get(variant) or record.get("metrics") or {}
    metric = evals.get("metric", "task_metric")
    metrics = [{"type": metric, "name": f"task metric ({metric})", "value": row.get("task_metric")}]
    metrics += [{"type": k, "name": k, "value": row[k]} for k in ("json_validity", "embedding_similarity", "perplexity")
                if row.get(k) is not None]
    arch = ((record.get("params") or {}).get("model", {}).get("architecture") or {}).get("model_type")
    base = base_model(record)
    return {
        "base_model": base,
        "license": LICENSES.get(base or "", "other"),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": [t for t in ("phiops", "lora", "fine-tuned", variant, arch,
                             "compressed-tensors" if variant not in (None, "merged") else None) if t],
        "datasets": [record["data_hash"]] if record.get("data_hash") else [],
        "model-index": [{
            "name": f"{record.get('artifact')} {record['version']}",
            "results": [{
                "task": {"type": "text-generation"},
                "dataset": {"name": f"{(record.get('data') or {}).get('source', 'training data')} (test split)",
                            "type": record.get("data_hash") or "unknown", "split": "test"},
                "metrics": metrics,
            }],
        }],
    }


def _evaluation(record: dict[str, Any]) -> str:
    evals, gate = record.get("eval") or {}, record.get("gate") or {}
    table = evals.get("variants") or {}
    cis = gate.get("vs_production") or {}
    rows = [[name, *(table[name].get(c) for c in EVAL_COLUMNS), *(cis.get(name, {}).get(c) for c in CI_COLUMNS)]
            for name in ("base", *CANDIDATES) if name in table]
    prod = gate.get("production")
    if prod:
        used = (gate.get("metrics") or {}).get(f"production {prod}") or {}
        rows.append([f"production {prod}", *(used.get(c) for c in EVAL_COLUMNS), *([None] * len(CI_COLUMNS))])
    ci = next(iter(cis.values()), {})
    parts = [
        f"Task metric `{evals.get('metric')}`, perplexity on the answer tokens; `size_bytes` is the weights on disk. "
        "The last four columns are the gate's paired bootstrap of (variant - production) task scores on the same "
        f"test rows: mean difference and its {ci.get('confidence', '-')} confidence interval "
        f"({ci.get('n_resamples', '-')} resamples, seed {ci.get('seed', '-')}), over `n` rows.",
        "",
        _table(("variant", *EVAL_COLUMNS, *(f"vs_production_{c}" for c in CI_COLUMNS)), rows),
    ]
    if evals.get("vs_merged"):
        parts += ["", "Quantized relative to merged (what the gate's quantized-variant rules read):", "",
                  _table(("variant", "perplexity_increase", "task_metric_change", "size_ratio"),
                         [[n, v.get("perplexity_increase"), v.get("task_metric_change"), v.get("size_ratio")]
                          for n, v in evals["vs_merged"].items()])]
    return "\n".join(parts)


def _gate(record: dict[str, Any]) -> str:
    gate = record.get("gate") or {}
    if not gate:
        return "Not recorded."
    verdict = f"**passed**, chose `{gate.get('variant')}`" if gate.get("passed") else "**rejected**"
    rules = (record.get("params") or {}).get("gate") or {}
    parts = [f"The gate {verdict}; compared against production `{gate.get('production') or 'none (first version)'}`.",
             "", _table(("rule", "threshold"), [[k, v] for k, v in rules.items()]),
             "", "Its reasons and each variant's failed rules, as recorded:", "", "```"]
    parts += gate.get("reasons") or []
    parts += [f"{name}: {'; '.join(fails) or 'ok'}" for name, fails in (gate.get("checks") or {}).items()]
    return "\n".join([*parts, "```"])


def _approval(record: dict[str, Any]) -> str:
    a = record.get("approval") or {}
    decision = {True: "approved", False: "rejected"}.get(a.get("approved"), "pending: waits for a person")
    return _table(("decision", "approver", "when", "reason", "by policy"),
                  [[decision, a.get("approver"), a.get("decided_at"), a.get("reason"), a.get("policy")]])


def _data(record: dict[str, Any]) -> str:
    d = record.get("data") or {}
    if not d:
        return "Not recorded."
    splits = d.get("splits") or {}
    parts = [f"Source `{d.get('source')}`" + (f", held-out test `{d['test_source']}`" if d.get("test_source") else "")
             + f"; DVC content hash `{record.get('data_hash')}`. Validation "
             + ("passed." if d.get("passed") else "did not pass.") + f" Policy: `{_v(d.get('policy'))}`.", "",
             _table(("rows_in", "accepted", "rejected", "train", "test"),
                    [[d.get("rows_in"), d.get("accepted"), d.get("rejected"), splits.get("train"), splits.get("test")]])]
    by_rule = [[f"rejected: {k}", v] for k, v in (d.get("rejected_by_rule") or {}).items()]
    by_rule += [[f"warning: {k}", v] for k, v in (d.get("warnings_by_rule") or {}).items()]
    if by_rule:
        parts += ["", _table(("rule", "rows"), by_rule)]
    if d.get("files"):
        parts += ["", _table(("file", "format", "rows_in", "accepted", "rejected", "sha256"),
                             [[f.get("path"), f.get("format"), f.get("rows_in"), f.get("accepted"), f.get("rejected"),
                               f.get("sha256")] for f in d["files"]])]
    return "\n".join(parts)


def _training(record: dict[str, Any]) -> str:
    params = record.get("params") or {}
    train = dict(params.get("train") or {})
    lora = train.pop("lora", {}) or {}
    settings = [[f"train.{k}", v] for k, v in train.items() if k != "qlora"]
    settings += [[f"train.lora.{k}", v] for k, v in lora.items()]
    settings += [[f"format.{k}", v] for k, v in (params.get("format") or {}).items()]
    parts = [_table(("setting", "value"), settings)]
    report = record.get("train") or {}
    if report:
        parts += ["", "What the run reported (`reports/train.json`):", "",
                  _table(("measure", "value"), [[k, report.get(k)] for k in TRAIN_KEYS if k in report])]
    return "\n".join(parts)


def _lineage(record: dict[str, Any]) -> str:
    params = record.get("params")
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest() if params is not None else None
    rows = [["git rev (code)", record.get("git_rev")], ["data hash (dvc.lock)", record.get("data_hash")],
            ["flow run", record.get("flow_run_id")], ["git tag", f"{record.get('artifact')}@{record['version']}"],
            ["model path", record.get("model_path")], ["model hash (dvc.lock)", record.get("dvc_out_md5")],
            ["params (sha256 of resolved)", digest], ["registered at", record.get("registered_at")],
            ["bento", record.get("bento")]]
    rows += [[f"{name} ({c.get('model_path')}, dvc.lock)", c.get("dvc_out_md5")]
             for name, c in (record.get("components") or {}).items()]
    files = [[name, digest] for name, digest in sorted((record.get("files") or {}).items())]
    return "\n".join([_table(("what", "value"), rows), "", "Files of this variant (sha256):", "",
                      _table(("file", "sha256"), files)])


def render(record: dict[str, Any]) -> str:
    """The model card (README.md) of a registered version.

    Args:
        record: the version's registry record (:meth:`phiops.registry.Registry.record`).

    Returns:
        Markdown with YAML front matter in the Hugging Face model card format.
    """
    variant, base = record.get("variant"), base_model(record)
    evals = record.get("eval") or {}
    front = yaml.safe_dump(_front_matter(record), sort_keys=False, allow_unicode=True)
    body = [
        f"# {record.get('artifact')} {record['version']} ({variant})",
        "",
        f"`{base}` fine-tuned with LoRA by phiops, merged into the base"
        + (f" and quantized ({variant}, compressed-tensors W4A16)." if variant not in (None, "merged") else ".")
        + " Every number below is copied from the registry record (`registry/"
        f"{record.get('artifact')}/{record['version']}.json`): the evaluation, the gate and the approval.",
        "",
        "## Intended use",
        "",
        "The task of its training data: given a prompt in the chat format of the data, answer as the training "
        f"answers do (scored with `{evals.get('metric')}`). Load it with transformers "
        "(`AutoModelForCausalLM.from_pretrained`, safetensors, no remote code) or serve the bento "
        f"`{record.get('bento')}` (OpenAI-compatible `/v1/chat/completions`).",
        "",
        "## Training data",
        "",
        _data(record),
        "",
        "## Training settings",
        "",
        _training(record),
        "",
        "## Evaluation",
        "",
        _evaluation(record),
        "",
        "## Gate decision",
        "",
        _gate(record),
        "",
        "## Approval",
        "",
        _approval(record),
        "",
        "## Limitations",
        "",
        "- Measured only on the held-out test split of the same data, with the metric above; nothing here says how "
        "it does on other tasks, languages or inputs unlike the training data.",
        "- A small model fine-tuned on a narrow task: it inherits the base model's biases and can answer "
        "confidently and wrongly; check its answers where they matter.",
        "- The task metric is computed on the generated sample shown in `n_samples`, perplexity on every test row.",
        *(["- A quantized variant (W4A16): its rows above show what quantization cost against merged."]
          if variant not in (None, "merged") else []),
        "",
        "## Lineage",
        "",
        _lineage(record),
        "",
    ]
    return f"---\n{front}---\n\n" + "\n".join(body)


def parse_front_matter(card: str) -> dict[str, Any]:
    """The YAML metadata of a card (what a hub reads)."""
    if not card.startswith("---\n"):
        raise ValueError("a model card starts with '---' YAML front matter")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])
