"""`fastlm finetune`: BERT sequence classification from a fastlm or Hugging Face checkpoint — full
fine-tuning, linear probing (frozen body) or freezing the embeddings and the first k layers."""

import csv
import dataclasses
import json
import os
import shutil
import tempfile

import torch
from torch import nn

from ..data import load_tokenizer
from ..data.sources import jsonl_records
from ..models import BertForSequenceClassification, freeze_all_but, linear_probe, trainable_parameters
from .validate import TrainingError, check_float, check_int

__all__ = ["FinetuneConfig", "finetune", "read_labelled"]

MODES = ("full", "probe", "freeze")


@dataclasses.dataclass
class FinetuneConfig:
    """A fine-tuning run. ``model``: a folder with config.json + model.safetensors + tokenizer.json (the model/
    folder of `fastlm pretrain`, or an HF BERT folder). ``train`` / ``eval``: CSV (with a header) or JSONL files
    of (text, label), or hf:NAME (its train / test splits); without ``eval``, the last 20% of ``train``."""

    model: str
    train: str
    out: str
    eval: str | None = None
    mode: str = "full"  # full, probe (train only the classifier), freeze (freeze embeddings + first k layers)
    freeze_layers: int = 0
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-4
    seq_len: int = 128
    text_field: str = "text"
    label_field: str = "label"
    seed: int = 0
    device: str | None = None
    progress: bool = True


def _csv_records(path, f):
    """(line number, row dict) of each row of the CSV file ``f`` (its header names the fields)."""
    reader = csv.DictReader(f)
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _read_rows(path, text_field, label_field):
    if path.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"data {path!r}: the `datasets` library is not installed") from None
        name, _, split = path.removeprefix("hf:").partition("@")
        ds = datasets.load_dataset(name, split=split or "train")
        return [(r[text_field], r[label_field]) for r in ds]
    if not os.path.isfile(path):
        raise ValueError(f"data {path!r}: no such file")
    records = jsonl_records if path.endswith((".jsonl", ".json")) else _csv_records
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, r in records(path, f):
                missing = [k for k in (text_field, label_field) if r.get(k) is None or r.get(k) == ""]
                if missing:
                    raise ValueError(
                        f"{path}:{lineno}: expected a {text_field!r} and a {label_field!r} value, "
                        f"the record has no {' and no '.join(map(repr, missing))}"
                    )
                rows.append((str(r[text_field]), r[label_field]))
    except UnicodeDecodeError as e:
        raise ValueError(f"data {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    return rows


def read_labelled(path, text_field="text", label_field="label"):
    """(texts, labels) of a CSV / JSONL file; labels as read (str or int). Empty data is a ValueError."""
    rows = _read_rows(path, text_field, label_field)
    if not rows:
        raise ValueError(f"data {path!r}: holds no examples")
    return [t for t, _ in rows], [lab for _, lab in rows]


def _encode(tokenizer, texts, seq_len):
    """[CLS] text [SEP], truncated and padded to seq_len: input_ids, attention_mask (N, seq_len) int64."""
    ids = torch.full((len(texts), seq_len), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, toks in enumerate(tokenizer.encode_batch(texts)):
        row = [tokenizer.cls_id, *toks[: seq_len - 2], tokenizer.sep_id]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _freeze(model, config):
    n_layers = model.config.num_hidden_layers
    if config.mode == "probe":
        params = linear_probe(model, "classifier")
        # As MAE's linear probing: a parameter-free BatchNorm standardises the frozen features, whose spread
        # across inputs can be tiny (std ~1e-3 for a briefly pretrained body); folded into the head afterwards.
        norm = nn.BatchNorm1d(model.config.hidden_size, affine=False, momentum=None)
        model.classifier = nn.Sequential(norm.to(model.classifier.weight.device), model.classifier)
        return params
    if config.mode == "freeze":
        if not 0 <= config.freeze_layers <= n_layers:
            raise ValueError(f"--freeze-layers must be in [0, {n_layers}], got {config.freeze_layers}")
        keep = [f"bert.encoder.layer.{i}" for i in range(config.freeze_layers, n_layers)]
        freeze_all_but(model, [*keep, "bert.pooler", "classifier"])
    return trainable_parameters(model)


@torch.no_grad()
def _fold_probe_norm(model):
    """Replace classifier = Sequential(BatchNorm (running stats), Linear) by the one Linear computing the same
    in eval mode, so the saved model has HF's classifier.weight / classifier.bias."""
    norm, linear = model.classifier
    scale = (norm.running_var + norm.eps).rsqrt()  # (E,)
    linear.weight.mul_(scale)
    linear.bias.sub_(linear.weight @ norm.running_mean)
    model.classifier = linear


@torch.no_grad()
def accuracy(model, ids, mask, labels, batch_size):
    """Fraction of (ids, mask) rows whose argmax class equals labels."""
    model.eval()
    hits = 0
    for lo in range(0, len(ids), batch_size):
        logits = model(ids[lo : lo + batch_size], attention_mask=mask[lo : lo + batch_size]).logits
        hits += int((logits.argmax(-1) == labels[lo : lo + batch_size]).sum())
    model.train()
    return hits / max(1, len(ids))


def _check_config(config):
    """ValueError naming the first flag of ``config`` out of its range."""
    if config.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    check_int("epochs", config.epochs, 1)
    check_int("batch_size", config.batch_size, 1)
    check_int("seq_len", config.seq_len, 3)  # [CLS], at least one token, [SEP]
    check_int("freeze_layers", config.freeze_layers, 0)
    check_int("seed", config.seed, 0, 2**32 - 1)
    check_float("lr", config.lr, 0, lo_open=True)


def _save(model, tokenizer, result, out):
    """Write the model, tokenizer and metrics.json (``result``) into ``out``: first into a staging folder
    inside it, then moved in, so that a failed write (a full disk) leaves the files of an earlier run intact.
    TrainingError naming ``out`` when a write fails."""
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=out)
    try:
        model.save_pretrained(staging)
        tokenizer.save(staging)
        with open(os.path.join(staging, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    except OSError as e:
        raise TrainingError(
            f"could not write the fine-tuned model to {out!r} ({e.strerror or e}); the files already there are intact"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def finetune(config):
    """Fine-tune as ``config`` says; returns {"accuracy": final eval accuracy, "history": per-epoch metrics}
    and writes the model, tokenizer and metrics.json to ``config.out``. ValueError for a bad flag or bad
    data (naming the flag, file and line); TrainingError when the outputs cannot be written."""
    _check_config(config)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(config.model, "bert")
    texts, raw = read_labelled(config.train, config.text_field, config.label_field)
    if config.eval:
        eval_texts, eval_raw = read_labelled(config.eval, config.text_field, config.label_field)
    else:
        cut = max(1, len(texts) * 4 // 5)
        texts, eval_texts, raw, eval_raw = texts[:cut], texts[cut:], raw[:cut], raw[cut:]
    names = sorted({str(x) for x in raw + eval_raw})
    if len(names) < 2:
        raise ValueError(f"data {config.train!r}: needs at least 2 distinct labels, got {names}")
    label_id = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([label_id[str(x)] for x in raw])
    eval_labels = torch.tensor([label_id[str(x)] for x in eval_raw])

    torch.manual_seed(config.seed)
    model = BertForSequenceClassification.from_pretrained(config.model, num_labels=len(names))
    tokenizer.check_fits(model.config.vocab_size, f"the model in {config.model!r}")
    if config.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {config.seq_len} exceeds the model's {model.config.max_position_embeddings}")
    model.to(device)
    params = _freeze(model, config)
    ids, mask = (t.to(device) for t in _encode(tokenizer, texts, config.seq_len))
    eval_ids, eval_mask = (t.to(device) for t in _encode(tokenizer, eval_texts, config.seq_len))
    labels, eval_labels = labels.to(device), eval_labels.to(device)

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01, fused=True)
    steps = config.epochs * -(-len(ids) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / max(1, steps))
    g = torch.Generator().manual_seed(config.seed)
    history = []
    model.train()  # from_pretrained returns eval mode
    for epoch in range(config.epochs):
        order = torch.randperm(len(ids), generator=g).to(device)
        total = 0.0
        for lo in range(0, len(ids), config.batch_size):
            b = order[lo : lo + config.batch_size]
            loss = model(ids[b], attention_mask=mask[b], labels=labels[b]).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(b)
        acc = accuracy(model, eval_ids, eval_mask, eval_labels, config.batch_size)
        history.append({"epoch": epoch + 1, "train_loss": total / len(ids), "eval_accuracy": acc})
        if config.progress:
            print(f"epoch {epoch + 1}: train loss {total / len(ids):.4f}, eval accuracy {acc:.4f}", flush=True)
    if config.mode == "probe":
        _fold_probe_norm(model)
    result = {"accuracy": history[-1]["eval_accuracy"], "labels": names, "mode": config.mode, "history": history}
    _save(model, tokenizer, result, config.out)
    return result
