"""Pyflakes' checks (ruff's F rules, pyproject.toml) over the whole repository.

Much of the serving package runs only on CUDA (the fused decoder's tuning, its graph capture), and CI
has no GPU: an undefined name there passes every CPU test. 026101b left one in
``FusedDecoder._tune`` and every fused decoder on a GPU raised NameError at its first step; this
check names such a line instead.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_repository_has_no_undefined_names_or_unused_imports() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check (pyproject.toml's [tool.ruff.lint]):\n{proc.stdout}{proc.stderr}"
