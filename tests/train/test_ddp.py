"""pretrain's DDP set-up: each torchrun rank on its own GPU (mocked: no GPU here), and gradient accumulation
that all-reduces once per step (a real two-rank gloo run on the CPU)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
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


class _RecordingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that notes, at each forward, whether the backward that follows will all-reduce (False inside
    no_sync: the reducer then leaves the gradients local)."""

    syncs = []

    def forward(self, *args, **kwargs):
        _RecordingDDP.syncs.append(self.require_backward_grad_sync)
        return super().forward(*args, **kwargs)


def _rank(rank, world, port, config):
    """One torchrun-like rank: pretrain under a recording DDP, its per-forward sync flags written to OUT."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    torch.nn.parallel.DistributedDataParallel = _RecordingDDP
    try:
        pretrain(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(config.out, f"syncs{rank}.json"), "w") as f:
        json.dump(_RecordingDDP.syncs, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accumulation_all_reduces_only_on_the_last_micro_step(small, tmp_path):
    """2 gloo ranks x batch 2 x 3 micro-steps: no_sync on micro-steps 0 and 1 of every step, a synced backward
    on micro-step 2, and the same losses as one process with batch 4 x 3 micro-steps (the gradients kept
    local under no_sync reach the all-reduce of the last micro-step)."""
    steps, accum = 2, 3
    ddp = small("gpt", tmp_path / "ddp", steps=steps, eval_every=steps, batch_size=2, grad_accum=accum)
    mp.spawn(_rank, args=(2, _free_port(), ddp), nprocs=2)
    for rank in range(2):
        syncs = json.loads((tmp_path / "ddp" / f"syncs{rank}.json").read_text())
        assert syncs == ([False] * (accum - 1) + [True]) * steps, f"rank {rank}"
    one = pretrain(small("gpt", tmp_path / "one", steps=steps, eval_every=steps, batch_size=4, grad_accum=accum))
    two = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
