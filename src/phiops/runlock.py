"""One pipeline run per checkout at a time: an exclusive lock held for the whole run.

A run changes shared state in three places that must move together: the DVC outputs in the
working tree, dvc.lock, and the registry (git commits and GTO tags). Two runs in one checkout
would interleave them: one run's candidate registered with the other's dvc.lock, or models
replaced under a run that is still evaluating them. The scheduled deployment has a Prefect
concurrency limit of 1, but that limit does not see a manual `phiops run` in the same
checkout, and a run suspended for approval frees its slot. So the flow itself takes
``.phiops/run.lock`` (``flock``; git-ignored) before it reads or writes anything.

A new run refuses at once when the lock is held: retraining takes minutes to hours, and the
scheduler tries again at the next slot. A deployment run that resumes after a person's
approval waits instead: it carries a decision that must not be lost.

The kernel drops a ``flock`` when its holder exits, however it exits (``kill -9`` included),
so a crashed run never leaves the checkout locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = Path(".phiops") / "run.lock"
POLL_S = 1.0  # how often a waiting run retries; a run lasts minutes, so a second is plenty
REPORT_S = 60.0  # a waiting run says who it waits for this often


class RunLockedError(RuntimeError):
    """Another phiops run holds this checkout; nothing was read or written."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another phiops run (it is starting, its details are not written yet)"
    return f"{info.get('owner', 'another phiops run')} (pid {info.get('pid')}, since {info.get('since')})"


def check_free(root: Path) -> None:
    """Refuse now if another run holds the checkout (before a run starts its Prefect server).

    Only a fast answer for the command line: the flow takes the lock itself with :func:`hold`.

    Raises:
        RunLockedError: another run holds it (named).
    """
    if (Path(root) / LOCK).exists():
        with hold(root, owner="phiops run (checking)"):
            pass


@contextlib.contextmanager
def hold(root: Path, owner: str, *, wait: bool = False, on_wait: Callable[[str], None] | None = None,
         poll_s: float = POLL_S) -> Iterator[Path]:
    """Hold the checkout's run lock for the duration of the block.

    Args:
        root: the project root.
        owner: who holds it, shown to a run that finds it taken (e.g. the flow run's name and id).
        wait: wait for the lock instead of refusing (a resumed run carrying an approval).
        on_wait: told, every minute of waiting, whom the run waits for.
        poll_s: seconds between attempts while waiting.

    Yields:
        The lock file's path.

    Raises:
        RunLockedError: `wait` is False and another run holds the lock (named in the message).
    """
    path = Path(root) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        last_report = float("-inf")
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise RunLockedError(
                        f"{holder} is running in {Path(root).resolve()} and holds {LOCK}; one run per checkout "
                        "at a time keeps dvc.lock, the registry and the working tree consistent. "
                        "Wait for it to end (a run waiting for approval: `phiops approvals`), then run again"
                    ) from None
                if on_wait is not None and time.monotonic() - last_report >= REPORT_S:
                    on_wait(f"waiting for {holder} to release {LOCK}")
                    last_report = time.monotonic()
                time.sleep(poll_s)
        info = {"owner": owner, "pid": os.getpid(), "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: no stale owner for the next reader
    finally:
        os.close(fd)  # closing the descriptor releases the flock
