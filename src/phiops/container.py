"""The OCI image of a built bento, and a local container of it.

:func:`containerize` runs BentoML's own ``bentoml containerize`` with the bento's Dockerfile
template (``services/Dockerfile.template``), on a Docker engine, fully offline:

1. **Base image**: ``container.base_image``, or ``phiops-base:bookworm`` (``-cuda``) made from
   Debian's packages by ``infra/container/base-image.sh`` when it is missing. The base is probed
   once (``python3.11`` present, its glibc) so that wheels are chosen for the glibc it has.
2. **Wheelhouse**: the bento's requirements (its uv lock as constraints when it has one; torch's
   CPU build for the CPU variant) are downloaded on the host with pip into
   ``container.wheelhouse`` and pinned exactly; the pins' file is named by the digest of what
   was asked, so a second build asks no index at all.
3. **Build**: the wheelhouse is served over HTTP on the host's loopback while ``bentoml
   containerize`` builds with host networking and the legacy builder (``DOCKER_BUILDKIT=0``):
   BentoML's BuildKit Dockerfile starts with a ``# syntax=docker/dockerfile`` line that BuildKit
   would pull from Docker Hub, and Debian's engine ships no buildx. Labels (OCI annotations and
   ``dev.phiops.*``) carry the registry version, data hash, git revision and base model.

An image already built from the same bento, base image and wheelhouse pins is not rebuilt.
:func:`run_local` replaces the local container with an image and waits for ``/readyz``;
when the new one does not become ready, the one it replaced is started again.

Inside the image, ``python -m phiops.container verify-bento DIR`` checks the bento's model files
against their sha256 manifests, and ``pip-check`` runs ``pip check`` allowing only the packages
left out on purpose (:data:`CPU_UNUSED`): both are build steps of the template.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OCI = "org.opencontainers.image."
LABEL = "dev.phiops."
BASE_SUITE = "bookworm"  # infra/container/base-image.sh's Debian release
# Options of a requirements file that name an index: the wheelhouse download uses pip's own.
_INDEX_OPTIONS = ("--index-url", "-i ", "--extra-index-url", "--find-links", "-f ", "--trusted-host")


# Packages the resolution brings that a CPU image never imports, left out of its pins (the pins
# are the whole resolved set, installed with --no-deps). triton (~690 MB installed): xgrammar
# requires it on Linux x86_64 for its CUDA mask kernel only; on CPU tensors it applies the mask in
# its C++ extension, and no phiops CPU path imports triton (tests/e2e/test_container.py asks the
# CPU image for a json_object answer with triton absent).
CPU_UNUSED = frozenset({"triton"})


class ContainerError(RuntimeError):
    """No Docker engine, or a base image, wheelhouse, image build or container failed."""


# --------------------------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------------------------


def docker_bin() -> str:
    """The ``docker`` client on PATH.

    Raises:
        ContainerError: there is none.
    """
    found = shutil.which("docker")
    if found is None:
        raise ContainerError("no `docker` on PATH: install and start an engine (infra/container/engine.sh)")
    return found


def docker(*args: str, timeout: float = 300, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS``; with `check`, a failure raises with docker's own message."""
    cmd = [docker_bin(), *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"`docker {' '.join(args[:3])} ...` did not finish within {timeout:.0f}s") from None
    if check and res.returncode != 0:
        raise ContainerError(f"`docker {' '.join(args[:3])} ...` failed: {(res.stderr or res.stdout).strip()[-2000:]}")
    return res


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no `docker` client on PATH (infra/container/engine.sh install)"
    try:
        res = docker("version", "--format", "{{.Server.Version}}", timeout=20, check=False)
    except ContainerError as exc:
        return str(exc)
    if res.returncode != 0:
        return f"the Docker engine does not answer (infra/container/engine.sh start): {res.stderr.strip()[-300:]}"
    return None


def require_engine() -> None:
    """Raises ContainerError when no Docker engine answers."""
    problem = engine_problem()
    if problem:
        raise ContainerError(problem)


def _inspect(kind: str, ref: str) -> dict[str, Any] | None:
    """``docker <kind> inspect`` of `ref`, or None when there is no such image/container."""
    res = docker(kind, "inspect", ref, check=False)
    if res.returncode != 0:
        if f"No such {kind}" in res.stderr or "No such object" in res.stderr:
            return None
        raise ContainerError(f"docker {kind} inspect {ref}: {res.stderr.strip()}")
    return json.loads(res.stdout)[0]


def image_inspect(ref: str) -> dict[str, Any] | None:
    """``docker image inspect`` of `ref`, or None when there is no such image."""
    return _inspect("image", ref)


def image_labels(ref: str) -> dict[str, str] | None:
    """The labels of image `ref`, or None when there is no such image."""
    info = image_inspect(ref)
    return None if info is None else dict(info["Config"].get("Labels") or {})


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def image_ref(image: str, version: str, variant: str) -> str:
    """``<image>:<version>``, ``-cuda`` appended for the GPU variant."""
    return f"{image}:{version}" + ("-cuda" if variant == "cuda" else "")


def default_base(variant: str) -> str:
    """The base image made by infra/container/base-image.sh for `variant`."""
    return f"phiops-base:{BASE_SUITE}" + ("-cuda" if variant == "cuda" else "")


# --------------------------------------------------------------------------------------------
# Base image
# --------------------------------------------------------------------------------------------


def ensure_base(base: str | None, variant: str, root: Path, timeout: float = 900) -> str:
    """The base image to build on, made from Debian's packages when it is the default and missing.

    Args:
        base: ``container.base_image`` (None: the default, phiops-base:bookworm[-cuda]).
        variant: ``cpu`` or ``cuda``.
        root: the phiops checkout (its infra/container/base-image.sh makes the default).
        timeout: seconds for making the default base.

    Returns:
        The base image reference.

    Raises:
        ContainerError: a configured base image is not on the engine, or making the default failed.
    """
    ref = base or default_base(variant)
    if image_inspect(ref) is not None:
        return ref
    if base is not None:
        raise ContainerError(f"base image {ref} (container.base_image) is not on this Docker engine: "
                             f"`docker pull {ref}` or `docker load` it first (builds never pull)")
    script = root / "infra/container/base-image.sh"
    if not script.is_file():
        raise ContainerError(f"{script} is missing: it makes the default base image {ref}")
    log.info("making base image %s from Debian's packages (%s --variant %s)", ref, script, variant)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(["bash", str(script), "--variant", variant, "--tag", ref], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"making base image {ref} did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        raise ContainerError(f"making base image {ref} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    log.info("base image %s made in %.0fs", ref, time.perf_counter() - t0)
    return ref


_PROBE = ("import json, platform, sys; "
          "print(json.dumps({'python': platform.python_version(), 'libc': platform.libc_ver()}))")


def probe_base(ref: str) -> dict[str, str]:
    """Python version and glibc version of a base image (one throwaway container).

    Raises:
        ContainerError: the image has no python3.11, or no glibc (musl images: no manylinux wheels).
    """
    res = docker("run", "--rm", "--network", "none", "--entrypoint", "python3.11", ref, "-c", _PROBE,
                 timeout=120, check=False)
    if res.returncode != 0:
        raise ContainerError(f"base image {ref} cannot run python3.11 (phiops pins Python 3.11): "
                             f"{(res.stderr or res.stdout).strip()[-500:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    libc, version = info["libc"]
    if libc != "glibc":
        raise ContainerError(f"base image {ref} has no glibc ({libc or 'unknown libc'}): torch's wheels need it")
    return {"python": info["python"], "glibc": version}


def platform_tags(glibc: str, machine: str = "x86_64") -> list[str]:
    """The wheel platform tags a glibc accepts, newest first (pip takes them one by one)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    if major != 2 or minor < 17:
        raise ContainerError(f"glibc {glibc} is older than manylinux2014's 2.17: no torch wheel runs on it")
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, 16, -1)]
    return [*tags, f"manylinux2014_{machine}"]


# --------------------------------------------------------------------------------------------
# Wheelhouse
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheelhouse:
    """Downloaded wheels and the exact pins one image installs from them."""

    dir: Path
    requirements: str  # file name inside `dir`: name==version, one a line
    pins: tuple[str, ...]
    downloaded: bool  # False: every wheel was there already (no index was asked)


def _req_name(line: str) -> str:
    import re

    return re.split(r"[\s=<>!~;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def wheelhouse_inputs(bento_dir: Path, variant: str) -> tuple[list[str], list[str]]:
    """What to download for a bento: (requirements, constraints), as pip requirement lines.

    The requirements are the bento's ``env/python/requirements.txt`` (pyproject's runtime pins)
    without its wheels (the phiops wheel is installed from the bento itself); its uv lock, when
    it has one, becomes constraints, so the image gets the locked versions. For the CPU variant
    ``torch==X`` becomes ``torch==X+cpu`` and leaves the constraints: the lock holds PyPI's CUDA
    build, whose nvidia-* and triton wheels (~4 GB) the CPU build does not need and, as
    constraints only, are then never downloaded. For the CUDA variant it becomes ``torch===X``:
    exactly PyPI's build, never a local ``X+cpu`` that pip's own config may offer.

    Raises:
        ContainerError: the bento has no requirements, or no exact torch pin to swap.
    """
    py = bento_dir / "env/python"
    req_file = py / "requirements.txt"
    if not req_file.is_file():
        raise ContainerError(f"{req_file} is missing: not a bento built by phiops.bento.build")
    reqs, seen = [], set()
    for line in req_file.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")) or line.endswith(".whl") or line.startswith(("./", "/")):
            continue
        if _req_name(line) in seen:  # BentoML appends bentoml==X even when it is listed
            continue
        seen.add(_req_name(line))
        reqs.append(line)
    lock = py / "requirements.lock.txt"
    cons = []
    if lock.is_file():
        for line in lock.read_text(encoding="utf-8").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#") and not line.startswith(_INDEX_OPTIONS) and not line.startswith("-"):
                cons.append(line)
    torch = [r for r in reqs if _req_name(r) == "torch"]
    if len(torch) != 1 or "==" not in torch[0]:
        raise ContainerError(f"{req_file}: expected one exact torch pin (torch==X) to choose its build")
    version = torch[0].split("==", 1)[1].lstrip("=").split("+", 1)[0].strip()
    if variant == "cpu":
        reqs = [f"torch=={version}+cpu" if _req_name(r) == "torch" else r for r in reqs]
        # pip cannot satisfy torch==X+cpu under a constraint torch==X (it treats them as a conflict).
        cons = [c for c in cons if _req_name(c) != "torch"]
    else:
        # torch==X also matches X+cpu (a local version), which pip prefers where its config finds
        # the CPU build; === is an exact string match: PyPI's X, the CUDA build.
        reqs = [f"torch==={version}" if _req_name(r) == "torch" else r for r in reqs]
    return reqs, cons


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _platform_args(tags: list[str]) -> list[str]:
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11", "--abi", "cp311"]
    for tag in tags:
        args += ["--platform", tag]
    return args


def _run_pip(cmd: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"{what} did not finish within {timeout:.0f}s") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if not ln.startswith("WARNING: Location")]
        raise ContainerError(f"{what} failed (exit {res.returncode}):\n" + "\n".join(lines[-25:]))
    return res


def wheelhouse(bento_dir: Path, dest: Path, *, variant: str, glibc: str, extra_index_url: str | None = None,
               timeout: float = 3600) -> Wheelhouse:
    """Download (or find) the wheels of a bento into `dest` and pin the exact set.

    Two pip runs: ``pip download`` for the base image's platform (the only one that asks an
    index), then an offline resolution from `dest` alone (``--no-index --dry-run --report``) that
    gives the exact set the image installs. The pins are saved as
    ``requirements-<digest>.txt``, the digest taken over everything asked (requirements,
    constraints, platform, index), so the same bento on the same base later skips both runs.

    Args:
        bento_dir: the built bento.
        dest: the wheelhouse directory (kept between builds; old versions beside new are harmless).
        variant: ``cpu`` or ``cuda``.
        glibc: the base image's glibc version (:func:`probe_base`).
        extra_index_url: one more index for the download (``container.extra_index_url``).
        timeout: seconds for each pip run.

    Returns:
        The wheelhouse.

    Raises:
        ContainerError: a package cannot be downloaded for that platform, or the set does not resolve.
    """
    reqs, cons = wheelhouse_inputs(bento_dir, variant)
    tags = platform_tags(glibc)
    skipped = sorted(CPU_UNUSED) if variant == "cpu" else []
    asked = {"requirements": reqs, "constraints": cons, "platform": tags, "variant": variant,
             "extra_index_url": extra_index_url, "skipped": skipped}
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]
    name = f"requirements-{variant}-{digest}.txt"
    dest.mkdir(parents=True, exist_ok=True)
    pinned = dest / name
    if pinned.is_file():
        pins = tuple(ln for ln in pinned.read_text(encoding="utf-8").splitlines() if ln.strip())
        missing = [p for p in pins if not _has_wheel(dest, p)]
        if not missing:
            log.info("wheelhouse %s: %d wheels pinned by %s, all present (no index asked)", dest, len(pins), name)
            return Wheelhouse(dest, name, pins, downloaded=False)
        log.info("wheelhouse %s: %d pinned wheels missing (%s...); downloading", dest, len(missing), missing[0])

    with tempfile.TemporaryDirectory(prefix="phiops-wheelhouse-") as tmp:
        req_file, con_file = Path(tmp) / "requirements.in", Path(tmp) / "constraints.txt"
        req_file.write_text("\n".join(reqs) + "\n", encoding="utf-8")
        con_file.write_text("\n".join(cons) + "\n", encoding="utf-8")
        index = ["--extra-index-url", extra_index_url] if extra_index_url else []
        t0 = time.perf_counter()
        log.info("downloading the %s wheelhouse of %s into %s (%d requirements, %d constraints)",
                 variant, bento_dir.name, dest, len(reqs), len(cons))
        _run_pip([*_pip(), "download", "--quiet", "-d", str(dest), *_platform_args(tags), *index,
                  "-r", str(req_file), "-c", str(con_file)], "pip download of the wheelhouse", timeout)
        log.info("wheelhouse downloaded in %.0fs", time.perf_counter() - t0)
        report = Path(tmp) / "report.json"
        # Offline, from the wheelhouse alone: the exact set the image will install.
        _run_pip([*_pip(), "install", "--quiet", "--dry-run", "--ignore-installed", "--no-index",
                  "--find-links", str(dest), "--target", str(Path(tmp) / "target"), "--report", str(report),
                  *_platform_args(tags), "-r", str(req_file), "-c", str(con_file)],
                 "resolving the wheelhouse offline", timeout)
        items = json.loads(report.read_text(encoding="utf-8"))["install"]
    pins = tuple(sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items
                        if _req_name(i["metadata"]["name"]) not in skipped))
    from phiops.io import write_text

    write_text(pinned, "\n".join(pins) + "\n")
    return Wheelhouse(dest, name, pins, downloaded=True)


def _has_wheel(dest: Path, pin: str) -> bool:
    name, version = pin.split("==", 1)
    stem = name.lower().replace("-", "_").replace(".", "_")
    return any(p.name.lower().startswith(f"{stem}-{version.lower()}-") for p in dest.glob("*.whl"))


@contextlib.contextmanager
def serving_dir(directory: Path, port: int) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1:`port` until the block ends; yield its URL.

    Raises:
        ContainerError: the port is taken (``container.wheelhouse_port``).
    """

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            log.debug("wheelhouse: " + format, *args)

    handler = functools.partial(Quiet, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as exc:
        raise ContainerError(f"cannot serve the wheelhouse on 127.0.0.1:{port} ({exc.strerror}); "
                             "set container.wheelhouse_port to a free port") from None
    thread = threading.Thread(target=server.serve_forever, name="wheelhouse", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------------


def labels(record: dict[str, Any], *, bento_tag: str, bento_created: str, base: str, base_id: str,
           variant: str, requirements: str) -> dict[str, str]:
    """The image's labels: OCI annotations and phiops' lineage of the version it serves.

    ``dev.phiops.bento``, ``.base.id`` and ``.wheelhouse`` name what the image was built from:
    an image whose three match is not rebuilt.
    """
    params = record.get("params") or {}
    base_model = (params.get("model") or {}).get("base") or "unknown"
    git_rev = record.get("git_rev") or "unknown"
    return {
        f"{OCI}title": "phiops-llm",
        f"{OCI}description": "OpenAI-compatible chat completions over one phiops model version",
        f"{OCI}version": record["version"],
        f"{OCI}revision": git_rev,
        f"{OCI}created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        f"{OCI}base.name": base,
        f"{OCI}base.digest": base_id,
        f"{LABEL}registry.artifact": record["artifact"],
        f"{LABEL}registry.version": record["version"],
        f"{LABEL}data_hash": str(record.get("data_hash") or "unknown"),
        f"{LABEL}git_rev": git_rev,
        f"{LABEL}base_model": base_model,
        f"{LABEL}variant": variant,
        f"{LABEL}bento": f"{bento_tag}@{bento_created}",
        f"{LABEL}wheelhouse": requirements,
    }


_SAME_BUILD = (f"{LABEL}bento", f"{OCI}base.digest", f"{LABEL}wheelhouse", f"{LABEL}registry.version")


def containerize_cmd(bento_tag: str, ref: str, build_args: dict[str, str], image_labels_: dict[str, str]) -> list[str]:
    """The ``bentoml containerize`` command line (docker backend, host network, args, labels)."""
    from phiops.bento import bentoml_cli

    cmd = [*bentoml_cli(), "containerize", bento_tag, "--backend", "docker", "--image-tag", ref,
           "--opt", "network=host"]
    for k, v in build_args.items():
        cmd += ["--opt", f"build-arg={k}={v}"]
    for k, v in image_labels_.items():
        cmd += ["--opt", f"label={k}={v}"]
    return cmd


def containerize(bento_tag: str, record: dict[str, Any], *, root: Path, image: str, variant: str,
                 base_image: str | None, wheelhouse_dir: Path, wheelhouse_port: int,
                 extra_index_url: str | None = None, rebuild: bool = False, no_cache: bool = False,
                 timeout: float = 3600) -> dict[str, Any]:
    """Build the OCI image of a built bento with ``bentoml containerize`` (module doc).

    Args:
        bento_tag: the bento (``phiops-llm:v3.0.0``) in the BentoML store.
        record: the registry record of the version the bento serves (labels).
        root: the phiops checkout (its infra/ makes the default base image).
        image: the image repository (``container.image``).
        variant: ``cpu`` or ``cuda``.
        base_image: ``container.base_image`` (None: the Debian-made default).
        wheelhouse_dir: where wheels are downloaded and kept.
        wheelhouse_port: the loopback port the build reaches the wheelhouse on.
        extra_index_url: one more index for the wheelhouse download.
        rebuild: build even when an image from the same bento, base and pins exists.
        no_cache: also ignore the engine's layer cache (benchmarks: a cold build).
        timeout: seconds for the build.

    Returns:
        ``{"image", "built", "seconds", "size_bytes", "labels", "base", "wheelhouse"}``.

    Raises:
        ContainerError: no engine, no usable base image, a wheel missing for the base's platform,
            or the build failed (the build log's tail included; a model file that differs from
            its manifest fails the build and is named there).
    """
    from phiops.bento import _bento_store, cli_env

    require_engine()
    bento = _bento_store().get(bento_tag)
    bento_dir = Path(bento.path)
    if not (bento_dir / "env/docker/Dockerfile.template").is_file():
        # BentoML's own template installs from the package index, which an offline build cannot reach.
        raise ContainerError(f"bento {bento.tag} was built without phiops' Dockerfile template "
                             "(services/Dockerfile.template); rebuild it with the current checkout: "
                             f"`bentoml delete {bento.tag} -y`, then `phiops containerize {record['version']}`")
    ref = image_ref(image, record["version"], variant)
    base = ensure_base(base_image, variant, root)
    base_id = image_inspect(base)["Id"]
    probed = probe_base(base)
    wh = wheelhouse(bento_dir, wheelhouse_dir, variant=variant, glibc=probed["glibc"],
                    extra_index_url=extra_index_url, timeout=timeout)
    want = labels(record, bento_tag=str(bento.tag), bento_created=bento.info.creation_time.isoformat(), base=base,
                  base_id=base_id, variant=variant, requirements=wh.requirements)
    have = image_labels(ref)
    if have is not None and not (rebuild or no_cache) and all(have.get(k) == want[k] for k in _SAME_BUILD):
        log.info("image %s was built from the same bento, base and wheelhouse pins: not rebuilt", ref)
        return {"image": ref, "built": False, "seconds": 0.0, "size_bytes": image_inspect(ref)["Size"],
                "labels": have, "base": base, "wheelhouse": str(wh.dir / wh.requirements)}

    with serving_dir(wh.dir, wheelhouse_port) as url:
        build_args = {"BASE_IMAGE": base, "WHEELHOUSE_URL": url, "WHEELHOUSE_REQUIREMENTS": wh.requirements,
                      "WHEELHOUSE_SKIPPED": " ".join(sorted(CPU_UNUSED)) if variant == "cpu" else ""}
        if variant == "cuda":
            build_args["NVIDIA_VISIBLE_DEVICES"] = "all"
        cmd = containerize_cmd(str(bento.tag), ref, build_args, want) + (["--opt", "no-cache"] if no_cache else [])
        log.info("building %s from %s on %s: %s", ref, bento.tag, base, " ".join(cmd[2:5]))
        t0 = time.perf_counter()
        # BentoML copies the bento into a temporary build context, then refuses to read the
        # Dockerfile template from it unless that lies under the working directory: the build
        # runs in a scratch directory that is also its TMPDIR.
        with tempfile.TemporaryDirectory(prefix="phiops-containerize-") as scratch:
            # The legacy builder: no BuildKit frontend to pull, no buildx needed (module doc).
            env = {**cli_env(), "DOCKER_BUILDKIT": "0", "DOCKER_SCAN_SUGGEST": "false", "TMPDIR": scratch}
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=scratch)
            except subprocess.TimeoutExpired:
                raise ContainerError(f"building {ref} did not finish within {timeout:.0f}s (container.build_timeout_s)") from None
        seconds = time.perf_counter() - t0
    info = image_inspect(ref)
    built_now = info is not None and all((info["Config"].get("Labels") or {}).get(k) == want[k] for k in _SAME_BUILD)
    if res.returncode != 0 or not built_now:
        out = (res.stdout + res.stderr).strip().splitlines()
        raise ContainerError(f"building image {ref} from {bento.tag} failed (exit {res.returncode}):\n"
                             + "\n".join(out[-40:]))
    log.info("built %s in %.0fs (%.2f GB)", ref, seconds, info["Size"] / 1e9)
    return {"image": ref, "built": True, "seconds": round(seconds, 1), "size_bytes": info["Size"],
            "labels": info["Config"]["Labels"], "base": base, "wheelhouse": str(wh.dir / wh.requirements)}


def plan(bento_tag: str, record: dict[str, Any], out_dir: Path, *, image: str, variant: str,
         base_image: str | None) -> dict[str, Any]:
    """Write what building a bento's image takes, without building it (no Docker engine needed).

    For a machine other than this one, the GPU variant above all: ``out_dir/Dockerfile`` is the
    Dockerfile BentoML rendered from phiops' template when the bento was built (the same for
    both variants), ``out_dir/build.json`` the image tag, base image, build arguments, labels and
    the wheelhouse's requirements and constraints for `variant`; ``phiops containerize --variant
    cuda`` on that machine does the rest.

    Returns:
        The contents of build.json.
    """
    from phiops.bento import _bento_store

    bento = _bento_store().get(bento_tag)
    bento_dir = Path(bento.path)
    reqs, cons = wheelhouse_inputs(bento_dir, variant)
    base = base_image or default_base(variant)
    build_args = {"BASE_IMAGE": base, "WHEELHOUSE_URL": "http://127.0.0.1:<container.wheelhouse_port>",
                  "WHEELHOUSE_REQUIREMENTS": f"requirements-{variant}-<digest>.txt (pinned on the build host)",
                  "WHEELHOUSE_SKIPPED": " ".join(sorted(CPU_UNUSED)) if variant == "cpu" else ""}
    if variant == "cuda":
        build_args["NVIDIA_VISIBLE_DEVICES"] = "all"
    info = {
        "image": image_ref(image, record["version"], variant),
        "bento": str(bento.tag),
        "variant": variant,
        "base_image": base,
        "base_image_recipe": None if base_image else f"infra/container/base-image.sh --variant {variant}",
        "build_args": build_args,
        "labels": labels(record, bento_tag=str(bento.tag), bento_created=bento.info.creation_time.isoformat(),
                         base=base, base_id="<base image id>", variant=variant,
                         requirements=build_args["WHEELHOUSE_REQUIREMENTS"]),
        "wheelhouse": {"requirements": reqs, "constraints": cons},
        "command": f"phiops containerize {record['version']} --variant {variant}",
        "run": ("docker run --gpus all --network host -e BENTOML_PORT=3000 " if variant == "cuda"
                else "docker run --network host -e BENTOML_PORT=3000 ") + image_ref(image, record["version"], variant),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bento_dir / "env/docker/Dockerfile", out_dir / "Dockerfile")
    (out_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


# --------------------------------------------------------------------------------------------
# Local container
# --------------------------------------------------------------------------------------------


def container_state(name: str) -> dict[str, Any] | None:
    """``docker inspect`` of container `name`: its image, labels and state; None if there is none."""
    info = _inspect("container", name)
    if info is None:
        return None
    return {"name": name, "image": info["Config"]["Image"], "labels": info["Config"].get("Labels") or {},
            "running": info["State"]["Running"], "exit_code": info["State"]["ExitCode"],
            "health": (info["State"].get("Health") or {}).get("Status")}


def logs(name: str, lines: int = 60) -> str:
    res = docker("logs", "--tail", str(lines), name, check=False)
    return (res.stdout + res.stderr).strip()


def _refusals(text: str) -> list[str]:
    """The log lines that say why a service did not start, once each: the model check's first
    (it names each file and both digests), else any error line."""
    def pick(keys: tuple[str, ...]) -> list[str]:
        return list(dict.fromkeys(ln.strip() for ln in text.splitlines() if any(k in ln for k in keys)))

    return (pick(("sha256", "refusing")) or pick(("Error", "error:", "Traceback")))[:12]


def _wait_ready(name: str, url: str, timeout: float) -> float:
    import httpx

    t0 = time.perf_counter()
    checked = t0
    with httpx.Client(timeout=5.0) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/readyz").status_code == 200:
                    return time.perf_counter() - t0
            # Whether it still runs, every few seconds: each look starts a docker client.
            if time.perf_counter() - checked > 3:
                checked = time.perf_counter()
                state = container_state(name)
                if state is None or not state["running"]:
                    code = state["exit_code"] if state else "gone"
                    raise ContainerError(f"container {name} exited ({code}) before {url}/readyz answered 200")
            if time.perf_counter() - t0 > timeout:
                raise ContainerError(f"container {name} not ready at {url}/readyz after {timeout:.0f}s")
            time.sleep(0.5)


def _remove(name: str) -> None:
    docker("rm", "--force", name, check=False, timeout=60)


def run_local(ref: str, *, name: str, host: str, port: int, ready_timeout: float,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Replace the local container `name` with image `ref` and wait until it is ready.

    The container runs with host networking (``docker run --network host``), listening on
    `host`:`port`. The container it replaces is stopped first (one port) and kept aside; it is
    removed once the new one answers ``/readyz`` 200, or started again when the new one exits or
    is not ready within `ready_timeout`.

    Returns:
        ``{"name", "image", "url", "ready_s", "replaced"}`` (replaced: the previous image, or None).

    Raises:
        ContainerError: no engine, no such image, or the container did not become ready (its log
            lines saying why included: a model that differs from its manifest is named there).
    """
    require_engine()
    if image_inspect(ref) is None:
        raise ContainerError(f"no image {ref} on this engine: `phiops containerize` builds it")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    aside = f"{name}-previous"
    previous = container_state(name)
    _remove(aside)
    if previous is not None:
        docker("stop", "--time", "30", name, timeout=90, check=False)
        docker("rename", name, aside)
    # PHIOPS_HOST: the service binds serve.host (127.0.0.1 by default), which the bento
    # carries; the deployment's host wins (phiops.serve.settings).
    run_env = {"BENTOML_HOST": host, "PHIOPS_HOST": host, "BENTOML_PORT": str(port), "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
    args = ["run", "--detach", "--name", name, "--network", "host", "--restart", "no"]
    for k, v in run_env.items():
        args += ["--env", f"{k}={v}"]
    log.info("starting %s as container %s on %s", ref, name, url)
    docker(*args, ref, timeout=120)
    try:
        ready = _wait_ready(name, url, ready_timeout)
    except ContainerError as exc:
        text = logs(name, 200)
        _remove(name)
        restored = ""
        if previous is not None:
            docker("rename", aside, name)
            if previous["running"]:
                docker("start", name, check=False)
                restored = f"; the previous container ({previous['image']}) was started again"
        why = _refusals(text) or text.splitlines()[-20:]
        raise ContainerError(f"{exc}{restored}. Its log says:\n  " + "\n  ".join(why)) from None
    _remove(aside)
    log.info("%s ready at %s after %.1fs", ref, url, ready)
    return {"name": name, "image": ref, "url": url, "ready_s": round(ready, 1),
            "replaced": previous["image"] if previous else None}


def stop_local(name: str) -> str | None:
    """Stop and remove the local container `name` (and a kept-aside previous one).

    Returns:
        The image it ran, or None when there was none.
    """
    require_engine()
    state = container_state(name)
    _remove(f"{name}-previous")
    if state is None:
        return None
    docker("stop", "--time", "30", name, timeout=90, check=False)
    _remove(name)
    return str(state["image"])


# --------------------------------------------------------------------------------------------
# Inside the image
# --------------------------------------------------------------------------------------------


def verify_bento(bento_dir: Path) -> list[str]:
    """Check every model of a bento against the sha256 manifest saved with it.

    Args:
        bento_dir: an unpacked bento (``$BENTO_PATH`` in the image): ``models/<name>/<version>/``.

    Returns:
        The model tags checked.

    Raises:
        RuntimeError: a bento without models, a model without a manifest, or a file that differs
            (named, with both digests' beginnings).
    """
    import yaml

    from phiops.serve.checkpoint import CHECKPOINT_SUBDIR, verify_checkpoint

    found = sorted((bento_dir / "models").glob("*/*/model.yaml"))
    if not found:
        raise RuntimeError(f"{bento_dir}: no models/<name>/<version>/model.yaml: not a phiops bento")
    checked = []
    for meta_file in found:
        info = yaml.safe_load(meta_file.read_text(encoding="utf-8"))
        tag = f"{info['name']}:{info['version']}"
        manifest = ((info.get("metadata") or {}).get("phiops") or {}).get("files")
        verify_checkpoint(str(meta_file.parent / CHECKPOINT_SUBDIR), manifest, tag)
        checked.append(tag)
    return checked


def pip_check_problems(output: str, skipped: frozenset[str] | set[str]) -> list[str]:
    """``pip check``'s problem lines, less "X requires Y, which is not installed" for a skipped Y."""
    problems = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        if line.endswith(", which is not installed.") and " requires " in line:
            needed = line.rsplit(" requires ", 1)[1].removesuffix(", which is not installed.")
            if _req_name(needed) in skipped:
                continue
        problems.append(line)
    return problems


def main(argv: list[str] | None = None) -> int:
    """Inside the image: ``verify-bento DIR`` (exit 0 when every model matches its manifest) and
    ``pip-check [SKIPPED...]`` (``pip check``, where only a left-out package may be missing)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["pip-check"]:
        res = subprocess.run([*_pip(), "check"], capture_output=True, text=True)
        problems = pip_check_problems(res.stdout + res.stderr, {_req_name(a) for a in args[1:]})
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"pip check: {'broken' if problems else 'consistent'}"
              + (f" (left out on purpose: {' '.join(args[1:])})" if args[1:] else ""))
        return 1 if problems else 0
    if len(args) != 2 or args[0] != "verify-bento":
        print("usage: python -m phiops.container verify-bento BENTO_DIR | pip-check [SKIPPED...]", file=sys.stderr)
        return 2
    try:
        tags = verify_bento(Path(args[1]))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{', '.join(tags)}: every file matches its sha256 manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
