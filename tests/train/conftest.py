import pytest

from fastlm.data import load_texts, stdlib_docstrings, train_tokenizer
from fastlm.train import PretrainConfig


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small real-text corpus (stdlib docstrings) as a text file."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(stdlib_docstrings(max_chars=40_000)))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory):
    """family -> a folder with a 400-token tokenizer trained once on the corpus (training one costs seconds,
    and T5's Unigram trainer is not reproducible run to run, so runs that are compared share one)."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = str(tmp_path_factory.mktemp(f"tok-{family}"))
            train_tokenizer(family, load_texts(corpus), vocab_size=400).save(made[family])
        return made[family]

    return get


@pytest.fixture
def small(corpus, tokenizer_dir):
    """PretrainConfig at test size for ``family`` writing to ``out``."""

    def make(family, out, **overrides):
        values = dict(
            data=corpus,
            tokenizer=tokenizer_dir(family),
            seq_len=32,
            steps=6,
            batch_size=4,
            lr=3e-3,
            eval_every=3,
            eval_batches=1,
            progress=False,
        )
        return PretrainConfig(family, str(out), **{**values, **overrides})

    return make
