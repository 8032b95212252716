import errno
import json
import math
import os

import pytest
import torch

import fastlm
from fastlm.cli import main
from fastlm.train import checkpoint as checkpoint_module
from fastlm.train import load_checkpoint, pretrain, save_checkpoint
from fastlm.train.tasks import Task, get_task
from fastlm.train.validate import TrainingError


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


def test_gpt_pack_documents(small, tmp_path):
    """--pack-documents: the documents of a block attend only within themselves (varlen attention, positions
    restarting); the run learns, the flag is kept on resume, and the other families refuse it."""
    before = fastlm.backends.calls.copy()
    history = pretrain(small("gpt", tmp_path, steps=6, eval_every=3, pack_documents=True))
    loss = history["loss"]
    assert all(math.isfinite(x) for x in loss) and sum(loss[-2:]) / 2 < loss[0]
    assert any(op == "varlen_attention" for op, _ in fastlm.backends.calls - before)
    with pytest.raises(ValueError, match="cannot change --pack-documents "):
        pretrain(small("gpt", tmp_path, steps=7, eval_every=3, resume=True))
    with pytest.raises(ValueError, match="--pack-documents is for gpt"):
        pretrain(small("bert", tmp_path / "bert", pack_documents=True))


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
    with pytest.raises(ValueError, match="cannot change --preset"):
        pretrain(small("gpt", tmp_path, resume=True, preset="gpt2-medium"))
    with pytest.raises(ValueError, match="no checkpoint"):
        pretrain(small("gpt", tmp_path / "elsewhere", resume=True))


def test_bad_data(small, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        pretrain(small("gpt", tmp_path / "run", data=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        pretrain(small("gpt", tmp_path / "run", data=str(tmp_path / "empty.txt")))


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


def test_fresh_run_refuses_a_used_out(small, tmp_path):
    """A failed run's tokenizer, or an old run's checkpoints, are never taken into a fresh run: it refuses
    a non-empty --out, and --overwrite clears it (a rerun then trains the same tokenizer again)."""
    (tmp_path / "few.txt").write_text("a short text, too short to train on.")
    with pytest.raises(ValueError, match="too few"):  # fails after training OUT/tokenizer
        pretrain(small("bert", tmp_path / "run", tokenizer=None, vocab_size=120, data=str(tmp_path / "few.txt")))
    assert os.path.isfile(tmp_path / "run" / "tokenizer" / "tokenizer.json")
    with pytest.raises(ValueError, match="is not empty .*--resume.*--overwrite"):
        pretrain(small("bert", tmp_path / "run", tokenizer=None, vocab_size=150))
    fresh = dict(tokenizer=None, vocab_size=150, steps=2, eval_every=2, overwrite=True)
    pretrain(small("bert", tmp_path / "run", **fresh))
    first = (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text()
    assert len(json.loads(first)["model"]["vocab"]) == 150
    pretrain(small("bert", tmp_path / "run", **{**fresh, "steps": 1, "eval_every": 1}))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-00000001.pt"]  # the old run's step 2: gone
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text() == first  # reproducible from the seed
    with pytest.raises(ValueError, match="one of them"):
        pretrain(small("bert", tmp_path / "run", resume=True, overwrite=True))


def test_resume_refuses_changes_that_break_exactness_and_applies_the_rest(small, tmp_path, capsys):
    pretrain(small("gpt", tmp_path, steps=2, eval_every=2))
    for change in ({"seed": 1}, {"batch_size": 2}, {"seq_len": 16}, {"data": "builtin"}, {"dropout": 0.1}):
        ((name, value),) = change.items()
        with pytest.raises(ValueError, match=f"cannot change --{name.replace('_', '-')} "):
            pretrain(small("gpt", tmp_path, steps=2, eval_every=2, resume=True, **change))
    with pytest.raises(ValueError, match="--steps 1 is below the step 2"):
        pretrain(small("gpt", tmp_path, steps=1, eval_every=2, resume=True))
    capsys.readouterr()
    pretrain(small("gpt", tmp_path, steps=3, eval_every=2, resume=True, lr=1e-3, clip=0.5))
    err = capsys.readouterr().err
    assert "applying the changed --steps 2 -> 3, --lr 0.003 -> 0.001, --clip 1.0 -> 0.5" in err
    state = load_checkpoint(str(tmp_path / "checkpoints" / "step-00000003.pt"))
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3, 1e-3]
    assert state["run"]["lr"] == 1e-3 and state["scheduler"]["base_lrs"] == [1e-3, 1e-3]


@pytest.mark.parametrize(
    "flag, value",
    [("clip", -1.0), ("lr", math.inf), ("lr", math.nan), ("lr", 0.0), ("min_lr_ratio", 2.0), ("dropout", 1.0),
     ("weight_decay", -0.1), ("warmup", -1), ("steps", 0), ("seed", -1), ("vocab_size", 2), ("max_chars", 0),
     ("eval_batches", 0), ("seq_len", 1), ("seq_len", 100_000)],
)  # fmt: skip
def test_numeric_flags_are_checked(small, tmp_path, flag, value):
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be"):
        pretrain(small("gpt", tmp_path, **{flag: value}))
    if flag != "seq_len":  # refused before anything is written (the position table needs the tokenizer)
        assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_refuses_bad_numbers_and_stops_on_a_non_finite_loss(corpus, tokenizer_dir, tmp_path, capsys):
    args = ["pretrain", "gpt", "--data", corpus, "--tokenizer", tokenizer_dir("gpt"), "--seq-len", "32"]
    args += ["--batch-size", "2", "--no-progress", "--steps", "4", "--eval-every", "4"]
    assert main([*args, "--clip", "-1", "--out", str(tmp_path / "a")]) == 2
    assert "--clip must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert main([*args, "--lr", "inf", "--out", str(tmp_path / "b")]) == 2
    assert "--lr must be a finite number > 0, got inf" in capsys.readouterr().err
    assert main([*args, "--lr", "1e30", "--clip", "0", "--warmup", "0", "--out", str(tmp_path / "c")]) == 1
    assert "fastlm pretrain: error: the loss became nan at step " in capsys.readouterr().err


def test_resume_falls_back_from_a_corrupt_newest_checkpoint(small, tmp_path, capsys):
    full = pretrain(small("gpt", tmp_path, steps=4, eval_every=2, device="cpu"))
    newest = tmp_path / "checkpoints" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    resumed = pretrain(small("gpt", tmp_path, steps=4, eval_every=2, device="cpu", resume=True))
    err = capsys.readouterr().err
    assert "step-00000004.pt' is unreadable or truncated" in err
    assert "resuming from" in err and "step-00000002.pt', the newest checkpoint that loads" in err
    assert resumed["loss"] == full["loss"]  # steps 3 and 4 again, bit-identically
    assert load_checkpoint(str(newest))["step"] == 4  # rewritten by the resumed run


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "model": {}}, tmp_path, 1)

    def full_disk(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(TrainingError, match="step-00000002.pt.*No space left on device.*intact"):
        save_checkpoint({"step": 2, "model": {}}, tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["step-00000001.pt"]
    assert load_checkpoint(str(tmp_path / "step-00000001.pt"))["step"] == 1


def test_a_task_must_implement_examples_batch_and_evaluate():
    class Incomplete(Task):
        def examples(self, docs, tokenizer, seq_len, generator):
            return {}

    with pytest.raises(TypeError, match=r"abstract methods.*batch.*evaluate"):
        Incomplete()
    for family in ("bert", "gpt", "t5"):
        assert isinstance(get_task(family), Task)
