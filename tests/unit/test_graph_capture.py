"""The decoders' CUDA graph captures (``phiops.serve.decode.capture``) run on the engine's thread
while other threads live: the capture must be in ``thread_local`` mode and no cyclic GC pass may run
inside it. On an H200, with the default mode, the fused decoder's capture in an engine was
invalidated once other tests' engines had run in the process, and every later capture failed. CI has
no GPU, so ``torch.cuda.graph`` is replaced by one that records how it was entered."""
from __future__ import annotations

import contextlib
import gc
from typing import Any

import pytest
import torch

from phiops.serve import decode


def test_capture_is_thread_local_with_the_cyclic_gc_paused(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    @contextlib.contextmanager
    def graph(cuda_graph: Any, pool: Any = None, capture_error_mode: str = "global", **_: Any) -> Any:
        seen.update(graph=cuda_graph, pool=pool, mode=capture_error_mode, gc_inside=gc.isenabled())
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    assert gc.isenabled()
    with decode.capture("g", pool="p"):
        assert not gc.isenabled()
    assert seen == {"graph": "g", "pool": "p", "mode": "thread_local", "gc_inside": False}
    assert gc.isenabled()
    with pytest.raises(RuntimeError), decode.capture("g"):  # a failed capture leaves the GC as it found it
        raise RuntimeError("capture failed")
    assert gc.isenabled()


def test_every_capture_in_the_serving_package_goes_through_it() -> None:
    from pathlib import Path

    calls = {p.name: p.read_text().count("torch.cuda.graph(") for p in Path(decode.__file__).parent.glob("*.py")}
    assert {name: n for name, n in calls.items() if n} == {"decode.py": 1}  # the one inside capture()
