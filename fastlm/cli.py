"""The `fastlm` command: `fastlm info`, `fastlm bench [...]` (see `fastlm bench --help`),
`fastlm pretrain bert|gpt|t5 [...]` and `fastlm finetune [...]` (see their --help)."""

import argparse
import dataclasses
import sys

from ._optional import MissingDependency, require

_PRETRAIN_HELP = {
    "preset": "model size: tiny, or a preset name (bert-base, gpt2, t5-small, ...)",
    "data": "'builtin' (stdlib docstrings), a text/.jsonl file, a folder, or hf:NAME[:CONFIG]",
    "out": "output folder: tokenizer/, checkpoints/, model/, loss.png, history.json",
    "tokenizer": "folder with a tokenizer.json to use instead of training one",
    "vocab_size": "vocabulary of the trained tokenizer",
    "tokenizer_chars": "characters of the data the tokenizer is trained on",
    "max_chars": "cap on the characters of data read",
    "seq_len": "tokens per example (T5: before span corruption)",
    "pack_documents": "gpt: the documents packed into a block attend only within themselves, positions restart",
    "steps": "optimizer steps in all",
    "batch_size": "examples per micro-batch on each process",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate of AdamW",
    "warmup": "linear warmup steps before the cosine decay (default: 10%% of the steps, at most 100)",
    "min_lr_ratio": "final learning rate as a fraction of --lr",
    "clip": "gradient-norm clip (0: none)",
    "dropout": "dropout rate of every dropout layer (default 0; a negative value keeps the preset's rates)",
    "eval_every": "evaluate on held-out examples every this many steps",
    "eval_batches": "held-out examples per evaluation, in global batches (at most 5%% of the data)",
    "save_every": "checkpoint every this many steps (default: --eval-every)",
    "keep": "checkpoints kept",
    "resume": "continue from the newest readable checkpoint in OUT/checkpoints",
    "overwrite": "clear a used --out first (without it, a fresh run refuses a non-empty --out)",
    "device": "cpu, cuda, cuda:1 ... (default: cuda when there is one; under torchrun, cuda is LOCAL_RANK's GPU)",
    "progress": "show the progress bar",
}

_FINETUNE_HELP = {
    "model": "folder with config.json, model.safetensors and tokenizer.json (OUT/model of fastlm pretrain, or HF)",
    "train": "CSV (header with text,label) or JSONL training data, or hf:NAME[@SPLIT]",
    "eval": "evaluation data as --train (default: the last 20%% of --train)",
    "out": "output folder: the fine-tuned model, tokenizer and metrics.json",
    "mode": "full (all weights), probe (the classifier only), freeze (embeddings + first --freeze-layers frozen)",
    "freeze_layers": "encoder layers frozen with --mode freeze",
    "epochs": "passes over the training data",
    "batch_size": "examples per step",
    "lr": "peak learning rate of AdamW (linear decay to 0)",
    "seq_len": "tokens per example, [CLS] and [SEP] included",
    "progress": "print each epoch's loss and accuracy",
}


def _add_fields(parser, config_class, helps, skip=()):
    """One --option per dataclass field (booleans: --flag / --no-flag)."""
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(f.name))
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if f.name in ("dropout", "min_lr_ratio"):
            kind = float
        elif f.name in ("warmup", "save_every", "max_chars"):
            kind = int
        parser.add_argument(
            flag, type=kind, default=default, required=f.default is dataclasses.MISSING, help=helps.get(f.name)
        )


def _resume_help():
    """--resume's help: which flags must stay as saved and which changes it applies."""
    from .train.pretrain import APPLIED_ON_RESUME, FIXED_ON_RESUME
    from .train.validate import flag

    fixed = ", ".join(flag(k) for k in FIXED_ON_RESUME if k != "family")
    applied = ", ".join(flag(k) for k in APPLIED_ON_RESUME)
    return (
        f"{_PRETRAIN_HELP['resume']}; {fixed} and the number of ranks must stay as saved; changes of {applied} "
        f"are applied (and listed)"
    )


def _pretrain(argv):
    from .train import PretrainConfig, pretrain

    parser = argparse.ArgumentParser(prog="fastlm pretrain", description="pretrain a compact BERT, GPT or T5")
    parser.add_argument("family", choices=("bert", "gpt", "t5"))
    helps = {**_PRETRAIN_HELP, "resume": _resume_help()}
    _add_fields(parser, PretrainConfig, helps, skip=("family",))
    args = parser.parse_args(argv)
    pretrain(PretrainConfig(**vars(args)))


def _finetune(argv):
    from .train.finetune import FinetuneConfig, finetune

    parser = argparse.ArgumentParser(prog="fastlm finetune", description="fine-tune BERT for sequence classification")
    _add_fields(parser, FinetuneConfig, _FINETUNE_HELP)
    args = parser.parse_args(argv)
    finetune(FinetuneConfig(**vars(args)))


def main(argv=None):
    """Entry point of the `fastlm` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastlm", description="fused kernels for BERT/GPT/T5 training")
    parser.add_argument(
        "command",
        choices=("info", "bench", "pretrain", "finetune"),
        help="info: backends and versions; bench: benchmarks; pretrain / finetune: training runs",
    )
    if argv and argv[0] in ("pretrain", "finetune"):  # their own parsers, so that --help reaches them
        from .train.validate import TrainingError

        try:
            (_pretrain if argv[0] == "pretrain" else _finetune)(argv[1:])
        except (ValueError, MissingDependency) as e:
            print(f"fastlm {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        except TrainingError as e:
            print(f"fastlm {argv[0]}: error: {e}", file=sys.stderr)
            return 1
        return 0
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"info takes no arguments, got {' '.join(rest)}")
        import fastlm

        print(fastlm.info())
        return 0
    try:
        for module in ("tqdm", "matplotlib"):
            require(module, "bench", "fastlm bench")
    except MissingDependency as e:
        print(f"fastlm bench: error: {e}", file=sys.stderr)
        return 2
    from .bench.__main__ import main as bench_main

    bench_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
