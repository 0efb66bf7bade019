"""The model registry: DVC `artifacts:` + GTO git tags, with a lineage record per version.

A version is a git commit holding `dvc.lock` (which pins the model files by content hash in
DVC's cache) and `registry/<artifact>/<version>.json` (the lineage: data hash, params, eval
metrics, gate decision, sha256 of every model file, flow run, approver). GTO tags the commit
(`<artifact>@v3.0.0`) and assigns stages: `staging` when a candidate passes the gate (it then
waits for a person), `production` when it is approved (`<artifact>#production#N`). The
person's decision is written into the record (one more commit); every production assignment
carries its approver and reason in the GTO tag message, so a rollback (one more assignment of
an older version) is recorded like any promotion. Registration and promotion are idempotent.

A version's files are checked and restored by :mod:`phiops.artifacts`; `phiops registry` shows
the records through :mod:`phiops.registry_view`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phiops import card
from phiops.artifacts import RegistryError, verify_files
from phiops.io import dir_manifest, write_json, write_text
from phiops.paths import Layout, store_name

PRODUCTION = "production"
STAGING = "staging"  # passed the gate; waits for a person's decision
# Used only when git has no identity configured (fresh CI machines): commits need an author.
_FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "phiops", "GIT_AUTHOR_EMAIL": "phiops@localhost"}


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


BENTO_NAME = "phiops-llm"  # services/bentofile.yaml's `name`


def bento_tag(root: Path, version: str) -> str:
    """The bento of a registry version in the BentoML store: this project's name, the same version.

    ``phiops-llm-<project id>:<version>`` (:func:`phiops.paths.store_name`): the store is shared by
    every project on the machine, and each registry has its own v1.0.0.
    """
    return f"{store_name(BENTO_NAME, root)}:{version}"


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
        return _read_record(path)

    def history(self) -> list[dict[str, Any]]:
        """Every registered version, oldest first.

        Raises:
            RegistryError: a record cannot be read or parsed (named), so nothing reads a
                damaged registry as a shorter one.
        """
        if not self.dir.exists():
            return []
        recs = [_read_record(p) for p in self.dir.glob("v*.json")]
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
        latest = max(assigned, key=_assignment_number)
        return self.record(latest["version"])

    def card_path(self, version: str) -> Path:
        """The model card (README.md of the version's files) kept beside its record, in git."""
        return self.dir / f"{version}.md"

    def card(self, version: str) -> str:
        """A version's model card as written at registration (or at its decision).

        A version registered before phiops wrote cards gets one rendered from its record now.
        """
        path = self.card_path(version)
        return path.read_text() if path.exists() else card.render(self.record(version))

    def _write(self, record: dict[str, Any]) -> list[str]:
        """Write a record and its model card (each atomically); returns their paths for git."""
        path = self.dir / f"{record['version']}.json"
        write_json(path, record)
        # Rendered from the record as written, so the card and the record never disagree. It
        # lives here and not in the model folder: that folder is a DVC output pinned by
        # dvc.lock, whose hash (and the sha256 manifest above) a card written into it would break.
        write_text(self.card_path(record["version"]), card.render(json.loads(path.read_text())))
        return [str(p.relative_to(self.root)) for p in (path, self.card_path(record["version"]))]

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
            "bento": bento_tag(self.root, version),  # the tag here; a clone elsewhere has its own
            **lineage,
        }
        paths = self._write(record)
        if (self.root / "dvc.lock").exists():
            paths.append("dvc.lock")
        _git(self.root, "add", "--", *paths)
        _git(self.root, "commit", "--quiet", "-m", f"phiops: register {self.artifact} {version}", "--", *paths)
        name, email = _identity(self.root)
        with _gto(f"register {self.artifact} {version}"):
            gto.api.register(
                str(self.root), self.artifact, "HEAD", version=version,
                message=f"registered by phiops ({lineage.get('variant')})", author=name, author_email=email,
            )
        if stage:
            with _gto(f"assign {self.artifact} {version} to {stage}"):
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
        paths = self._write(record)  # the card says who decided, when and why
        verb = "approve" if approval.get("approved") else "reject"
        _git(self.root, "add", "--", *paths)
        _git(self.root, "commit", "--quiet", "-m",
             f"phiops: {verb} {self.artifact} {version} ({approval.get('approver')}: {approval.get('reason')})", "--", *paths)
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
        with _gto(f"assign {self.artifact} {version} to {PRODUCTION}"):
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
            out.append({"n": _assignment_number(e), "version": e["version"],
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
        """GTO's journal: registrations and stage assignments with author and message.

        Fails closed: production, the gate's comparison and rollbacks are decided from this
        journal, so "could not read it" must never read as "nothing there". GTO itself skips
        tags it cannot parse (a hand-made `<artifact>#production#x`, a lightweight tag), which
        would silently hide an assignment; every git tag of this artifact must therefore be
        one GTO understood.

        Raises:
            RegistryError: GTO or git failed (the cause is in the message), or a tag of this
                artifact is not a valid GTO tag (named).
        """
        import gto.api

        with _gto(f"read the registry of {self.artifact} from the git tags in {self.root} "
                  "(nothing is decided from an unread registry)"):
            events = [dict(e) for e in gto.api.history(str(self.root), self.artifact)]
        if not _has_commits(self.root):
            return events
        tags = _git(self.root, "tag", "--list", f"{self.artifact}@*", f"{self.artifact}#*").splitlines()
        unread = sorted(set(tags) - {str(e.get("ref")) for e in events})
        if unread:
            raise RegistryError(
                f"git tag(s) {', '.join(unread)} of {self.artifact} are not valid GTO tags (GTO skips them, so "
                "production or a promotion could be missed); delete or fix them (`git tag -d ...`) and retry"
            )
        return events


@contextlib.contextmanager
def _gto(what: str) -> Iterator[None]:
    """GTO's (and git's) failures as a RegistryError that says what was being done."""
    try:
        yield
    except RegistryError:
        raise
    except Exception as exc:  # GTO raises scmrepo, git and its own errors; each means "not done"
        raise RegistryError(f"GTO could not {what}: {type(exc).__name__}: {exc}") from exc


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read registry record {path} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("number"), int) or "version" not in record:
        raise RegistryError(f"registry record {path} is damaged: no version/number")
    return record


def _assignment_number(event: dict[str, Any]) -> int:
    """N of a `<artifact>#<stage>#N` assignment tag (strictly increasing per artifact)."""
    ref = str(event.get("ref"))
    try:
        return int(ref.rsplit("#", 1)[1])
    except (IndexError, ValueError):
        raise RegistryError(f"GTO assignment tag {ref!r} has no number: the order of assignments is unknown") from None


def _has_commits(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True).returncode == 0
