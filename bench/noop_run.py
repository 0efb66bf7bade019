"""A no-op `phiops run` (nothing changed since the last run), before vs after, both server setups.

Run:  /work/main/.venv/bin/python bench/noop_run.py --demo /tmp/fc-demo --before main --after HEAD -n 5

For each code revision (`git archive` of src/ and flows/, no worktree): a copy of a project where
the demo chain already ran (`--demo`, read only: its DVC cache is hard-linked, not copied), with
that revision's flows/ committed in it (the flow file is what `phiops run` loads from the project;
flows/ is no DVC dep, so every stage stays up to date). Then, from a fresh process each time:
- temporary server: no PREFECT_API_URL, Prefect's (before) or phiops's (after) temporary server;
- running server: PREFECT_API_URL of a `prefect server start` this script started (infra/services.sh's setup).
One untimed run per (revision, setup) first: a fresh PREFECT_HOME creates its database then.
Timed runs alternate between revisions so the shared machine's load falls on both alike. Each run
must exit 0 with status "unchanged" and leave `git status` clean; `phiops --help` is timed too.
-> bench/results/noop_run_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from _common import _cpu_isa, _cpu_model, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench/results/noop_run_cpu.json"


def sh(*args: str, **kw) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout.strip()


def code_at(rev: str, dest: Path) -> str:
    """src/ and flows/ of `rev` under dest; returns the commit."""
    commit = sh("git", "-C", str(ROOT), "rev-parse", rev)
    dest.mkdir(parents=True)
    tar = dest / "code.tar"
    with tar.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src", "flows"], stdout=f, check=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return commit


def project(demo: Path, code: Path, dest: Path) -> None:
    """A copy of the demo project running `code`'s flow; git status clean, dvc status empty."""
    shutil.copytree(demo, dest, symlinks=True, ignore=shutil.ignore_patterns("cache"))
    subprocess.run(["cp", "-al", str(demo / ".dvc/cache"), str(dest / ".dvc/cache")], check=True)
    shutil.rmtree(dest / "flows")
    shutil.copytree(code / "flows", dest / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    gi = dest / ".gitignore"
    if "/.phiops/" not in gi.read_text():  # the demo predates the run lock (phiops.runlock)
        gi.write_text(gi.read_text() + "/.phiops/\n")
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench: flow under test",
       "--allow-empty", cwd=dest)
    status = sh(str(Path(sys.executable).with_name("dvc")), "status", "--json", cwd=dest)
    assert json.loads(status or "{}") == {}, f"{dest}: not a no-op, dvc status says {status}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "0"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    import urllib.request
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("prefect server did not start")


def load() -> float:
    return os.getloadavg()[0]


def timed_run(proj: Path, code: Path, home: Path, api_url: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONPATH=str(code / "src"), PREFECT_HOME=str(home),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    before = load()
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "phiops.cli", "run"], cwd=proj, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert out["status"] == "unchanged", out
    assert sh("git", "status", "--porcelain", cwd=proj) == "", f"{proj}: the run left the tree dirty"
    dvc_procs = res.stderr.count("Data and pipelines are up to date")  # one per `dvc repro` started (INFO log)
    return {"wall_s": round(wall, 2), "load1_before": round(before, 2), "dvc_repro_lines": dvc_procs}


def timed_help(code: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code / "src")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "phiops.cli", "--help"], env=env, check=True, capture_output=True)
    return round(time.perf_counter() - t0, 2)


def summary(xs: list[float]) -> dict:
    return {"min": min(xs), "median": round(statistics.median(xs), 2), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("/tmp/fc-demo"), help="a project where the chain already ran")
    ap.add_argument("--before", default="main")
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("-n", type=int, default=5, help="timed runs per revision and setup")
    ap.add_argument("--work", type=Path, default=Path("/tmp/noop-bench"))
    ap.add_argument("--out", type=Path, default=RESULT)
    a = ap.parse_args()

    shutil.rmtree(a.work, ignore_errors=True)
    revs = {}
    for name, rev in (("before", a.before), ("after", a.after)):
        code = a.work / f"code-{name}"
        revs[name] = {"rev": rev, "commit": code_at(rev, code), "code": code, "proj": a.work / f"proj-{name}"}
        project(a.demo, code, revs[name]["proj"])
        print(f"{name}: {rev} = {revs[name]['commit'][:10]}", flush=True)

    results: dict = {}
    server, url = start_server(a.work / "home-server")
    try:
        for setup, api_url in (("temporary_server", None), ("running_server", url)):
            homes = {name: (a.work / "home-server" if api_url else a.work / f"home-temp-{name}") for name in revs}
            runs: dict[str, list[dict]] = {name: [] for name in revs}
            first = {name: timed_run(r["proj"], r["code"], homes[name], api_url) for name, r in revs.items()}
            for i in range(a.n):
                for name, r in (revs.items() if i % 2 == 0 else reversed(revs.items())):
                    runs[name].append(timed_run(r["proj"], r["code"], homes[name], api_url))
                    print(f"{setup} {name} #{i + 1}: {runs[name][-1]}", flush=True)
            results[setup] = {name: {"first_run_untimed": first[name], "runs": runs[name],
                                     "wall_s": summary([x["wall_s"] for x in runs[name]])} for name in revs}
    finally:
        subprocess.run(["kill", "--", f"-{server.pid}"], check=False)
        server.wait(timeout=30)

    helps = {name: [] for name in revs}
    for _ in range(a.n):
        for name, r in revs.items():
            helps[name].append(timed_help(r["code"]))
    out = {
        "what": "no-op `phiops run` (every DVC stage up to date, production current) from a fresh process",
        "machine": {"cpu": _cpu_model(), "cpu_isa": _cpu_isa(), "cpus": os.cpu_count(),
                    "note": "shared: other engineers' jobs ran at the same time; load1_before is the 1-min load average"},
        "versions": versions(("prefect", "dvc")),
        "revisions": {name: {"rev": r["rev"], "commit": r["commit"]} for name, r in revs.items()},
        "demo_project": str(a.demo),
        "results": results,
        "phiops_help_s": {name: summary(x) for name, x in helps.items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(a.out)
    for setup, per in results.items():
        for name, r in per.items():
            print(f"{setup:17s} {name:6s} wall s: {r['wall_s']}")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
