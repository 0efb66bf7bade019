"""The model registry: DVC `artifacts:` + GTO git tags, with a lineage record per version.

A version is a git commit holding `dvc.lock` (which pins the model files by content hash in
DVC's cache) and `registry/<artifact>/<version>.json` (the lineage: data hash, params, eval
metrics, gate decision, sha256 of every model file, flow run, approver). GTO tags the commit
(`<artifact>@v3.0.0`) and assigns stages: `staging` when a candidate passes the gate (it then
waits for a person), `production` when it is approved (`<artifact>#production#N`). The
person's decision is written into the record (one more commit); every production assignment
carries its approver and reason in the GTO tag message, so a rollback (one more assignment of
an older version) is recorded like any promotion. Registration and promotion are idempotent.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phiops.io import dir_manifest, write_json
from phiops.paths import Layout

PRODUCTION = "production"
STAGING = "staging"  # passed the gate; waits for a person's decision
# Used only when git has no identity configured (fresh CI machines): commits need an author.
_FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "phiops", "GIT_AUTHOR_EMAIL": "phiops@localhost"}


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (no git repo, unknown version, tampered files)."""


def _git(root: Path, *args: str) -> str:
    env = dict(os.environ)
    for k, v in _FALLBACK_IDENTITY.items():
        env.setdefault(k, v)
        env.setdefault(k.replace("AUTHOR", "COMMITTER"), v)
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def _identity(root: Path) -> tuple[str, str]:
    """git's configured author, or phiops' fallback on machines with none (CI)."""
    def get(key: str) -> str:
        res = subprocess.run(["git", "config", key], cwd=root, capture_output=True, text=True)
        return res.stdout.strip()

    return get("user.name") or _FALLBACK_IDENTITY["GIT_AUTHOR_NAME"], get("user.email") or _FALLBACK_IDENTITY["GIT_AUTHOR_EMAIL"]


def bento_tag(version: str) -> str:
    """The bento of a registry version carries the same version (services/bentofile.yaml names it)."""
    return f"phiops-llm:{version}"


class Registry:
    def __init__(self, layout: Layout, artifact: str):
        self.root = layout.root.resolve()
        self.artifact = artifact
        self.dir = Layout(self.root).registry / artifact

    # -- reading -----------------------------------------------------------------------------
    def record(self, version: str) -> dict[str, Any]:
        path = self.dir / f"{version}.json"
        if not path.exists():
            known = ", ".join(r["version"] for r in self.history()) or "none"
            raise RegistryError(f"{self.artifact} has no version {version!r} (registered: {known})")
        return json.loads(path.read_text())

    def history(self) -> list[dict[str, Any]]:
        """Every registered version, oldest first."""
        if not self.dir.exists():
            return []
        recs = [json.loads(p.read_text()) for p in self.dir.glob("v*.json")]
        return sorted(recs, key=lambda r: r["number"])

    def production(self) -> dict[str, Any] | None:
        """The record of the version in production, or None.

        The latest `<artifact>#production#N` assignment wins. GTO orders assignments by tag
        time, which has one-second resolution; N is strictly increasing, so it breaks ties
        (a rollback within the same second as the promotion it undoes).
        """
        assigned = [e for e in self.events() if e.get("event") == "assignment" and e.get("stage") == PRODUCTION]
        if not assigned:
            return None
        latest = max(assigned, key=lambda e: int(str(e["ref"]).rsplit("#", 1)[-1]))
        return self.record(latest["version"])

    def verify(self, version: str, model_dir: Path) -> None:
        """Refuse model files whose sha256 differ from the registry record.

        Raises:
            RegistryError: naming each missing, extra or changed file.
        """
        verify_files(self.record(version)["files"], model_dir, f"{self.artifact} {version}")

    # -- writing -----------------------------------------------------------------------------
    def find(self, model_dir: Path) -> dict[str, Any] | None:
        """The registered version holding exactly these files at this path, or None."""
        rel = str(model_dir.resolve().relative_to(self.root))
        files = dir_manifest(model_dir)
        for rec in self.history():
            if rec.get("model_path") == rel and rec.get("files") == files:
                return rec
        return None

    def register(self, model_dir: Path, lineage: dict[str, Any], stage: str | None = STAGING) -> dict[str, Any]:
        """Register `model_dir` as a new version: lineage record, commit, GTO tag, stage.

        Idempotent: files already registered (same path, same sha256) return that version's
        record, so a flow resumed after a suspend does not register its candidate twice.

        Args:
            model_dir: the chosen variant's checkpoint (a DVC output).
            lineage: what produced it (params, metrics, gate, data hash, flow run, approval).
            stage: the GTO stage to assign (`staging`: waits for a person), or None.

        Returns:
            The record written (or found).
        """
        import gto.api

        if not (self.root / ".git").exists():
            raise RegistryError(f"{self.root} is not a git repository: the registry lives in git tags")
        found = self.find(model_dir)
        if found is not None:
            return found
        number = max((r["number"] for r in self.history()), default=0) + 1
        version = f"v{number}.0.0"
        record = {
            "artifact": self.artifact,
            "version": version,
            "number": number,
            "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_path": str(model_dir.resolve().relative_to(self.root)),
            "files": dir_manifest(model_dir),
            "parent_commit": _git(self.root, "rev-parse", "HEAD") if _has_commits(self.root) else None,
            "bento": bento_tag(version),
            **lineage,
        }
        path = self.dir / f"{version}.json"
        write_json(path, record)
        paths = [str(path.relative_to(self.root))]
        if (self.root / "dvc.lock").exists():
            paths.append("dvc.lock")
        _git(self.root, "add", "--", *paths)
        _git(self.root, "commit", "--quiet", "-m", f"phiops: register {self.artifact} {version}", "--", *paths)
        name, email = _identity(self.root)
        gto.api.register(
            str(self.root), self.artifact, "HEAD", version=version,
            message=f"registered by phiops ({lineage.get('variant')})", author=name, author_email=email,
        )
        if stage:
            gto.api.assign(str(self.root), self.artifact, stage, version=version, force=True,
                           message=json.dumps({"approver": "policy:gate", "reason": "passed the gate"}),
                           author=name, author_email=email)
        return record

    def record_decision(self, version: str, approval: dict[str, Any]) -> dict[str, Any]:
        """Write a person's (or the policy's) decision on `version` into its record and commit it.

        Idempotent: the same decision again changes nothing.

        Args:
            version: a registered version.
            approval: ``{"approved", "approver", "reason", ...}``.

        Returns:
            The updated record.
        """
        record = self.record(version)
        if record.get("approval") == approval:
            return record
        record["approval"] = approval
        path = self.dir / f"{version}.json"
        write_json(path, record)
        rel = str(path.relative_to(self.root))
        verb = "approve" if approval.get("approved") else "reject"
        _git(self.root, "add", "--", rel)
        _git(self.root, "commit", "--quiet", "-m",
             f"phiops: {verb} {self.artifact} {version} ({approval.get('approver')}: {approval.get('reason')})", "--", rel)
        return record

    def set_production(self, version: str, approver: str, reason: str) -> dict[str, Any]:
        """Assign `version` to production (promotion or rollback); a no-op if it already is.

        Returns:
            The record now in production.
        """
        import gto.api

        record = self.record(version)
        current = self.production()
        if current and current["version"] == version:
            return record
        name, email = _identity(self.root)
        gto.api.assign(
            str(self.root),
            self.artifact,
            PRODUCTION,
            version=version,
            message=json.dumps({"approver": approver, "reason": reason}),
            force=True,  # re-assigning a version that was in production before (rollback)
            author=name,
            author_email=email,
        )
        return record

    def promotions(self) -> list[dict[str, Any]]:
        """Every production assignment, oldest first: version, when, approver, reason, GTO tag."""
        out = []
        for e in self.events():
            if e.get("event") != "assignment" or e.get("stage") != PRODUCTION:
                continue
            try:
                msg = json.loads(e.get("message") or "{}")
            except ValueError:  # assigned by hand with `gto assign -m "..."`
                msg = {"reason": e.get("message")}
            out.append({"n": int(str(e["ref"]).rsplit("#", 1)[-1]), "version": e["version"],
                        "at": str(e.get("timestamp", "")), "approver": msg.get("approver") or e.get("author"),
                        "reason": msg.get("reason", ""), "tag": e["ref"]})
        return sorted(out, key=lambda p: p["n"])

    def previous_production(self) -> dict[str, Any] | None:
        """The version that was in production before the current one (what a rollback restores)."""
        log = self.promotions()
        if not log:
            return None
        current = log[-1]["version"]
        for p in reversed(log):
            if p["version"] != current:
                return self.record(p["version"])
        return None

    def events(self) -> list[dict[str, Any]]:
        """GTO's journal: registrations and stage assignments with author and message."""
        import gto.api

        try:
            return [dict(e) for e in gto.api.history(str(self.root), self.artifact)]
        except Exception:
            return []


def verify_files(want: dict[str, str], model_dir: Path, label: str) -> None:
    """Refuse `model_dir` unless its files are exactly `want` (relative path -> sha256).

    Raises:
        RegistryError: naming each missing, extra or changed file.
    """
    got = dir_manifest(model_dir)
    bad = sorted(
        [f"changed: {f}" for f in want if f in got and got[f] != want[f]]
        + [f"missing: {f}" for f in want if f not in got]
        + [f"unexpected: {f}" for f in got if f not in want]
    )
    if bad:
        raise RegistryError(f"{model_dir} does not match {label}: " + "; ".join(bad))


def version_rev(record: dict[str, Any]) -> str:
    """The git revision of a registered version: GTO's tag on its registration commit."""
    return f"{record['artifact']}@{record['version']}"


def fetch_files(root: Path, record: dict[str, Any], dest: Path) -> Path:
    """Restore a registered version's model files into `dest` and check them against the record.

    The registration commit's dvc.lock pins the files by content hash; DVC reads them from its
    cache (or the configured remote) at that revision, whatever the working tree holds now.

    Returns:
        `dest`, holding exactly the recorded files.

    Raises:
        RegistryError: DVC cannot provide them (cache pruned and no remote: `dvc pull`), or
            their sha256 differ from the record.
    """
    from dvc.api import DVCFileSystem

    rev = version_rev(record)
    try:
        fs = DVCFileSystem(str(root), rev=rev)
        fs.get(record["model_path"], str(dest), recursive=True)
    except Exception as exc:  # DVC raises many kinds; all mean the same here
        raise RegistryError(
            f"cannot restore {record['model_path']} of {rev} from DVC ({type(exc).__name__}: {exc}); "
            "is the cache pruned? try `dvc pull`"
        ) from exc
    verify_files(record["files"], dest, rev)
    return dest


@contextlib.contextmanager
def verified_files(root: Path, record: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """A directory holding exactly a registered version's files, checked against its sha256.

    The working tree's ``model_path`` when it matches the record byte for byte; otherwise the
    files restored from DVC at the version's GTO tag into a temporary directory (removed when
    the block ends). Whatever loads a registered model goes through here.

    Yields:
        ``(directory, where it came from)``.

    Raises:
        RegistryError: the files cannot be restored, or their sha256 differ from the record
            (naming each changed, missing or unexpected file).
    """
    path = root / record["model_path"]
    if path.is_dir() and dir_manifest(path) == record["files"]:
        yield path, f"working tree {record['model_path']}"
        return
    with tempfile.TemporaryDirectory(prefix="phiops-restore-") as tmp:
        yield fetch_files(root, record, Path(tmp) / "model"), f"DVC cache at {version_rev(record)}"


def _has_commits(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True).returncode == 0


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
