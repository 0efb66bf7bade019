"""phiops.container without a Docker engine: wheelhouse inputs, platform tags, labels, the
in-image model check, and the Kubernetes manifests against the API's schemas (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from phiops import container
from phiops.io import sha256_file

ROOT = Path(__file__).resolve().parents[2]

REQS = """torch==2.13.0
transformers==5.17.0
bentoml==1.4.40
./wheels/phiops-0.1.0-py3-none-any.whl
bentoml==1.4.40
"""
LOCK = """--index-url https://pypi.org/simple
# via torch
nvidia-cublas==13.1.1.3
torch==2.13.0
transformers==5.17.0
triton==3.7.1
"""


def _bento(tmp_path: Path, lock: bool = True) -> Path:
    py = tmp_path / "bento/env/python"
    py.mkdir(parents=True)
    (py / "requirements.txt").write_text(REQS)
    if lock:
        (py / "requirements.lock.txt").write_text(LOCK)
    return tmp_path / "bento"


def test_cpu_wheelhouse_swaps_torch_and_keeps_the_lock_as_constraints(tmp_path: Path) -> None:
    reqs, cons = container.wheelhouse_inputs(_bento(tmp_path), "cpu")
    # The phiops wheel comes from the bento itself; BentoML's repeated bentoml pin is listed once.
    assert reqs == ["torch==2.13.0+cpu", "transformers==5.17.0", "bentoml==1.4.40"]
    # CUDA-only wheels stay constraints (never downloaded unless something requires them);
    # torch leaves them (pip treats torch==X+cpu under torch==X as a conflict); index lines go.
    assert cons == ["nvidia-cublas==13.1.1.3", "transformers==5.17.0", "triton==3.7.1"]


def test_cuda_wheelhouse_keeps_pypi_torch(tmp_path: Path) -> None:
    reqs, cons = container.wheelhouse_inputs(_bento(tmp_path), "cuda")
    # ===: exactly PyPI's build, never a local 2.13.0+cpu that pip's config may also find.
    assert reqs[0] == "torch===2.13.0" and "torch==2.13.0" in cons
    reqs, cons = container.wheelhouse_inputs(_bento(tmp_path / "nolock", lock=False), "cpu")
    assert reqs[0] == "torch==2.13.0+cpu" and cons == []


def test_wheelhouse_refuses_a_bento_without_an_exact_torch_pin(tmp_path: Path) -> None:
    bento = _bento(tmp_path)
    (bento / "env/python/requirements.txt").write_text("torch>=2\n")
    with pytest.raises(container.ContainerError, match="exact torch pin"):
        container.wheelhouse_inputs(bento, "cpu")
    with pytest.raises(container.ContainerError, match="requirements.txt is missing"):
        container.wheelhouse_inputs(tmp_path / "nothing", "cpu")


def test_platform_tags_follow_the_base_glibc() -> None:
    tags = container.platform_tags("2.36")
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_28_x86_64" in tags  # torch's tag
    assert tags[-1] == "manylinux2014_x86_64" and "manylinux_2_37_x86_64" not in tags
    with pytest.raises(container.ContainerError, match="2.17"):
        container.platform_tags("2.12")


def test_labels_carry_the_registry_lineage() -> None:
    record = {"artifact": "phiops-model", "version": "v3.0.0", "data_hash": "md5:abc", "git_rev": "c0ffee",
              "params": {"model": {"base": "builtin:smollm2-135m-instruct"}}}
    got = container.labels(record, bento_tag="phiops-llm:v3.0.0", bento_created="t0", base="phiops-base:bookworm",
                           base_id="sha256:1", variant="cpu", requirements="requirements-cpu-x.txt")
    assert got["org.opencontainers.image.version"] == "v3.0.0"
    assert got["org.opencontainers.image.revision"] == "c0ffee"
    assert got["org.opencontainers.image.base.name"] == "phiops-base:bookworm"
    assert got["dev.phiops.data_hash"] == "md5:abc" and got["dev.phiops.base_model"] == "builtin:smollm2-135m-instruct"
    assert got["dev.phiops.registry.version"] == "v3.0.0" and got["dev.phiops.bento"] == "phiops-llm:v3.0.0@t0"
    # A record without lineage says so, rather than leaving a label out.
    bare = container.labels({"artifact": "a", "version": "v1.0.0"}, bento_tag="b:v1", bento_created="t",
                            base="x", base_id="y", variant="cpu", requirements="r")
    assert bare["dev.phiops.data_hash"] == bare["dev.phiops.base_model"] == "unknown"


def test_image_names() -> None:
    assert container.image_ref("phiops-llm", "v2.0.0", "cpu") == "phiops-llm:v2.0.0"
    assert container.image_ref("phiops-llm", "v2.0.0", "cuda") == "phiops-llm:v2.0.0-cuda"
    assert container.default_base("cuda") == "phiops-base:bookworm-cuda"


def test_containerize_command_uses_the_docker_backend_on_the_host_network() -> None:
    cmd = container.containerize_cmd("phiops-llm:v1.0.0", "img:v1.0.0", {"BASE_IMAGE": "b"}, {"k": "v=1"})
    assert cmd[cmd.index("containerize") + 1] == "phiops-llm:v1.0.0"
    for opt in ("network=host", "build-arg=BASE_IMAGE=b", "label=k=v=1"):
        assert cmd[cmd.index(opt) - 1] == "--opt", opt
    assert cmd[cmd.index("--backend") + 1] == "docker" and cmd[cmd.index("--image-tag") + 1] == "img:v1.0.0"


def _stored_bento(tmp_path: Path) -> tuple[Path, Path]:
    ckpt = tmp_path / "bento/models/phiops-model/v1.0.0/checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    (ckpt / "config.json").write_text("{}")
    files = {p.name: sha256_file(p) for p in ckpt.iterdir()}
    meta = {"name": "phiops-model", "version": "v1.0.0", "metadata": {"phiops": {"files": files}}}
    (ckpt.parent / "model.yaml").write_text(yaml.safe_dump(meta))
    return tmp_path / "bento", ckpt / "model.safetensors"


def test_verify_bento_passes_intact_models_and_names_a_flipped_byte(tmp_path: Path, capsys) -> None:
    bento, weights = _stored_bento(tmp_path)
    assert container.verify_bento(bento) == ["phiops-model:v1.0.0"]
    assert container.main(["verify-bento", str(bento)]) == 0
    data = bytearray(weights.read_bytes())
    data[7] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"model.safetensors: sha256 .* but the manifest says"):
        container.verify_bento(bento)
    assert container.main(["verify-bento", str(bento)]) == 1
    assert "refusing to serve a damaged or altered model" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="not a phiops bento"):
        container.verify_bento(tmp_path / "empty")
    assert container.main(["verify"]) == 2


def test_refusal_lines_put_the_model_check_first() -> None:
    log = "\n".join(["[ERROR] Traceback (most recent call last):", "  File x, line 3"] * 8
                     + ["RuntimeError: m:v1: checkpoint files differ from the sha256 manifest ...; refusing to serve",
                        "  - model.safetensors: sha256 0a1b... but the manifest says 9f8e...",
                        "RuntimeError: m:v1: checkpoint files differ from the sha256 manifest ...; refusing to serve"])
    assert container._refusals(log) == [
        "RuntimeError: m:v1: checkpoint files differ from the sha256 manifest ...; refusing to serve",
        "- model.safetensors: sha256 0a1b... but the manifest says 9f8e..."]
    assert container._refusals("boom\nValueError: x") == ["ValueError: x"]


def test_wheelhouse_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import urllib.request

    (tmp_path / "a.txt").write_text("x")
    with container.serving_dir(tmp_path, 0 or _free_port()) as url:
        assert urllib.request.urlopen(f"{url}/a.txt", timeout=5).read() == b"x"
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(container.ContainerError, match="container.wheelhouse_port"):
            with container.serving_dir(tmp_path, port):
                pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# infra/k8s: validated offline against the Kubernetes API's JSON schemas
# --------------------------------------------------------------------------------------------

MANIFESTS = sorted((ROOT / "infra/k8s").glob("*.yaml"))


def _validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="the test extra brings kubernetes-validate")
    kv.validate(doc, "1.33.0", strict=True)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifests_match_the_api_schemas(manifest: Path) -> None:
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert docs
    for doc in docs:
        _validate(doc)


def test_k8s_deployment_runs_the_image_phiops_builds() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "infra/k8s/service.yaml").read_text()) if d}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    # The tag `phiops containerize` gives: the registry version.
    assert c["image"].rsplit("/", 1)[-1].startswith("phiops-llm:v")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1034
    port = c["ports"][0]["containerPort"]
    assert {"name": "BENTOML_PORT", "value": str(port)} in c["env"]


def test_k8s_validation_catches_a_broken_probe() -> None:
    pytest.importorskip("kubernetes_validate")
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((ROOT / "infra/k8s/service.yaml").read_text()) if d]
    broken = json.loads(json.dumps(docs[0]))
    probe = broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["pathh"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_pip_check_allows_only_the_packages_left_out_on_purpose() -> None:
    out = ("xgrammar 0.2.9 requires triton, which is not installed.\n"
           "phiops 0.1.0 requires httpx, which is not installed.\n"
           "foo 1.0 has requirement bar<2, but you have bar 2.1.\n")
    assert container.pip_check_problems(out, {"triton"}) == [
        "phiops 0.1.0 requires httpx, which is not installed.", "foo 1.0 has requirement bar<2, but you have bar 2.1."]
    assert len(container.pip_check_problems(out, set())) == 3
    assert container.pip_check_problems("No broken requirements found.\n", set()) == []

