"""Process-wide torch settings a stage changes are put back, and a multi-GPU host trains on one. No GPU."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from phiops import torch_state


def _leak_like_a_trainer() -> None:
    """What Trainer/accelerate/kernels set process-wide on a GPU host (all settable on CPU builds)."""
    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.fp32_precision = "tf32"  # transformers' enable_tf32 on torch >= 2.9
    torch.backends.cuda.matmul.allow_tf32 = True  # accelerate, older transformers (the legacy API)
    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.enable_math_sdp(False)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_default_dtype(torch.float64)


def test_scoped_puts_back_every_setting_and_legacy_reads_still_work():
    before = torch_state.snapshot()
    with torch_state.scoped(tf32=True):
        _leak_like_a_trainer()
        assert torch_state.snapshot() != before
    assert torch_state.snapshot() == before
    # After a mix of legacy and new-API writes torch refuses legacy reads unless both agree again.
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_scoped_restores_after_an_exception_too():
    before = torch_state.snapshot()
    with pytest.raises(RuntimeError):
        with torch_state.scoped():
            _leak_like_a_trainer()
            raise RuntimeError("the stage failed")
    assert torch_state.snapshot() == before


def test_tf32_is_on_inside_the_scope_only():
    with torch_state.scoped(tf32=True):
        if hasattr(torch.backends, "fp32_precision"):
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        else:
            assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 is False


# -- a multi-GPU host: one device per process, data parallelism only through a launcher ---------

def test_one_process_drives_at_most_one_gpu():
    from phiops.stages import train

    assert train.gpus_per_process(visible=0, world=1) == 0  # CPU
    assert train.gpus_per_process(visible=1, world=1) == 1
    assert train.gpus_per_process(visible=2, world=1) == 1  # not nn.DataParallel (SFTTrainer refuses it)
    assert train.gpus_per_process(visible=8, world=8) == 1  # torchrun: one GPU per rank


def test_two_visible_gpus_train_on_the_first_and_say_how_to_use_both(caplog):
    from phiops.stages import train

    args = SimpleNamespace(_n_gpu=2, n_gpu=2)  # what TrainingArguments counts with no launcher
    with caplog.at_level(logging.WARNING, logger="phiops"):
        train._one_device_per_process(args, visible=2, world=1)
    assert args._n_gpu == 1
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "2 GPUs visible to one process: training on cuda:0 only" in msg and "torchrun --nproc_per_node 2" in msg

    caplog.clear()
    ddp = SimpleNamespace(_n_gpu=1, n_gpu=1)  # a torchrun rank: Trainer already counts one
    train._one_device_per_process(ddp, visible=2, world=2)
    assert ddp._n_gpu == 1 and not caplog.records
