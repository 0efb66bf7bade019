"""The model registry: DVC `artifacts:` + GTO git tags, with a lineage record per version.

A version is a git commit holding `dvc.lock` (which pins the model files by content hash in
DVC's cache) and `registry/<artifact>/<version>.json` (the lineage: data hash, params, eval
metrics, gate decision, sha256 of every model file, flow run, approver). GTO tags the commit
(`<artifact>@v3.0.0`) and assigns stages (`<artifact>#production#N`); rollback is one more
assignment. Promotion is never cached and is idempotent.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phiops.io import dir_manifest, write_json
from phiops.paths import Layout

PRODUCTION = "production"
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
    def register(self, model_dir: Path, lineage: dict[str, Any]) -> dict[str, Any]:
        """Register `model_dir` as a new version: lineage record, commit, GTO tag.

        Args:
            model_dir: the chosen variant's checkpoint (a DVC output).
            lineage: what produced it (params, metrics, gate, data hash, flow run, approval).

        Returns:
            The record written.
        """
        import gto.api

        if not (self.root / ".git").exists():
            raise RegistryError(f"{self.root} is not a git repository: the registry lives in git tags")
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


def _has_commits(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True).returncode == 0


def render_table(records: list[dict[str, Any]]) -> str:
    """Versions as a plain-text table: version, variant, task metric, data hash, approver."""
    if not records:
        return "(no versions)"
    cols = ("version", "variant", "task_metric", "data_hash", "git_rev", "approver", "registered_at")
    rows = [
        [
            r["version"],
            r.get("variant", ""),
            str(r.get("metrics", {}).get("task_metric", "")),
            str(r.get("data_hash", ""))[:12],
            str(r.get("parent_commit") or "")[:10],
            str(r.get("approval", {}).get("approver", "")),
            r.get("registered_at", ""),
        ]
        for r in records
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])
