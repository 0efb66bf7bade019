"""Crash-safe training checkpoints: a checkpoint counts only once its marker is in place.

transformers' Trainer writes `checkpoint-N` file by file (adapter, optimizer, scheduler, RNG,
trainer state); a `kill -9` in between leaves a directory that looks like a checkpoint and
is not one. So the Trainer writes into `<root>/.staging/`, and :func:`commit` then writes the
marker (fsynced) inside that directory and renames it to `<root>/checkpoint-N` in one step.
A directory at `<root>/checkpoint-N` without the marker, or anything in `.staging`, is debris
from a crash and :func:`clean` removes it.

The marker holds a fingerprint of what the run depends on (train params, base model, data):
a checkpoint of another config or other data is never resumed, it is discarded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "phiops_checkpoint_complete.json"
STAGING = ".staging"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the parent directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging(root: Path) -> Path:
    """Where the Trainer writes a checkpoint before it is committed."""
    return root / STAGING


def commit(written: Path, root: Path, step: int, fingerprint: str, keep: int = 1) -> Path:
    """Mark a fully written checkpoint complete and move it into place.

    Args:
        written: the directory the Trainer has finished writing (under :func:`staging`).
        root: the checkpoints directory.
        step: the global step it holds.
        fingerprint: see the module docstring; resumption requires the same one.
        keep: complete checkpoints to keep, newest first (older ones are removed after the
            new one is in place, so a crash never leaves zero usable checkpoints).

    Returns:
        The final path, `<root>/checkpoint-<step>`.
    """
    for f in written.rglob("*"):  # the Trainer does not fsync; the marker must not outrun the data
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    marker = written / MARKER
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump({"step": step, "fingerprint": fingerprint}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    final = root / f"checkpoint-{step}"
    if final.exists():  # a re-save of the same step (e.g. the last step): replace it whole
        shutil.rmtree(final)
    os.replace(written, final)
    _fsync_dir(root)
    for old in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step(path: Path) -> int | None:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def complete(root: Path) -> list[Path]:
    """Complete checkpoints (marker present) under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: _step(p) or 0)


def clean(root: Path) -> list[Path]:
    """Remove crash debris: the staging area and every checkpoint directory without a marker.

    Returns:
        The removed paths.
    """
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.name == STAGING or (p.is_dir() and _step(p) is not None and not (p / MARKER).is_file()):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.warning("removed incomplete checkpoint(s) left by a crash: %s", [p.name for p in removed])
    return removed


def resumable(root: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint written by the same config and data, if any.

    Complete checkpoints with another fingerprint are removed: resuming them would mix two runs.
    """
    clean(root)
    chosen = None
    for p in reversed(complete(root)):
        meta = json.loads((p / MARKER).read_text(encoding="utf-8"))
        if chosen is None and meta.get("fingerprint") == fingerprint:
            chosen = p
        elif meta.get("fingerprint") != fingerprint:
            log.warning("discarding %s: written by another config or data", p.name)
            shutil.rmtree(p, ignore_errors=True)
    return chosen
