"""The registry as plain text: versions, promotions and one version's lineage (`phiops registry`)."""

from __future__ import annotations

import json
from typing import Any

from phiops.artifacts import version_rev


def _grid(cols: tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    lines = [fmt.format(*cols), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
    return "\n".join(line.rstrip() for line in lines)


def _metric(r: dict[str, Any], key: str) -> str:
    v = r.get("metrics", {}).get(key)
    return f"{v:.4g}" if isinstance(v, (int, float)) else ""


def _decision(r: dict[str, Any]) -> str:
    a = r.get("approval") or {}
    if "approved" not in a:
        return "pending"
    return "approved" if a["approved"] else "rejected"


def render_table(records: list[dict[str, Any]], production: str | None = None) -> str:
    """Versions as a plain-text table, one row each; `*` marks the one in production."""
    if not records:
        return "(no versions)"
    cols = ("", "version", "variant", "task_metric", "perplexity", "data_hash", "git_rev", "decision",
            "approver", "reason", "flow_run", "registered_at")
    rows = [
        [
            "*" if r["version"] == production else "",
            r["version"],
            str(r.get("variant", "")),
            _metric(r, "task_metric"),
            _metric(r, "perplexity"),
            str(r.get("data_hash") or "")[:12],
            str(r.get("git_rev") or r.get("parent_commit") or "")[:10],
            _decision(r),
            str((r.get("approval") or {}).get("approver", "")),
            str((r.get("approval") or {}).get("reason", ""))[:40],
            str(r.get("flow_run_id") or "")[:8],
            r.get("registered_at", ""),
        ]
        for r in records
    ]
    return _grid(cols, rows)


def render_promotions(promotions: list[dict[str, Any]]) -> str:
    """The production assignments (promotions and rollbacks), oldest first."""
    if not promotions:
        return "(never promoted)"
    rows = [[str(p["n"]), p["version"], p["at"], str(p["approver"]), str(p["reason"]), p["tag"]] for p in promotions]
    return _grid(("#", "version", "at", "approver", "reason", "gto tag"), rows)


def render_record(r: dict[str, Any]) -> str:
    """One version's lineage as a two-column table (field, value), then its files' sha256."""
    import hashlib

    a = r.get("approval") or {}
    gate_ = r.get("gate") or {}
    params = r.get("params")
    fields = [
        ("artifact", r.get("artifact")),
        ("version", r["version"]),
        ("variant", r.get("variant")),
        ("model path", r.get("model_path")),
        ("git tag", version_rev(r)),
        ("git rev (code)", r.get("git_rev")),
        ("data hash (dvc.lock)", r.get("data_hash")),
        ("model hash (dvc.lock)", r.get("dvc_out_md5")),
        ("params (sha256 of resolved)", hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
         if params is not None else None),
        ("task metric", _metric(r, "task_metric")),
        ("perplexity", _metric(r, "perplexity")),
        ("size bytes", r.get("metrics", {}).get("size_bytes")),
        ("gate", ("pass -> " + str(gate_.get("variant"))) if gate_.get("passed") else ("reject" if gate_ else None)),
        ("gate vs production", gate_.get("production")),
        ("decision", _decision(r)),
        ("approver", a.get("approver")),
        ("reason", a.get("reason")),
        ("policy", a.get("policy")),
        ("flow run id", r.get("flow_run_id")),
        ("registered at", r.get("registered_at")),
        ("bento", r.get("bento")),
    ]
    rows = [[k, str(v)] for k, v in fields if v not in (None, "")]
    rows += [[f"sha256 {name}", digest] for name, digest in sorted(r.get("files", {}).items())]
    return _grid(("field", "value"), rows)
