import errno
import json
import os
import random
import shutil

import pytest

from fastlm.cli import main
from fastlm.data import load_texts, load_tokenizer, train_tokenizer
from fastlm.models import BertForSequenceClassification
from fastlm.train import pretrain
from fastlm.train.finetune import FinetuneConfig, _encode, _freeze, finetune, read_labelled
from fastlm.train.validate import TrainingError

TOPICS = (
    "file path directory open read write name mode bytes encoding",
    "thread lock queue process signal wait timeout event worker pool",
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A two-topic classification set (CSV train, JSONL eval): bags of topic words among common ones."""
    rng = random.Random(0)
    common = ["the", "a", "of", "to", "is", "and", "in", "for", "with", "this", "that"]

    def text(label):
        words = rng.sample(TOPICS[label].split(), 4) + rng.sample(common, 4)
        rng.shuffle(words)
        return " ".join(words)

    d = tmp_path_factory.mktemp("cls")
    rows = [(text(i % 2), i % 2) for i in range(200)]
    (d / "train.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows[:160]))
    (d / "eval.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows[160:]))
    return d


@pytest.fixture(scope="module")
def pretrained(small_module, task, tmp_path_factory):
    """A tiny BERT pretrained (MLM + NSP) briefly on the task's unlabelled text, as the recipe goes."""
    out = tmp_path_factory.mktemp("bert")
    texts = [line.split(",")[0] for line in (task / "train.csv").read_text().splitlines()[1:]]
    (task / "unlabelled.txt").write_text("\n\n".join(texts))
    pretrain(small_module("bert", out, data=str(task / "unlabelled.txt"), steps=40, eval_every=40, batch_size=8))
    return out / "model"


@pytest.fixture(scope="module")
def small_module(corpus, tokenizer_dir):
    from fastlm.train import PretrainConfig

    def make(family, out, **kw):
        values = dict(data=corpus, tokenizer=tokenizer_dir(family), seq_len=32, batch_size=4, progress=False)
        return PretrainConfig(family, str(out), **{**values, **kw})

    return make


def _config(pretrained, task, tmp_path, **kw):
    values = dict(train=str(task / "train.csv"), eval=str(task / "eval.jsonl"), seq_len=16, progress=False)
    return FinetuneConfig(model=str(pretrained), out=str(tmp_path), **{**values, **kw})


def test_full_finetuning_beats_chance(pretrained, task, tmp_path):
    result = finetune(_config(pretrained, task, tmp_path, epochs=4, lr=1e-3))
    assert result["accuracy"] >= 0.85
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == result["accuracy"]


def test_linear_probe_beats_chance(pretrained, task, tmp_path):
    result = finetune(_config(pretrained, task, tmp_path, mode="probe", epochs=10, lr=1e-2))
    assert result["accuracy"] >= 0.75
    again = BertForSequenceClassification.from_pretrained(str(tmp_path))  # the probe's norm folded into the head
    tok = load_tokenizer(str(tmp_path), "bert")
    ids, mask = _encode(tok, ["thread lock queue wait the of", "file path open read the of"], 16)
    assert again(ids, attention_mask=mask).logits.argmax(-1).tolist() == [1, 0]


def test_freeze_first_layers(pretrained, task, tmp_path):
    model = BertForSequenceClassification.from_pretrained(str(pretrained), num_labels=2)
    _freeze(model, _config(pretrained, task, tmp_path, mode="freeze", freeze_layers=1))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("bert.embeddings") for n in frozen)
    assert any(n.startswith("bert.encoder.layer.0.") for n in frozen)
    assert not any(n.startswith(("bert.encoder.layer.1.", "classifier")) for n in frozen)
    with pytest.raises(ValueError, match="freeze-layers"):
        _freeze(model, _config(pretrained, task, tmp_path, mode="freeze", freeze_layers=9))


def test_errors(pretrained, task, tmp_path, corpus):
    with pytest.raises(ValueError, match="no such file"):
        finetune(_config(pretrained, task, tmp_path, train=str(tmp_path / "missing.csv")))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="no examples"):
        finetune(_config(pretrained, task, tmp_path, train=str(tmp_path / "empty.csv")))
    big = tmp_path / "big"
    shutil.copytree(pretrained, big)
    train_tokenizer("bert", load_texts(corpus), vocab_size=600).save(big)
    with pytest.raises(ValueError, match="tokenizer has"):
        finetune(_config(big, task, tmp_path))
    with pytest.raises(ValueError, match="--mode"):
        finetune(_config(pretrained, task, tmp_path, mode="lora"))


@pytest.mark.parametrize(
    "flag, value", [("epochs", 0), ("batch_size", 0), ("seq_len", 1), ("lr", float("nan")), ("freeze_layers", -1)]
)
def test_flags_out_of_range(tmp_path, flag, value, capsys):
    """Refused before the model or data are read (they do not exist here)."""
    option = "--" + flag.replace("_", "-")
    argv = ["finetune", "--model", str(tmp_path), "--train", "t.csv", "--out", str(tmp_path), option, str(value)]
    assert main(argv) == 2
    assert f"fastlm finetune: error: {option} must be " in capsys.readouterr().err


def test_bad_records_name_the_file_and_line(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "a", "label": 0}\n\n["b", 1]\n')
    with pytest.raises(ValueError, match=r"data.jsonl:3: expected a JSON object, got a list"):
        read_labelled(str(jsonl))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data '.*latin.csv' is not UTF-8 text"):
        read_labelled(str(latin))
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("text,label\nfine,1\nmissing\nempty,\n")
    with pytest.raises(ValueError, match=r"no_label.csv:3: expected a 'text' and a 'label' value, .* no 'label'"):
        read_labelled(str(no_label))


def test_a_full_disk_keeps_the_previous_outputs(pretrained, task, tmp_path, monkeypatch):
    few = tmp_path / "few.csv"
    few.write_text("\n".join((task / "train.csv").read_text().splitlines()[:9]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous run's model")

    def full_disk(self, directory):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(BertForSequenceClassification, "save_pretrained", full_disk)
    with pytest.raises(TrainingError, match="No space left on device.*intact"):
        finetune(_config(pretrained, task, out, train=str(few), epochs=1))
    assert os.listdir(out) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"the previous run's model"
