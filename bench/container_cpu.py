"""The CPU image of the embedded model: build time, size, start to /readyz, and load vs outside it.

Commands (as root with a Docker engine running: infra/container/engine.sh start; on the 2-core
machine about 20 and 10 minutes):

    python bench/container_cpu.py --rounds 2 --base --out bench/results/container_cpu.json
    python bench/container_cpu.py --rounds 2 --load-only --out bench/results/container_cpu_load.json

What it does, on the embedded default model (SmolLM2-135M-Instruct, 517 MB of safetensors):

1. saves the model to a temporary BentoML store and builds its bento the production way
   (`phiops.bento.build`, requirements locked by uv);
2. builds its image (`phiops.container.containerize`) three times: **cold** (an empty
   wheelhouse and no layer cache: every wheel downloaded, every layer built), **wheelhouse
   cached** (no layer cache: no index asked, every layer built) and **next version** (a second
   bento of the same model and requirements with the layer cache: what a promotion costs once
   one image exists). The base image's recipe is timed on its own (`--base`: it takes ~2 min);
3. reports the image's size by layer and the largest installed packages;
4. times container start to `/readyz` 200 (`docker run --network host`, three starts);
5. runs `serve_cpu_load.py`'s load (32 concurrent clients, 192 support-ticket requests a round,
   `max_tokens` 32, greedy) against the container and against `bentoml serve` of the same bento
   outside it, alternating round by round after one uncounted warm-up round each, and reports
   container / outside requests/s: the goal is >= 0.9 (the container costs nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import versions  # bench/ is on the path when this runs as a script
from serve_cpu_load import CLIENTS, MAX_TOKENS, _load, _prompts

ROOT = Path(__file__).resolve().parents[1]

IMAGE = "phiops-llm-bench"


def _record(version: str) -> dict[str, Any]:
    return {"artifact": "phiops-model", "version": version, "data_hash": "md5:bench", "git_rev": "bench",
            "params": {"model": {"base": "builtin:smollm2-135m-instruct"}}}


def _du(ref: str) -> dict[str, int]:
    """MB of the largest folders of the image's venv, and of the bento."""
    script = ("du -sm /app/.venv/lib/python3.11/site-packages/* /home/bentoml/bento/models "
              "/usr/lib/x86_64-linux-gnu /usr/lib/python3.11 2>/dev/null | sort -rn | head -14")
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", ref, "-c", script],
                         capture_output=True, text=True, check=True).stdout
    return {line.split("\t")[1]: int(line.split("\t")[0]) for line in out.strip().splitlines()}


def _layers(ref: str) -> list[dict[str, Any]]:
    out = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{json .}}", ref],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.strip().splitlines()]
    return [{"size": r["Size"], "step": r["CreatedBy"][:160]} for r in rows if r["Size"] not in ("0B", "0")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/container_cpu.json")
    ap.add_argument("--rounds", type=int, default=2, help="counted load rounds per side (serve_cpu_load: 3)")
    ap.add_argument("--requests", type=int, default=192, help="per round")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--base", action="store_true", help="also time infra/container/base-image.sh (~2 min)")
    ap.add_argument("--load-only", action="store_true",
                    help="only the load comparison (one image, built with the layer cache and $PHIOPS_CACHE/wheelhouse)")
    args = ap.parse_args(argv)

    from phiops import bento, container, models
    from phiops.config import ServeCfg
    from phiops.serve import client

    container.require_engine()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each phase: a run stopped midway keeps what it measured
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    home = Path(tempfile.mkdtemp(prefix="phiops-bench-bentoml-"))
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    result: dict[str, Any] = {
        "bench": "container_cpu",
        "command": " ".join(["python bench/container_cpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpu": cpu, "cpu_count": os.cpu_count(),
                    "docker": container.docker("version", "--format", "{{.Server.Version}}").stdout.strip()},
        "versions": versions(("torch", "transformers", "bentoml")),
        "model": "SmolLM2-135M-Instruct (embedded, 517 MB safetensors)",
        "loadavg_before": os.getloadavg(),
    }
    if args.load_only:
        return _load_only(args, result, save)
    if args.base:
        t0 = time.perf_counter()
        subprocess.run(["bash", str(ROOT / "infra/container/base-image.sh"), "--tag", "phiops-base:bench"],
                       check=True, capture_output=True)
        result["base_image_s"] = round(time.perf_counter() - t0, 1)
        result["base_image_bytes"] = container.image_inspect("phiops-base:bench")["Size"]
        container.docker("rmi", "phiops-base:bench")
        print(f"base image: {result['base_image_s']}s", flush=True)
    base = container.ensure_base(None, "cpu", ROOT)
    result["base"] = {"image": base, "bytes": container.image_inspect(base)["Size"]}

    path = models.ensure_builtin()
    limits = ServeCfg(max_new_tokens=MAX_TOKENS)
    bentos = {}
    for version in ("bench1", "bench2"):
        tag = bento.save_model(path, "phiops-model", version, {"registry": _record(version)})
        bentos[version] = bento.build(tag, version, service_dir=ROOT / "services", served_model_name="phiops-model",
                                      limits=limits, lock_packages=True)

    builds = {}
    wheelhouse = Path(tempfile.mkdtemp(prefix="phiops-bench-wheelhouse-"))
    common = {"root": ROOT, "image": IMAGE, "variant": "cpu", "base_image": None, "wheelhouse_dir": wheelhouse,
              "wheelhouse_port": 38519}
    for name, version, cold in (("cold", "bench1", True), ("wheelhouse_cached", "bench1", True),
                                ("next_version", "bench2", False)):
        t0 = time.perf_counter()
        out = container.containerize(bentos[version], _record(version), no_cache=cold, **common)
        builds[name] = {"seconds": round(time.perf_counter() - t0, 1), "build_s": out["seconds"],
                        "size_bytes": out["size_bytes"]}
        print(f"build {name}: {builds[name]['seconds']}s (docker build {out['seconds']}s), "
              f"{out['size_bytes'] / 1e9:.2f} GB", flush=True)
        result["builds"] = builds
        save()
    ref = f"{IMAGE}:bench1"
    result["size"] = {"image_bytes": container.image_inspect(ref)["Size"], "layers": _layers(ref),
                      "largest_mb": _du(ref)}
    save()

    name, port = "phiops-bench", client.free_port()
    starts = []
    for _ in range(args.starts):
        container.stop_local(name)
        starts.append(container.run_local(ref, name=name, host="127.0.0.1", port=port, ready_timeout=600)["ready_s"])
        print(f"start to /readyz: {starts[-1]}s", flush=True)
    result["start_to_ready_s"] = starts
    save()

    rounds = _compare_load(args, bentos["bench1"], ref, name, port, result, save)
    result["summary"] = {
        "build_cold_s": builds["cold"]["seconds"],
        "build_wheelhouse_cached_s": builds["wheelhouse_cached"]["seconds"],
        "build_next_version_s": builds["next_version"]["seconds"],
        "base_image_s": result.get("base_image_s"),
        "image_bytes": result["size"]["image_bytes"],
        "start_to_ready_s": starts,
        **_load_summary(rounds),
    }
    result["loadavg_after"] = os.getloadavg()
    for version in ("bench1", "bench2"):
        container.docker("rmi", f"{IMAGE}:{version}", check=False)
    save()
    print(json.dumps(result["summary"], indent=2))
    return 0


def _compare_load(args: argparse.Namespace, bento_tag: str, ref: str, name: str, port: int,
                  result: dict[str, Any], save: Any) -> list[dict[str, Any]]:
    """serve_cpu_load's load against the running container `name` and `bentoml serve` of the
    same bento outside it, alternating round by round after one warm-up round each."""
    from phiops import container
    from phiops.serve import client

    prompts = _prompts(args.requests)
    url_in = f"http://127.0.0.1:{port}"
    rounds: list[dict[str, Any]] = []
    try:
        with client.serving(bento_tag, timeout=600) as url_out:
            asyncio.run(_load(url_in, prompts, CLIENTS))  # warm-up, not counted (as serve_cpu_load.py)
            asyncio.run(_load(url_out, prompts, CLIENTS))
            for i in range(args.rounds):
                inside = asyncio.run(_load(url_in, prompts, CLIENTS))
                outside = asyncio.run(_load(url_out, prompts, CLIENTS))
                rounds.append({"container": inside, "outside": outside, "loadavg": os.getloadavg()})
                print(f"round {i}: container {inside['requests_per_s']:.3f} req/s, outside "
                      f"{outside['requests_per_s']:.3f} req/s", flush=True)
                result["load"] = {"clients": CLIENTS, "requests_per_round": args.requests,
                                  "max_tokens": MAX_TOKENS, "rounds": rounds}
                save()
    finally:
        container.stop_local(name)
    return rounds


def _load_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def rate(side: str, key: str = "requests") -> float:
        done = sum(r[side]["requests"] - r[side]["errors"] if key == "requests" else r[side][key] for r in rounds)
        return done / sum(r[side]["wall_s"] for r in rounds)

    return {
        "container_requests_per_s": round(rate("container"), 4),
        "outside_requests_per_s": round(rate("outside"), 4),
        "ratio_requests_per_s": round(rate("container") / rate("outside"), 3),
        "ratio_output_tokens_per_s": round(rate("container", "output_tokens") / rate("outside", "output_tokens"), 3),
        "errors": sum(r[s]["errors"] for r in rounds for s in ("container", "outside")),
        "goal": "container requests/s >= 0.9x outside",
    }


def _load_only(args: argparse.Namespace, result: dict[str, Any], save: Any) -> int:
    """One image of the embedded model's bento (layer cache, the default wheelhouse), then the load."""
    from phiops import bento, container, models
    from phiops.config import ServeCfg
    from phiops.models import cache_dir
    from phiops.serve import client

    base = container.ensure_base(None, "cpu", ROOT)
    tag = bento.save_model(models.ensure_builtin(), "phiops-model", "bench1", {"registry": _record("bench1")})
    bento_tag = bento.build(tag, "bench1", service_dir=ROOT / "services", served_model_name="phiops-model",
                            limits=ServeCfg(max_new_tokens=MAX_TOKENS), lock_packages=True)
    out = container.containerize(bento_tag, _record("bench1"), root=ROOT, image=IMAGE, variant="cpu", base_image=None,
                                 wheelhouse_dir=cache_dir() / "wheelhouse", wheelhouse_port=38519)
    ref, name, port = out["image"], "phiops-bench", client.free_port()
    result["image"] = {"ref": ref, "bytes": out["size_bytes"], "base": base}
    result["start_to_ready_s"] = [container.run_local(ref, name=name, host="127.0.0.1", port=port,
                                                      ready_timeout=600)["ready_s"]]
    rounds = _compare_load(args, bento_tag, ref, name, port, result, save)
    result["summary"] = _load_summary(rounds)
    result["loadavg_after"] = os.getloadavg()
    save()
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
