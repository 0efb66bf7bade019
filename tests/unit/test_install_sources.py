"""scripts/_sources.sh hands pip's index configuration to uv (which reads no pip.conf): same sources, pip's precedence."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIP = Path(sys.executable).parent / "pip"
pytestmark = pytest.mark.skipif(not PIP.exists(), reason="needs the venv's pip (pip config get)")


def uv_sources(env: dict[str, str]) -> list[str]:
    """UV_SOURCES as scripts/_sources.sh builds it, one flag or value per item."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    script = '. scripts/_sources.sh; uv_sources_from_pip; printf "%s\\n" "${UV_SOURCES[@]}"'
    res = subprocess.run(["bash", "-c", script], cwd=ROOT, env={**base, "PIP": str(PIP), **env},
                         capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def test_pip_config_file_reaches_uv(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                    "extra-index-url = file:///opt/a/simple\n    file:///opt/b/simple\nfind-links = /opt/wheels\n")
    assert uv_sources({"PIP_CONFIG_FILE": str(conf)}) == [
        "--index-url", "https://mirror.example/simple",
        "--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
        "--find-links", "/opt/wheels", "--index-strategy", "unsafe-best-match"]


def test_pip_variables_win_over_its_config_files(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /from/file\n")
    got = uv_sources({"PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": "/from/env"})
    assert got == ["--find-links", "/from/env", "--index-strategy", "unsafe-best-match"]


def test_no_pip_config_leaves_uv_on_its_default_index():
    assert uv_sources({"PIP_CONFIG_FILE": os.devnull}) == ["--index-strategy", "unsafe-best-match"]
