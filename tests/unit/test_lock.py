"""The install locks (scripts/lock/*.txt, what scripts/demo.sh and scripts/test.sh install) must agree with pyproject.toml.

A pin changed in pyproject.toml without `bash scripts/lock.sh` fails here, not on a user's machine.
"""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What the lock was resolved for (scripts/lock.sh: CPython 3.11, x86_64 manylinux).
LOCK_ENV = {"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux",
            "python_version": "3.11", "python_full_version": "3.11.0", "implementation_name": "cpython"}
# extras of each lock file; the default dependencies are in both
LOCKS = {"pipeline.txt": ["pipeline"], "pipeline-test.txt": ["pipeline", "test"]}


def parse_lock(text: str) -> dict[str, tuple[Version, list[str]]]:
    """A hashed requirements file (uv pip compile --generate-hashes) as {name: (version, hashes)}.

    Raises:
        ValueError: a requirement line that is not `name==version`.
    """
    entries: dict[str, tuple[Version, list[str]]] = {}
    # one entry per logical line: backslash continuations joined, comments dropped
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.split("#", 1)[0].strip()  # "# via ..." comments; a hash has no "#"
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        if not m:
            raise ValueError(f"not a pinned, hashed requirement: {line!r}")
        entries[canonicalize_name(m.group(1))] = (Version(m.group(2)), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
    return entries


def wanted(extras: list[str]) -> list[Requirement]:
    """pyproject's requirements for the default set plus `extras`, those whose markers hold on the lock's platform."""
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LOCK_ENV)]


@pytest.fixture(scope="module", params=sorted(LOCKS))
def lock(request):
    return request.param, parse_lock((ROOT / "scripts" / "lock" / request.param).read_text())


def test_every_pin_is_locked_at_its_version(lock):
    name, entries = lock
    problems = []
    for req in wanted(LOCKS[name]):
        key = canonicalize_name(req.name)
        if key not in entries:
            problems.append(f"{req} is not in scripts/lock/{name}")
            continue
        version = entries[key][0]
        exact = [s.version for s in req.specifier if s.operator == "=="]
        # an exact pin must be that release; a local build of it (torch's +cpu) is the same release
        if exact and Version(exact[0]) != Version(version.public):
            problems.append(f"{req}: scripts/lock/{name} has {version}")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req}: scripts/lock/{name} has {version}")
    assert not problems, "pyproject.toml and the lock disagree (run bash scripts/lock.sh):\n" + "\n".join(problems)


def test_every_locked_file_is_hashed(lock):
    name, entries = lock
    assert [n for n, (_, hashes) in entries.items() if not hashes] == [], f"scripts/lock/{name}: packages without hashes"


# nvidia-* packages a CPU lock may hold: NVML's bindings (the benches read the GPU's clocks), and NVRTC for the
# test extra (tests/unit/test_mma.py compiles phiops.serve.mma's CUDA C++ with no GPU). torch's CUDA runtime wheels
# (cuBLAS, cuDNN, NCCL, ...) must not come in.
NVIDIA_ALLOWED = {"pipeline.txt": {"nvidia-ml-py"}, "pipeline-test.txt": {"nvidia-ml-py", "nvidia-cuda-nvrtc"}}


def test_torch_is_the_cpu_build(lock):
    name, entries = lock
    assert entries["torch"][0].local == "cpu", f"scripts/lock/{name} locks {entries['torch'][0]}, not torch's CPU build"
    cuda = [n for n in entries if n.startswith("nvidia-") and n not in NVIDIA_ALLOWED[name]]
    assert not cuda, f"CUDA wheels in a CPU lock: {cuda}"


def test_the_two_locks_agree():
    small = parse_lock((ROOT / "scripts" / "lock" / "pipeline.txt").read_text())
    big = parse_lock((ROOT / "scripts" / "lock" / "pipeline-test.txt").read_text())
    differ = {n: (v, big.get(n, (None,))[0]) for n, (v, _) in small.items() if big.get(n, (None,))[0] != v}
    assert differ == {}, "lock/pipeline.txt must be scripts/lock/pipeline-test.txt less the test tools"


def test_parse_lock_refuses_an_unpinned_line():
    with pytest.raises(ValueError, match="not a pinned"):
        parse_lock("torch>=2\n")
