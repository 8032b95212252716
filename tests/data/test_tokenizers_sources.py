import json

import pytest

from fastlm.data import load_texts, load_tokenizer, stdlib_docstrings, train_tokenizer

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pack my box with five dozen liquor jugs, said the sphinx of black quartz. " * 3,
    "How vexingly quick daft zebras jump when the wizard asks them to. " * 3,
] * 20


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_train_save_load(tmp_path, family):
    tok = train_tokenizer(family, TEXT, vocab_size=300)
    assert tok.vocab_size <= 300
    ids = tok.encode("the quick brown fox")
    assert ids and max(ids) < tok.vocab_size
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path, family)
    assert again.encode("the quick brown fox") == ids
    assert again.special_ids == tok.special_ids
    if family == "bert":
        assert (tok.pad_id, tok.mask_id) == (0, 4) and tok.cls_id is not None
    if family == "t5":
        assert len(tok.sentinel_ids) == 100 and len(set(tok.sentinel_ids)) == 100
    with pytest.raises(ValueError, match="vocab_size"):
        tok.check_fits(tok.vocab_size - 1)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path, "bert")
    train_tokenizer("gpt", TEXT, vocab_size=300).save(tmp_path)
    with pytest.raises(ValueError, match="lacks the bert special tokens"):
        load_tokenizer(tmp_path, "bert")
    with pytest.raises(ValueError, match="family"):
        load_tokenizer(tmp_path, "xlnet")


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first paragraph", "second paragraph"]
    assert load_texts(str(tmp_path)) == ["first paragraph", "second paragraph", "from jsonl"]
    with pytest.raises(ValueError, match="no such file"):
        load_texts(str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match="'text' field"):
        load_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"data '.*latin.jsonl' is not UTF-8 text"):
        load_texts(str(tmp_path / "latin.jsonl"))


def test_builtin_default_is_real_text():
    docs = stdlib_docstrings(max_chars=20_000)
    assert sum(map(len, docs)) >= 20_000 and all(isinstance(d, str) and len(d) >= 40 for d in docs)
    assert load_texts("builtin", max_chars=20_000) == docs


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_training_is_reproducible(family):
    """Two trainings on the same texts give the same tokenizer, id for id (HF's WordPiece trainer numbers
    its "##c" pieces in hash-map order unless they are pinned; T5's Unigram trainer cannot be pinned)."""
    docs = stdlib_docstrings(max_chars=30_000)
    first, second = (train_tokenizer(family, docs, vocab_size=400) for _ in range(2))
    assert first.hf.to_str() == second.hf.to_str()
    assert first.encode("Return the ##result of a call.") == second.encode("Return the ##result of a call.")
