"""A registered version's model files: restored from DVC at the version's tag and checked by sha256.

The registry record (:mod:`phiops.registry`) holds the sha256 of every model file; whatever
loads a registered model (evaluating production, building a bento, a rollback) gets its files
through :func:`verified_files`, so a tampered or missing file is refused before it is read.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phiops.io import dir_manifest


# One error for every registry refusal. It lives here, below phiops.registry, because the file
# checks raise it too and the registry imports them: defined there, it would be an import cycle.
class RegistryError(RuntimeError):
    """The registry cannot do what was asked (no git repo, unknown version, tampered files)."""


def verify_files(want: dict[str, str], model_dir: Path, label: str) -> None:
    """Refuse `model_dir` unless its files are exactly `want` (relative path -> sha256).

    Raises:
        RegistryError: naming each missing, extra or changed file.
    """
    got = dir_manifest(model_dir)
    bad = sorted(
        [f"changed: {f}" for f in want if f in got and got[f] != want[f]]
        + [f"missing: {f}" for f in want if f not in got]
        + [f"unexpected: {f}" for f in got if f not in want]
    )
    if bad:
        raise RegistryError(f"{model_dir} does not match {label}: " + "; ".join(bad))


def version_rev(record: dict[str, Any]) -> str:
    """The git revision of a registered version: GTO's tag on its registration commit."""
    return f"{record['artifact']}@{record['version']}"


def fetch_files(root: Path, record: dict[str, Any], dest: Path) -> Path:
    """Restore a registered version's model files into `dest` and check them against the record.

    The registration commit's dvc.lock pins the files by content hash; DVC reads them from its
    cache (or the configured remote) at that revision, whatever the working tree holds now.

    Returns:
        `dest`, holding exactly the recorded files.

    Raises:
        RegistryError: DVC cannot provide them (cache pruned and no remote: `dvc pull`), or
            their sha256 differ from the record.
    """
    from dvc.api import DVCFileSystem

    rev = version_rev(record)
    try:
        fs = DVCFileSystem(str(root), rev=rev)
        fs.get(record["model_path"], str(dest), recursive=True)
    except Exception as exc:  # DVC raises many kinds; all mean the same here
        raise RegistryError(
            f"cannot restore {record['model_path']} of {rev} from DVC ({type(exc).__name__}: {exc}); "
            "is the cache pruned? try `dvc pull`"
        ) from exc
    verify_files(record["files"], dest, rev)
    return dest


@contextlib.contextmanager
def verified_files(root: Path, record: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """A directory holding exactly a registered version's files, checked against its sha256.

    The working tree's ``model_path`` when it matches the record byte for byte; otherwise the
    files restored from DVC at the version's GTO tag into a temporary directory (removed when
    the block ends). Whatever loads a registered model goes through here.

    Yields:
        ``(directory, where it came from)``.

    Raises:
        RegistryError: the files cannot be restored, or their sha256 differ from the record
            (naming each changed, missing or unexpected file).
    """
    path = root / record["model_path"]
    if path.is_dir() and dir_manifest(path) == record["files"]:
        yield path, f"working tree {record['model_path']}"
        return
    with tempfile.TemporaryDirectory(prefix="phiops-restore-") as tmp:
        yield fetch_files(root, record, Path(tmp) / "model"), f"DVC cache at {version_rev(record)}"
