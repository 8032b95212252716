"""pretrain's DDP set-up: each torchrun rank on its own GPU (mocked: no GPU here)."""

import pytest
import torch
from torch import distributed as dist

from fastlm.train import PretrainConfig, pretrain


class _Stop(Exception):
    """Raised by the mocked init_process_group: the test needs nothing after it."""


@pytest.mark.parametrize("device", [None, "cuda"])
def test_torchrun_rank_sets_its_gpu_before_the_process_group(tmp_path, monkeypatch, device):
    """LOCAL_RANK=1 of two: cuda:1 becomes the current device, then NCCL starts with device_id cuda:1."""
    calls = []

    def init_process_group(backend, **kwargs):
        calls.append(("init_process_group", backend, kwargs))
        raise _Stop

    for name, value in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(_Stop):
        pretrain(PretrainConfig("bert", str(tmp_path), device=device, progress=False))
    assert calls == [
        ("set_device", 1),
        ("init_process_group", "nccl", {"device_id": torch.device("cuda", 1)}),
    ]
