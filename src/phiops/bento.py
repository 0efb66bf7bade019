"""Package a promoted checkpoint for serving with BentoML.

Two steps, each usable alone:

1. :func:`save_model` copies a safetensors checkpoint directory into the BentoML model store as
   ``name:version`` (the files under ``checkpoint/``, their sha256 in the model's metadata).
2. :func:`build` builds the bento of ``services/`` (service.py + bentofile.yaml) with that model
   and ``phiops`` itself as a wheel (the service imports ``phiops.serve``). The model tag and
   serving limits are *bento arguments*: stored in the bento's bento.yaml and restored by every
   ``bentoml serve`` of it, in or out of a container, so the service always loads exactly the
   model the bento carries.

``phiops.serve.client`` serves a built bento locally and asks it.

Stores live under ``$BENTOML_HOME`` (default ``~/bentoml``), read at each call, so a test
that points it at a temporary directory never touches the user's stores. Building runs the
``bentoml`` CLI in a subprocess: it resolves ``$BENTOML_HOME`` afresh, keeps the service's
heavy imports out of this process, and is the same path an operator uses.

Building a bento needs no Docker engine; :func:`containerize_command` gives the command that
makes its image where one exists (``phiops.container``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from phiops.io import dir_manifest, sha256_file
from phiops.config import ServeCfg
from phiops.models import ModelError, check_safetensors
from phiops.serve.checkpoint import CHECKPOINT_SUBDIR

log = logging.getLogger(__name__)

# Weights are loaded only from safetensors; pickle-format files never enter the model store
# (a bento is shipped to other machines, where loading a pickle would run arbitrary code).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_META_KEY = "phiops"  # reserved key of the stored model's metadata
CARD = "README.md"  # the model card, where the Hugging Face hub and readers look for it
_TAG_OUT = re.compile(r"__tag__:(\S+)")


class BentoError(RuntimeError):
    """The model store, a build or a served bento is not in the expected state."""


# --------------------------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------------------------


def bentoml_home() -> Path:
    """The BentoML home in effect: ``$BENTOML_HOME`` if set, else ``~/bentoml``."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser()


def _model_store() -> Any:
    # An explicit store instead of BentoML's process-wide default: that one is fixed the first
    # time any store is touched, so a later change of $BENTOML_HOME (tests) would be ignored.
    from bentoml._internal.models import ModelStore

    path = bentoml_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def _bento_store() -> Any:
    from bentoml._internal.bento import BentoStore

    path = bentoml_home() / "bentos"
    path.mkdir(parents=True, exist_ok=True)
    return BentoStore(str(path))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(bentoml_home())
    # Usage tracking phones home; this machine has no internet, and a pipeline shouldn't.
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return env


def bentoml_cli() -> list[str]:
    return [sys.executable, "-m", "bentoml"]


# --------------------------------------------------------------------------------------------
# save_model
# --------------------------------------------------------------------------------------------


def _checkpoint_files(model_dir: Path) -> list[Path]:
    files, skipped = [], []
    for p in sorted(model_dir.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix.lower() in _PICKLE_SUFFIXES:
            skipped.append(str(p.relative_to(model_dir)))
            continue
        files.append(p)
    if skipped:
        log.warning("%s: not storing pickle-format files %s (only safetensors are loaded)", model_dir, skipped)
    return files


def save_model(model_dir: Path, name: str, version: str, metadata: dict[str, Any], card: str | None = None) -> str:
    """Copy a safetensors checkpoint directory into the BentoML model store as ``name:version``.

    The files land under ``checkpoint/`` of the stored model; their sha256 manifest is kept in
    the model's metadata under the reserved key ``"phiops"`` (``{"format", "files"}``), next to
    the caller's ``metadata``. Pickle-format files (``*.bin``, ``*.pt``...) are left out.

    Idempotent: if ``name:version`` already exists and its stored files match both its recorded
    manifest and ``model_dir``, nothing is copied and the tag is returned.

    Args:
        model_dir: checkpoint directory (config.json, *.safetensors, tokenizer files; a
            compressed-tensors W4A16 checkpoint is the same shape).
        name: BentoML model name (lowercase letters, digits, ``-``, ``_``, ``.``).
        version: model version (same alphabet), e.g. the registry version.
        metadata: JSON-serialisable facts to keep with the model (metrics, lineage...).
        card: the model card, stored as ``checkpoint/README.md`` and covered by the manifest
            (in place of a README.md of ``model_dir``).

    Returns:
        The tag, ``"name:version"``.

    Raises:
        ModelError: ``model_dir`` is not a directory holding ``*.safetensors`` weights.
        ValueError: bad name/version, metadata not JSON-serialisable or using key ``"phiops"``.
        BentoError: the tag exists with different files, or its stored files are damaged
            (delete it with ``bentoml models delete name:version`` and save again).
    """
    import bentoml
    from bentoml._internal.tag import Tag
    from bentoml.exceptions import NotFound

    model_dir = Path(model_dir)
    check_safetensors(model_dir)
    if _META_KEY in metadata:
        raise ValueError(f"metadata key {_META_KEY!r} is reserved for phiops' file manifest")
    try:
        user_meta = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
    if name != name.lower() or version != version.lower():
        # BentoML would lowercase silently; a tag must be what the caller recorded elsewhere.
        raise ValueError(f"invalid model tag {name}:{version}: use lowercase")
    try:
        tag = Tag(name, version)
    except Exception as exc:  # bentoml's own ValueError subclass; its message says the rule
        raise ValueError(f"invalid model tag {name}:{version}: {exc}") from None

    files = _checkpoint_files(model_dir)
    if card is not None:
        files = [p for p in files if p.relative_to(model_dir) != Path(CARD)]
    manifest = {str(p.relative_to(model_dir)): sha256_file(p) for p in files}
    if card is not None:
        manifest = dict(sorted({**manifest, CARD: hashlib.sha256(card.encode()).hexdigest()}.items()))
    store = _model_store()

    try:
        existing = store.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        recorded = (existing.info.metadata.get(_META_KEY) or {}).get("files")
        if recorded != manifest:
            raise BentoError(
                f"model {tag} already exists in {bentoml_home()} with different files than {model_dir}; "
                "a version is immutable: save under a new version"
            )
        actual = dir_manifest(Path(existing.path_of(CHECKPOINT_SUBDIR)))
        if actual != recorded:
            raise BentoError(
                f"model {tag} in {bentoml_home()} is damaged (files differ from its manifest); "
                f"run `bentoml models delete {tag} -y` and save it again"
            )
        log.info("model %s already in the store with identical files", tag)
        return str(tag)

    meta = {**user_meta, _META_KEY: {"format": "hf-safetensors", "files": manifest}}
    with bentoml.models.create(tag, labels={"project": "phiops"}, metadata=meta, _model_store=store) as model:
        dest = Path(model.path_of(CHECKPOINT_SUBDIR))
        for src in files:
            out = dest / src.relative_to(model_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
            # Readable by all (a checkpoint can be 0600 where it came from): the image's service user
            # reads it as is, where a chmod in the image build would store the file a second time.
            os.chmod(out, 0o644)
        if card is not None:
            (dest / CARD).write_text(card, encoding="utf-8")
            os.chmod(dest / CARD, 0o644)
        copied = dir_manifest(dest)
        if copied != manifest:  # a copy must never silently differ from what was recorded
            raise BentoError(f"copy of {model_dir} into the model store does not match its sha256 manifest")
    log.info("saved %s (%d files) to %s", tag, len(files), bentoml_home() / "models")
    return str(tag)


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------


def containerize_command(bento_tag: str) -> list[str]:
    """The command that turns a built bento into its OCI image (needs a Docker engine).

    ``phiops containerize VERSION``: it runs ``bentoml containerize`` with the build arguments
    the bento's Dockerfile template needs (base image, the wheelhouse it serves); a bare
    ``bentoml containerize`` would have no wheelhouse to install from (phiops.container).
    """
    return ["phiops", "containerize", bento_tag.split(":", 1)[1]]


def _bento_name(bentofile: Path) -> str:
    data = yaml.safe_load(bentofile.read_text(encoding="utf-8")) or {}
    name = data.get("name")
    if not name:
        raise BentoError(f"{bentofile}: no `name`; phiops needs a fixed bento name")
    return str(name)


def _phiops_wheel(source: Path, dest: Path, timeout: float) -> Path:
    """Build the ``phiops`` wheel (no dependencies) from the checkout at `source` into `dest`.

    The sources are copied to a scratch directory first, so the build leaves nothing (``build/``,
    ``*.egg-info``) in the checkout; no build isolation, so nothing is fetched.
    """
    if not (source / "pyproject.toml").is_file() or not (source / "src/phiops/__init__.py").is_file():
        raise BentoError(f"{source}: not a phiops checkout (pyproject.toml and src/phiops/ expected); "
                         "a bento ships the phiops package built from it")
    scratch = dest / "source"
    shutil.copytree(source / "src/phiops", scratch / "src/phiops",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(source / name, scratch / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--wheel-dir", str(dest), str(scratch)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BentoError(f"building the phiops wheel did not finish within {timeout:.0f}s") from None
    wheels = sorted(dest.glob("phiops-*.whl"))
    if res.returncode != 0 or len(wheels) != 1:
        raise BentoError(f"building the phiops wheel failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return wheels[0]


def _runtime_requirements(source: Path) -> list[str]:
    """pyproject.toml's ``[project] dependencies``: what the bento installs beside the wheel."""
    import tomllib

    deps = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return [str(d) for d in deps]


def build(
    model_tag: str,
    version: str,
    *,
    service_dir: Path,
    name: str | None = None,
    served_model_name: str | None = None,
    limits: ServeCfg | None = None,
    lock_packages: bool = True,
    timeout: float = 1800,
) -> str:
    """Build the bento of ``service_dir`` serving ``model_tag``, as ``<name>:<version>``.

    Runs ``bentoml build <service_dir> -f <bentofile> --version <version> --arg-file <args>``.
    The args file bakes the model tag (resolved to a concrete version) and every serving limit
    into the bento. The bentofile used is ``service_dir``'s plus the ``phiops`` wheel built from
    the checkout above ``service_dir`` (``python.wheels``), so the bento carries the serving code
    it imports. Python packages are pinned in bentofile.yaml and, with ``lock_packages``, locked
    against PyPI by uv (needs the package index). The docker section is kept, so
    ``phiops containerize <version>`` builds its image wherever a Docker engine exists.

    Idempotent: if the bento tag exists and was built for the same model and limits, it is
    returned without rebuilding.

    Args:
        model_tag: a model in the store, e.g. from :func:`save_model` (``name:latest`` resolves
            to the concrete version before it is baked in).
        version: the bento version (typically the model's registry version).
        service_dir: the directory holding service.py and bentofile.yaml (``services/`` of a
            phiops checkout).
        name: the bento's name; default the bentofile's. A project passes its own
            (:func:`phiops.registry.bento_tag`), as the store is shared by every project.
        served_model_name: the ``model`` id clients send; default the model tag's name.
        limits: the serving limits (``params.yaml``'s ``serve``); default ``ServeCfg()``'s.
        lock_packages: lock the Python requirements with uv; False keeps the pins as written
            (faster; for tests and offline builds).
        timeout: seconds before the build subprocess is killed.

    Returns:
        The bento tag, ``"<name>:<version>"``.

    Raises:
        BentoError: the model is not in the store, the bento tag exists for another model, the
            phiops wheel cannot be built, or ``bentoml build`` fails (its output tail included).
    """
    from bentoml.exceptions import NotFound

    service_dir = Path(service_dir).resolve()
    bentofile = service_dir / "bentofile.yaml"
    if not (service_dir / "service.py").is_file() or not bentofile.is_file():
        raise BentoError(f"{service_dir}: expected service.py and bentofile.yaml")
    try:
        model = _model_store().get(model_tag)
    except NotFound:
        raise BentoError(f"model {model_tag} is not in the store at {bentoml_home()}; save_model first") from None
    args: dict[str, Any] = {"model_tag": str(model.tag)}
    if served_model_name is not None:
        args["served_model_name"] = served_model_name
    args.update((limits or ServeCfg()).model_dump())

    bento_tag = f"{name or _bento_name(bentofile)}:{version}"
    try:
        existing = _bento_store().get(bento_tag)
    except NotFound:
        existing = None
    if existing is not None:
        if dict(existing.info.args or {}) == args:
            log.info("bento %s already built for %s", bento_tag, model.tag)
            return bento_tag
        raise BentoError(
            f"bento {bento_tag} exists with arguments {existing.info.args}, not {args}; "
            "build under a new version (or `bentoml delete` it)"
        )

    with tempfile.TemporaryDirectory(prefix="phiops-bento-") as tmp:
        args_file = Path(tmp) / "args.yaml"
        args_file.write_text(yaml.safe_dump(args, sort_keys=True), encoding="utf-8")
        # The build context is a scratch copy of service_dir plus the wheel: BentoML takes
        # `wheels` only as paths inside the context, and the checkout is left untouched.
        ctx = Path(tmp) / "context"
        shutil.copytree(service_dir, ctx, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        wheel = _phiops_wheel(service_dir.parent, Path(tmp) / "wheel", timeout)
        (ctx / "wheels").mkdir()
        shutil.copy2(wheel, ctx / "wheels" / wheel.name)
        config = yaml.safe_load(bentofile.read_text(encoding="utf-8"))
        config["name"] = bento_tag.partition(":")[0]
        python = config.setdefault("python", {})
        python["packages"] = _runtime_requirements(service_dir.parent)
        python["wheels"] = [*python.get("wheels", []), f"wheels/{wheel.name}"]
        if not lock_packages:
            python["lock_packages"] = False
        bentofile = ctx / "bentofile.yaml"
        bentofile.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        cmd = [*bentoml_cli(), "build", str(ctx), "-f", str(bentofile), "--version", version,
               "--arg-file", str(args_file), "-o", "tag"]
        log.info("building bento %s: %s", bento_tag, " ".join(cmd))
        t0 = time.perf_counter()
        try:
            # cwd: BentoML resolves `wheels` against the working directory as well as the context.
            res = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=timeout, cwd=ctx)
        except subprocess.TimeoutExpired:
            raise BentoError(f"bentoml build did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-30:])
        raise BentoError(f"bentoml build failed (exit {res.returncode}):\n{tail}")
    found = _TAG_OUT.search(res.stdout)
    built = found.group(1) if found else bento_tag
    if built != bento_tag:
        raise BentoError(f"bentoml build produced {built}, expected {bento_tag}")
    log.info("built %s in %.1fs; its image: %s",
             built, time.perf_counter() - t0, " ".join(containerize_command(built)))
    return built


__all__ = [
    "BentoError",
    "bentoml_cli",
    "cli_env",
    "CHECKPOINT_SUBDIR",
    "ModelError",
    "bentoml_home",
    "build",
    "containerize_command",
    "save_model",
]
