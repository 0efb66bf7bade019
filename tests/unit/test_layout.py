"""The house's import rules, read from the code: nothing loads through sys.path, nothing in
src/ imports upward (flows/, bench/), and serving stays importable without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY_DIRS = ("src", "flows", "services", "tests", "bench", "scripts", "infra")


def _py_files() -> list[Path]:
    return [p for d in PY_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every `import m` and `from m import ...` in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or ""))
    return out


def test_nothing_is_loaded_through_sys_path() -> None:
    # A bench script may import its own folder's helper (Python puts a script's folder on
    # sys.path itself); nothing anywhere edits sys.path to reach code.
    offenders = []
    for path in _py_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("insert", "append", "extend")
                    and ast.unparse(node.func.value) == "sys.path"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_test_modules_have_unique_names() -> None:
    # tests/ has no packages (rootdir-relative imports): pytest refuses a second test module with
    # a basename it has already imported, and then the whole run stops at collection.
    seen: dict[str, str] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = str(path.relative_to(ROOT))
        if path.name in seen:
            clashes.append(f"{seen[path.name]} and {rel}")
        seen.setdefault(path.name, rel)
    assert clashes == []


def test_test_modules_never_import_a_conftest() -> None:
    # Each tier has its own conftest.py, all imported as the module `conftest`: which one a test
    # module's `from conftest import X` finds depends on the collection order (CI collects e2e
    # first and failed on it). Shared helpers are fixtures.
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in (ROOT / "tests").rglob("*.py")
                 for line, name in _imports(path) if name == "conftest"]
    assert offenders == []


def test_src_never_imports_flows_or_bench() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} {name}" for path in (ROOT / "src").rglob("*.py")
                 for line, name in _imports(path) if name.split(".")[0] in ("flows", "bench", "_common", "service")]
    assert offenders == []


def test_service_module_imports_without_torch() -> None:
    """`bentoml build` imports the service to find it: that must not load torch or the pipeline."""
    code = (
        "import os, sys, runpy; os.environ['PHIOPS_MODEL_TAG'] = 'absent:v1'\n"
        f"runpy.run_path({str(ROOT / 'services/service.py')!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'prefect', 'dvc', 'great_expectations') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "HEAVY="
