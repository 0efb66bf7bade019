"""Deploy a registered version: its bento, built from files checked against the registry.

The bento's version is the registry version and its model is the version's files, copied
into BentoML's model store only after their sha256 matched the registry record. Promotion and
rollback both end here; building is idempotent (a bento already built for the same model is
reused), so re-promoting a version costs a sha256 pass, not a build.
"""

from __future__ import annotations

import logging
from typing import Any

from phiops import artifacts, bento, registry
from phiops.config import Params
from phiops.paths import Layout

log = logging.getLogger(__name__)


def build_bento(layout: Layout, cfg: Params, record: dict[str, Any], *, lock_packages: bool = True) -> dict[str, str]:
    """Build (or find) the bento of a registered version.

    Args:
        layout: the project (its git/DVC history holds the version's files).
        cfg: params (registry artifact name, serving limits).
        record: the version's registry record.
        lock_packages: lock the bento's Python requirements with uv against the package index.

    Returns:
        ``{"bento": "phiops-llm:vN.0.0", "model": "<artifact>:vN.0.0", "source": ..., "containerize": ...}``.

    Raises:
        RegistryError: the version's files cannot be restored or differ from the record.
        BentoError: the model store or the build failed.
    """
    version = record["version"]
    reg = registry.Registry(layout, record["artifact"])
    with artifacts.verified_files(layout.root, record) as (src, source):
        model_tag = bento.save_model(
            src, cfg.registry.artifact, version,
            # /v1/models shows these: which version, from which data and code.
            {"registry": {"artifact": record["artifact"], "version": version, "git_tag": artifacts.version_rev(record),
                          "data_hash": record.get("data_hash"), "git_rev": record.get("git_rev")}},
            card=reg.card(version),  # the bento ships its model card
        )
    tag = bento.build(
        model_tag,
        version,
        service_dir=layout.root / "services",
        served_model_name=cfg.registry.artifact,
        lock_packages=lock_packages,
        limits=cfg.serve,  # every serving limit baked into the bento
    )
    containerize = " ".join(bento.containerize_command(tag))
    log.info("bento %s (model from %s); where a Docker engine exists: %s", tag, source, containerize)
    return {"bento": tag, "model": model_tag, "source": source, "containerize": containerize}


def promote(layout: Layout, cfg: Params, version: str, *, approver: str, reason: str,
            bento_build: bool = True, lock_packages: bool = True) -> dict[str, Any]:
    """Put `version` in production (a promotion or a rollback) and build its bento.

    The files are checked before the assignment, so a damaged version never reaches
    production. Idempotent: promoting the version already in production records nothing new.

    Returns:
        ``{"version", "changed", "previous", "bento", "containerize"}``.

    Raises:
        RegistryError: unknown version, or its files fail the sha256 check.
    """
    if not reason.strip():
        raise artifacts.RegistryError("a promotion needs a reason (--reason)")
    reg = registry.Registry(layout, cfg.registry.artifact)
    record = reg.record(version)
    before = reg.production()
    out: dict[str, Any] = {"version": version, "previous": before["version"] if before else None}
    if bento_build:
        out.update(build_bento(layout, cfg, record, lock_packages=lock_packages))
    else:
        with artifacts.verified_files(layout.root, record):
            pass
    reg.set_production(version, approver=approver, reason=reason)
    out["changed"] = out["previous"] != version
    return out
