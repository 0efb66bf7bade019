"""Deploy a registered version: its bento, its image, its local container.

The bento's version is the registry version and its model is the version's files, copied
into BentoML's model store only after their sha256 matched the registry record. Both carry the
project's id in their name (``phiops-llm-<id>``, ``phiops-model-<id>``): the store is the
machine's, and every project's registry has its own v1.0.0. The image
(``phiops containerize``, :mod:`phiops.container`) is built from that bento and tagged with the
same version; ``phiops deploy --local`` runs it. Promotion and rollback both go through
:func:`release`: the bento always, the image with ``container.on_promote``, the local container
with ``deploy.on_promote: local``, all before the registry assignment, so a version whose image
does not build or whose container does not become ready never becomes production. Every step is
idempotent (a bento or image already built from the same inputs is reused), so re-promoting a
version costs a sha256 pass, not a build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from phiops import artifacts, bento, container, registry
from phiops.config import Params
from phiops.models import cache_dir
from phiops.paths import Layout, store_name

log = logging.getLogger(__name__)


def build_bento(layout: Layout, cfg: Params, record: dict[str, Any], *, lock_packages: bool = True) -> dict[str, str]:
    """Build (or find) the bento of a registered version.

    Args:
        layout: the project (its git/DVC history holds the version's files).
        cfg: params (registry artifact name, serving limits).
        record: the version's registry record.
        lock_packages: lock the bento's Python requirements with uv against the package index.

    Returns:
        ``{"bento": "phiops-llm-<id>:vN.0.0", "model": "<artifact>-<id>:vN.0.0", "source": ...,
        "containerize": ...}``, ``<id>`` this project's (:func:`phiops.paths.store_name`).

    Raises:
        RegistryError: the version's files cannot be restored or differ from the record.
        BentoError: the model store or the build failed.
    """
    version = record["version"]
    reg = registry.Registry(layout, record["artifact"])
    with artifacts.verified_files(layout.root, record) as (src, source):
        model_tag = bento.save_model(
            src, store_name(cfg.registry.artifact, layout.root), version,
            # /v1/models shows these: which version, from which data and code.
            {"registry": {"artifact": record["artifact"], "version": version, "git_tag": artifacts.version_rev(record),
                          "data_hash": record.get("data_hash"), "git_rev": record.get("git_rev")}},
            card=reg.card(version),  # the bento ships its model card
        )
    tag = bento.build(
        model_tag,
        version,
        name=registry.bento_tag(layout.root, version).partition(":")[0],
        service_dir=layout.root / "services",
        served_model_name=cfg.registry.artifact,
        lock_packages=lock_packages,
        limits=cfg.serve,  # every serving limit baked into the bento
    )
    containerize = " ".join(bento.containerize_command(tag))
    log.info("bento %s (model from %s); its image: %s", tag, source, containerize)
    return {"bento": tag, "model": model_tag, "source": source, "containerize": containerize}


def wheelhouse_dir(cfg: Params) -> Path:
    """``container.wheelhouse``, or ``$PHIOPS_CACHE/wheelhouse``: kept between builds."""
    return cfg.container.wheelhouse or cache_dir() / "wheelhouse"


def containerize(layout: Layout, cfg: Params, record: dict[str, Any], *, variant: str | None = None,
                 rebuild: bool = False, lock_packages: bool = True) -> dict[str, Any]:
    """Build (or find) the OCI image of a registered version: its bento first, then the image.

    Args:
        layout: the project.
        cfg: params (``container``: image name, variant, base image, wheelhouse).
        record: the version's registry record (its lineage becomes the image's labels).
        variant: ``cpu`` or ``cuda``; default ``container.variant``.
        rebuild: build the image even when one from the same bento, base and wheels exists.
        lock_packages: lock the bento's requirements with uv (when the bento is built now).

    Returns:
        :func:`build_bento`'s dict plus ``"image"`` (:func:`phiops.container.containerize`'s dict).

    Raises:
        RegistryError: the version's files fail their check.
        BentoError: the bento cannot be built.
        ContainerError: no Docker engine, or the image cannot be built.
    """
    c = cfg.container
    container.require_engine()  # before the bento: say at once when there is no engine
    out: dict[str, Any] = dict(build_bento(layout, cfg, record, lock_packages=lock_packages))
    out["image"] = container.containerize(
        out["bento"], record, root=layout.root, image=c.image, variant=variant or c.variant, base_image=c.base_image,
        wheelhouse_dir=wheelhouse_dir(cfg), wheelhouse_port=c.wheelhouse_port, extra_index_url=c.extra_index_url,
        rebuild=rebuild, timeout=c.build_timeout_s,
    )
    return out


def plan(layout: Layout, cfg: Params, record: dict[str, Any], out_dir: Path, *, variant: str | None = None,
         lock_packages: bool = True) -> dict[str, Any]:
    """The bento of a registered version, and its image's build plan in `out_dir` (no engine needed).

    Returns:
        :func:`phiops.container.plan`'s dict, with ``"bento"`` :func:`build_bento`'s.
    """
    c = cfg.container
    built = build_bento(layout, cfg, record, lock_packages=lock_packages)
    return container.plan(built["bento"], record, out_dir, image=c.image, variant=variant or c.variant,
                          base_image=c.base_image)


def deploy_local(layout: Layout, cfg: Params, record: dict[str, Any]) -> dict[str, Any]:
    """Run a registered version's image as the local container (``deploy`` params), built if missing.

    Returns:
        :func:`phiops.container.run_local`'s dict.

    Raises:
        ContainerError: the image cannot be built, or the container did not become ready (the
            container it replaced then runs again).
    """
    d, c = cfg.deploy, cfg.container
    container.require_engine()
    ref = container.image_ref(c.image, record["version"], c.variant)
    if container.image_inspect(ref) is None:
        log.info("no image %s yet: building it", ref)
        ref = containerize(layout, cfg, record)["image"]["image"]
    return container.run_local(ref, name=d.name, host=d.host, port=d.port, ready_timeout=d.ready_timeout_s)


def release(layout: Layout, cfg: Params, record: dict[str, Any], *, lock_packages: bool = True) -> dict[str, Any]:
    """What a promotion or rollback makes of a version, per params: bento, image, local container.

    Returns:
        :func:`build_bento`'s dict, plus ``"image"`` with ``container.on_promote`` and
        ``"deployed"`` with ``deploy.on_promote: local``.
    """
    if not cfg.container.on_promote:
        return build_bento(layout, cfg, record, lock_packages=lock_packages)
    out = containerize(layout, cfg, record, lock_packages=lock_packages)
    if cfg.deploy.on_promote == "local":
        d = cfg.deploy
        out["deployed"] = container.run_local(out["image"]["image"], name=d.name, host=d.host, port=d.port,
                                              ready_timeout=d.ready_timeout_s)
    return out


def promote(layout: Layout, cfg: Params, version: str, *, approver: str, reason: str,
            bento_build: bool = True, lock_packages: bool = True) -> dict[str, Any]:
    """Put `version` in production (a promotion or a rollback): :func:`release`, then assign.

    The files are checked, and the image built and the local container started where params ask
    for them, before the assignment, so a damaged version, or one whose container does not become
    ready, never reaches production. Idempotent: promoting the version already in production
    records nothing new.

    Returns:
        ``{"version", "changed", "previous"}`` and :func:`release`'s keys.

    Raises:
        RegistryError: unknown version, or its files fail the sha256 check.
        BentoError, ContainerError: the bento, the image or the local container failed.
    """
    if not reason.strip():
        raise artifacts.RegistryError("a promotion needs a reason (--reason)")
    reg = registry.Registry(layout, cfg.registry.artifact)
    record = reg.record(version)
    before = reg.production()
    out: dict[str, Any] = {"version": version, "previous": before["version"] if before else None}
    if bento_build:
        out.update(release(layout, cfg, record, lock_packages=lock_packages))
    else:
        with artifacts.verified_files(layout.root, record):
            pass
    reg.set_production(version, approver=approver, reason=reason)
    out["changed"] = out["previous"] != version
    return out
