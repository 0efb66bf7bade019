"""The promoted model as an OCI image on a real Docker engine: build, run, ask, refuse, roll back.

One project, two registered versions of a tiny random model shaped like the embedded one (a
Llama with SmolLM2's tokenizer and chat template). `phiops promote` with `container.on_promote`
and `deploy.on_promote: local` builds each version's image offline (Debian-made base, host
wheelhouse) and replaces the local container; `phiops rollback` puts v1's image back.

Needs a Docker engine (infra/container/engine.sh start): without one these tests skip, except in
CI (CI=true), where they fail. Images are tagged phiops-llm-e2e:*, the container
phiops-llm-e2e, on a free loopback port; the images stay as the next run's build cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from phiops import container, models
from phiops.cli import main
from phiops.paths import Layout, store_name
from phiops.registry import Registry
from phiops.serve.client import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.container]

ROOT = Path(__file__).resolve().parents[2]
IMAGE, NAME = "phiops-llm-e2e", "phiops-llm-e2e"
CAP = 16  # serve.max_new_tokens baked into the bentos
# The embedded model's family and tokenizer at a tiny size (seconds to build, ~30 MB).
TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.fixture(scope="module")
def engine() -> None:
    problem = container.engine_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the container tests and needs a Docker engine (.ci/run starts one): {problem}")
        pytest.skip(f"no Docker engine here ({problem}); `infra/container/engine.sh install && ... start` as root")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def project(engine: None, tmp_path_factory: pytest.TempPathFactory, builtin_model: Path) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("container")
    mp = pytest.MonkeyPatch()
    # A store of its own: a model version saved by an earlier run would keep that run's lineage.
    mp.setenv("BENTOML_HOME", str(tmp / "bentoml"))
    mp.setenv("BENTOML_DO_NOT_TRACK", "True")
    proj = tmp / "proj"
    proj.mkdir()
    # What a bento and an image are built from: the package source (the phiops wheel), the
    # service, the base-image recipe.
    for rel in ("src", "services", "infra", "pyproject.toml", "README.md", ".gto"):
        src = ROOT / rel
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        (shutil.copytree(src, proj / rel, ignore=ignore) if src.is_dir() else shutil.copy(src, proj / rel))
    port = free_port()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"]["max_new_tokens"] = CAP
    params["container"].update(on_promote=True, image=IMAGE)
    params["deploy"].update(on_promote="local", name=NAME, port=port, ready_timeout_s=300)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(proj, "init", "-q")
    _git(proj, "add", "-A")
    _git(proj, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    reg = Registry(Layout(proj), "phiops-model")
    records = {}
    for seed, variant in ((1, "merged"), (2, "gptq")):
        models.tiny_random(TINY, proj / "models" / variant, tokenizer_from=builtin_model, seed=seed)
        lineage = {"variant": variant, "data_hash": f"md5:e2e-data-{seed}", "git_rev": _git(proj, "rev-parse", "HEAD"),
                   "params": params}
        rec = reg.register(proj / "models" / variant, lineage)
        records[rec["version"]] = rec
    assert sorted(records) == ["v1.0.0", "v2.0.0"]
    info = {"root": proj, "port": port, "url": f"http://127.0.0.1:{port}", "records": records, "reg": reg}
    yield info
    container.stop_local(NAME)
    mp.undo()


def _cli(project: dict[str, Any], *args: str) -> int:
    return main(["--root", str(project["root"]), "--params", str(project["root"] / "params.yaml"), *args])


def _models(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]


@pytest.fixture(scope="module")
def v1(project: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    assert _cli(project, "promote", "v1.0.0", "--reason", "first image") == 0
    print(f"\npromote v1.0.0 (bento + image build + deploy): {time.perf_counter() - t0:.0f}s")
    assert project["reg"].production()["version"] == "v1.0.0"
    return project


def test_promoted_image_serves_the_openai_api(v1: dict[str, Any]) -> None:
    import httpx
    import openai

    url = v1["url"]
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = [m.id for m in oa.models.list().data]
    out = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "My router drops wifi."}],
                                     max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant" and 1 <= out.usage.completion_tokens <= 8
    stream = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "My router drops wifi."}],
                                        max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == out.choices[0].message.content
    # Grammar-constrained decoding works in the CPU image, which leaves triton out (container.CPU_UNUSED).
    js = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON please"}],
                                    max_tokens=8, temperature=0, response_format={"type": "json_object"})
    assert js.choices[0].finish_reason in ("stop", "length")
    absent = subprocess.run(["docker", "exec", NAME, "python", "-c",
                             "import importlib.util as u; print(u.find_spec('triton') is None)"],
                            capture_output=True, text=True, check=True).stdout
    assert absent.strip() == "True"
    with pytest.raises(openai.BadRequestError) as err:  # over serve.max_new_tokens: refused, not clamped
        oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=CAP + 1)
    assert err.value.status_code == 400


def test_models_lineage_and_image_labels_equal_the_registry_record(v1: dict[str, Any]) -> None:
    rec = v1["reg"].record("v1.0.0")
    served = _models(v1["url"])
    assert served["root"] == f"{store_name('phiops-model', v1['root'])}:v1.0.0"  # the project's store name
    assert served["lineage"] == {"artifact": "phiops-model", "registry_version": "v1.0.0",
                                 "data_hash": rec["data_hash"], "git_rev": rec["git_rev"],
                                 "git_tag": "phiops-model@v1.0.0"}
    info = container.image_inspect(f"{IMAGE}:v1.0.0")
    labels = info["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == labels["dev.phiops.registry.version"] == "v1.0.0"
    assert labels["org.opencontainers.image.revision"] == labels["dev.phiops.git_rev"] == rec["git_rev"]
    assert labels["dev.phiops.data_hash"] == rec["data_hash"]
    assert labels["dev.phiops.base_model"] == rec["params"]["model"]["base"]
    assert labels["org.opencontainers.image.base.name"] == "phiops-base:bookworm"
    # Non-root, health-checked on /readyz.
    assert info["Config"]["User"] == "bentoml"
    assert "/readyz" in " ".join(info["Config"]["Healthcheck"]["Test"])
    uid = subprocess.run(["docker", "exec", NAME, "id", "-u"], capture_output=True, text=True, check=True).stdout
    assert uid.strip() == "1034"
    # The model and code cannot be changed by the service user.
    touch = subprocess.run(["docker", "exec", NAME, "sh", "-c",
                            f"touch /home/bentoml/bento/models/{store_name('phiops-model', v1['root'])}"
                            "/v1.0.0/checkpoint/model.safetensors"],
                           capture_output=True, text=True)
    assert touch.returncode != 0 and "Permission denied" in touch.stderr
    deadline = time.monotonic() + 180  # checks every 10 s; generous for a loaded machine
    while container.container_state(NAME)["health"] != "healthy":
        assert time.monotonic() < deadline, f"docker's HEALTHCHECK never reported healthy: {container.container_state(NAME)}"
        time.sleep(2)


def test_an_image_with_one_model_byte_flipped_never_becomes_ready(v1: dict[str, Any], tmp_path: Path) -> None:
    weights = f"/home/bentoml/bento/models/{store_name('phiops-model', v1['root'])}/v1.0.0/checkpoint/model.safetensors"
    copy, work = f"{IMAGE}:v1.0.0-flipped", f"{NAME}-flipping"
    subprocess.run(["docker", "rm", "-f", work], capture_output=True)
    subprocess.run(["docker", "create", "--name", work, f"{IMAGE}:v1.0.0"], check=True, capture_output=True)
    try:
        subprocess.run(["docker", "cp", f"{work}:{weights}", str(tmp_path / "w")], check=True, capture_output=True)
        data = bytearray((tmp_path / "w").read_bytes())
        data[len(data) // 2] ^= 0x01
        (tmp_path / "w").write_bytes(bytes(data))
        subprocess.run(["docker", "cp", str(tmp_path / "w"), f"{work}:{weights}"], check=True, capture_output=True)
        subprocess.run(["docker", "commit", work, copy], check=True, capture_output=True)
    finally:
        subprocess.run(["docker", "rm", "-f", work], capture_output=True)
    try:
        with pytest.raises(container.ContainerError) as err:
            container.run_local(copy, name=f"{NAME}-flipped", host="127.0.0.1", port=free_port(), ready_timeout=180)
        msg = str(err.value)
        assert "checkpoint files differ from the sha256 manifest" in msg, msg
        assert "model.safetensors: sha256" in msg, msg
        assert container.container_state(f"{NAME}-flipped") is None  # removed, nothing left running
    finally:
        subprocess.run(["docker", "rmi", "-f", copy], capture_output=True)
    assert _models(v1["url"])["root"] == f"{store_name('phiops-model', v1['root'])}:v1.0.0"  # never noticed


def test_rollback_redeploys_the_previous_image(v1: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    import httpx

    url = v1["url"]
    t0 = time.perf_counter()
    assert _cli(v1, "promote", "v2.0.0", "--reason", "second image") == 0
    print(f"\npromote v2.0.0 (image build on cached layers + deploy): {time.perf_counter() - t0:.0f}s")
    assert _models(url)["lineage"]["registry_version"] == "v2.0.0"
    assert container.container_state(NAME)["image"] == f"{IMAGE}:v2.0.0"

    t0 = time.perf_counter()
    assert _cli(v1, "rollback", "--reason", "v2 misroutes billing") == 0
    print(f"rollback to v1.0.0 (image reused, redeployed): {time.perf_counter() - t0:.0f}s")
    out = capsys.readouterr().out
    assert f"image {IMAGE}:v1.0.0 (already built from the same bento" in out, out
    assert v1["reg"].production()["version"] == "v1.0.0"
    assert container.container_state(NAME)["image"] == f"{IMAGE}:v1.0.0"
    served = _models(url)
    assert served["lineage"]["registry_version"] == "v1.0.0" and served["root"] == f"{store_name('phiops-model', v1['root'])}:v1.0.0"
    res = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": served["id"], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] >= 1

    # The same image again by hand, then stopped: the CLI's deploy.
    assert _cli(v1, "deploy", "--local", "v1.0.0") == 0
    assert _cli(v1, "deploy", "--local", "--stop") == 0
    assert container.container_state(NAME) is None
    assert _cli(v1, "deploy", "--local", "--stop") == 0  # nothing to stop: still fine
    assert "no container" in capsys.readouterr().out


def test_cuda_plan_is_written_without_building(v1: dict[str, Any], tmp_path: Path) -> None:
    """The GPU variant's Dockerfile and build plan (building and running it needs a GPU machine)."""
    assert _cli(v1, "containerize", "v1.0.0", "--variant", "cuda", "--plan", str(tmp_path / "cuda")) == 0
    plan = json.loads((tmp_path / "cuda/build.json").read_text())
    assert plan["image"] == f"{IMAGE}:v1.0.0-cuda" and plan["base_image"] == "phiops-base:bookworm-cuda"
    assert plan["build_args"]["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert plan["build_args"]["WHEELHOUSE_SKIPPED"] == ""  # the CUDA image keeps triton: its kernels need it
    assert "torch===2.13.0" in plan["wheelhouse"]["requirements"]  # PyPI's CUDA build, nvidia-* with it
    dockerfile = (tmp_path / "cuda/Dockerfile").read_text()
    for line in ("FROM ${BASE_IMAGE}", "--no-index", "HEALTHCHECK", "USER bentoml", "verify-bento"):
        assert line in dockerfile, line
    assert "uv pip install" not in dockerfile  # BentoML's index install is replaced
