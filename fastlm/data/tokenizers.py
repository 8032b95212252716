"""Tokenizers for the three families, trained with Hugging Face's ``tokenizers`` or loaded from a folder.

BERT: WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK]; GPT: byte-level BPE with <|endoftext|>; T5: Unigram with
<pad> </s> <unk> and 100 sentinels <extra_id_0> ... <extra_id_99>. ``Tokenizer`` wraps the HF object with the
ids the objectives need.

Reproducibility: a BERT or GPT tokenizer trained twice on the same texts is the same, token for token and
id for id. HF's BPE and WordPiece trainers break ties between equally frequent merges by token id, and
WordPiece gives its word-continuation pieces ("##c") ids in the order of a hash map, which changes from run
to run; ``train_tokenizer`` therefore registers every "##c" up front, in sorted order, so all ids are fixed
before the merges start. T5's Unigram tokenizer is not reproducible and cannot be made so from Python: HF's
Unigram trainer sums its EM statistics over the words in hash-map order, so the piece scores vary in the
fourth decimal between runs and with them the order (ids) of about one piece in ten; the vocabulary itself
stays the same. A T5 run is reproducible given its tokenizer (``--tokenizer``, or the run's own
OUT/tokenizer that --resume reuses).
"""

import json
import os
from dataclasses import dataclass, field

from .._optional import require

__all__ = ["FAMILIES", "NUM_SENTINELS", "Tokenizer", "load_tokenizer", "min_vocab_size", "train_tokenizer"]

FAMILIES = ("bert", "gpt", "t5")
NUM_SENTINELS = 100
_SPECIALS = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "gpt": ["<|endoftext|>"],
    "t5": ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)],
}


@dataclass
class Tokenizer:
    """An HF ``tokenizers.Tokenizer`` plus the special ids of its family.

    pad_id / eos_id / mask_id / cls_id / sep_id are None where the family has no such token;
    sentinel_ids (T5) lists <extra_id_0> ... <extra_id_99> in order.
    """

    hf: object  # a tokenizers.Tokenizer
    family: str
    pad_id: int | None = None
    eos_id: int | None = None
    mask_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    sentinel_ids: list = field(default_factory=list)

    @property
    def vocab_size(self):
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self):
        """Ids never masked or corrupted by an objective."""
        ids = [self.pad_id, self.eos_id, self.mask_id, self.cls_id, self.sep_id, *self.sentinel_ids]
        return tuple(sorted({i for i in ids if i is not None}))

    def encode(self, text):
        """Token ids of ``text`` without the family's special tokens (list[int])."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, directory):
        """Write tokenizer.json and fastlm_tokenizer.json (the family) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self.hf.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "fastlm_tokenizer.json"), "w") as f:
            json.dump({"family": self.family}, f)

    def check_fits(self, vocab_size, what="the model"):
        """ValueError when this tokenizer produces ids that ``vocab_size`` embeddings cannot hold."""
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but {what} has vocab_size={vocab_size}; "
                f"train a smaller tokenizer (--vocab-size) or use a model with a larger vocabulary"
            )


def _wrap(hf, family):
    def tid(token):
        return hf.token_to_id(token)

    if family == "bert":
        names = {"pad_id": "[PAD]", "mask_id": "[MASK]", "cls_id": "[CLS]", "sep_id": "[SEP]"}
        ids = {k: tid(v) for k, v in names.items()}
        return Tokenizer(hf, family, eos_id=None, **ids)
    if family == "gpt":
        eos = tid("<|endoftext|>")
        return Tokenizer(hf, family, pad_id=eos, eos_id=eos)
    sentinels = [tid(f"<extra_id_{i}>") for i in range(NUM_SENTINELS)]
    return Tokenizer(hf, family, pad_id=tid("<pad>"), eos_id=tid("</s>"), sentinel_ids=sentinels)


def _tokenizers():
    return require("tokenizers", "train", "training or loading a tokenizer")


def min_vocab_size(family):
    """The smallest vocab_size ``train_tokenizer`` accepts for ``family``: its special tokens plus two."""
    _check_family(family)
    return len(_SPECIALS[family]) + 2


def _check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")


def _continuation_pieces(normalizer, texts):
    """The pieces "##c" for every non-space character c of the normalised ``texts``, sorted."""
    chars = set()
    for text in texts:
        chars.update(normalizer.normalize_str(text))
    return ["##" + c for c in sorted(chars) if not c.isspace()]


def _unmark_added(hf, pieces):
    """``hf`` with ``pieces`` kept in the model's vocabulary but no longer added (special) tokens."""
    spec = json.loads(hf.to_str())
    drop = set(pieces)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in drop]
    return _tokenizers().Tokenizer.from_str(json.dumps(spec))


def train_tokenizer(family, texts, vocab_size=8000):
    """Train the family's tokenizer on an iterable of strings ``texts``; returns a ``Tokenizer``. BERT and
    GPT tokenizers are reproducible, T5's is not (see the module's docstring)."""
    _check_family(family)
    texts = list(texts)
    specials = _SPECIALS[family]
    if vocab_size < min_vocab_size(family):
        raise ValueError(f"vocab_size must exceed the {len(specials)} special tokens + 1, got {vocab_size}")
    tk = _tokenizers()
    if family == "bert":
        hf = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
        hf.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
        hf.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        hf.decoder = tk.decoders.WordPiece()
        pinned = _continuation_pieces(hf.normalizer, texts)  # fixed ids for the "##c" pieces (reproducibility)
        trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials + pinned)
    elif family == "gpt":
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        hf = tk.Tokenizer(tk.models.Unigram())
        hf.normalizer = tk.normalizers.NFKC()
        hf.pre_tokenizer = tk.pre_tokenizers.Metaspace()
        hf.decoder = tk.decoders.Metaspace()
        trainer = tk.trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    hf.train_from_iterator(texts, trainer=trainer)
    if family == "bert":
        hf = _unmark_added(hf, pinned)
    tok = _wrap(hf, family)
    if family == "bert":
        hf.post_processor = tk.processors.BertProcessing(("[SEP]", tok.sep_id), ("[CLS]", tok.cls_id))
    return tok


def load_tokenizer(directory, family):
    """A ``Tokenizer`` from a folder holding tokenizer.json (a fastlm output or an HF model folder)."""
    _check_family(family)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer: no tokenizer.json in {directory!r}")
    tok = _wrap(_tokenizers().Tokenizer.from_file(path), family)
    need = {"bert": ("pad_id", "mask_id", "cls_id", "sep_id"), "gpt": ("eos_id",), "t5": ("pad_id", "eos_id")}[family]
    missing = [n for n in need if getattr(tok, n) is None]
    if family == "t5" and None in tok.sentinel_ids:
        missing.append("sentinels <extra_id_0..99>")
    if missing:
        raise ValueError(f"tokenizer in {directory!r} lacks the {family} special tokens: {', '.join(missing)}")
    return tok
