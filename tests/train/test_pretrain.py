import math
import os

import pytest
import torch

from fastlm.cli import main
from fastlm.train import load_checkpoint, pretrain


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_pretrain_runs_and_learns(small, tmp_path, family):
    history = pretrain(small(family, tmp_path, steps=10, eval_every=5))
    loss = history["loss"]
    assert len(loss) == 10 and all(math.isfinite(x) for x in loss)
    assert sum(loss[-3:]) / 3 < loss[0]
    assert [e["step"] for e in history["eval"]] == [5, 10]
    key = {"bert": "mlm_accuracy", "gpt": "perplexity", "t5": "token_accuracy"}[family]
    assert key in history["eval"][-1]
    for name in ("loss.png", "history.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert os.path.isfile(tmp_path / name), name
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000005.pt", "step-00000010.pt"]


def test_resume_is_bit_identical(small, tmp_path):
    """On the CPU also on a GPU machine: bit-identical resumes are promised on the CPU (README); on a GPU
    pretrain runs under bf16 autocast on kernels that torch does not promise to be deterministic."""
    full = pretrain(small("bert", tmp_path / "full", save_every=3, device="cpu"))
    pretrain(small("bert", tmp_path / "cut", save_every=3, device="cpu"))
    os.remove(tmp_path / "cut" / "checkpoints" / "step-00000006.pt")  # as if killed after step 3's checkpoint
    resumed = pretrain(small("bert", tmp_path / "cut", save_every=3, resume=True, device="cpu"))
    assert resumed["loss"] == full["loss"]
    a = load_checkpoint(str(tmp_path / "full" / "checkpoints" / "step-00000006.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "checkpoints" / "step-00000006.pt"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_bad_checkpoints_give_clear_errors(small, tmp_path):
    pretrain(small("gpt", tmp_path, steps=3, eval_every=3))
    path = tmp_path / "checkpoints" / "step-00000003.pt"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        pretrain(small("gpt", tmp_path, resume=True))
    assert path.read_bytes() == good[: len(good) // 2]  # left as it was
    path.write_bytes(good)
    with pytest.raises(ValueError, match="does not fit --preset"):
        pretrain(small("gpt", tmp_path, resume=True, preset="gpt2-medium"))
    with pytest.raises(ValueError, match="no checkpoint"):
        pretrain(small("gpt", tmp_path / "elsewhere", resume=True))


def test_bad_data(small, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        pretrain(small("gpt", tmp_path, data=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        pretrain(small("gpt", tmp_path, data=str(tmp_path / "empty.txt")))


def test_cli(corpus, tokenizer_dir, tmp_path, capsys):
    args = [
        "--data",
        corpus,
        "--tokenizer",
        tokenizer_dir("gpt"),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main(["pretrain", "gpt", *args, "--steps", "2", "--eval-every", "2", "--out", str(tmp_path)]) == 0
    assert os.path.isfile(tmp_path / "loss.png")
    assert main(["pretrain", "gpt", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_gradient_accumulation_matches_the_larger_batch(small, tmp_path):
    """In fp32 on the CPU also on a GPU machine, where pretrain trains under bf16 autocast: micro-batch
    gradients rounded to bf16 before they are summed would differ by more than the tolerance."""
    one = pretrain(small("gpt", tmp_path / "one", steps=3, eval_every=3, batch_size=4, device="cpu"))
    two = pretrain(small("gpt", tmp_path / "two", steps=3, eval_every=3, batch_size=2, grad_accum=2, device="cpu"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
