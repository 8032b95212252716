import json
import os
import subprocess
import sys

import pytest


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_matches_single_process_with_twice_the_batch(corpus, tokenizer_dir, tmp_path):
    """2 gloo ranks with batch 2 each and one process with batch 4 see the same examples and the same masks
    (on the CPU also on a GPU machine: gloo, fp32, and no second GPU needed)."""
    common = ["pretrain", "bert", "--data", corpus, "--tokenizer", tokenizer_dir("bert"), "--seq-len", "32"]
    common += ["--steps", "3", "--eval-every", "3", "--no-progress", "--device", "cpu"]
    _run([sys.executable, "-m", "fastlm", *common, "--batch-size", "4", "--out", str(tmp_path / "single")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, "-m", "fastlm", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")])
    one = json.loads((tmp_path / "single" / "history.json").read_text())
    two = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
