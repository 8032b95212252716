"""One training step (forward, backward, AdamW) of fastlm's BERT, GPT-2 and T5 against Hugging Face's
eager and SDPA implementations of the same models with the same weights: tokens/s and peak memory.

    python -m bench.bench_models [--device cuda|cpu] [--quick] [--reps N] [--out DIR]

GPU cases are the lecture's: BERT-base pretraining (seq 128, MLM 15% + NSP), GPT-2 small (seq 1024),
T5-base (512 -> 114), under bf16 autocast, with each family's default dropout (0.1 everywhere). On the
CPU the tiny presets run in fp32, twice: with the default dropout and with dropout 0. Case names say which.
BERT's batches are padded like real ones (about 45 % of the tokens, seeded random lengths; the CPU's
"h256x4" case takes the lengths of the default corpus's sentence pairs). Results go
to bench/results/models-<device>.json and .png (speedup over HF eager and over HF SDPA, peak memory).
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm import backends
from fastlm.models import (
    BertConfig,
    BertForPreTraining,
    GPTConfig,
    GPTLMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from . import harness

# (case name prefix, dtype, baseline, the least speedup of fastlm over it aimed at): on the CPU (fp32);
# "fastlm-padded" is fastlm's BERT with unpadding off (BertModel.unpad_inputs), the same weights, aimed at on
# the sentence-pair batch of the unpadding case (bert-tiny's MLM head, not its encoder, holds most of its
# work); on a GPU (bf16 autocast), BERT-base pretraining at its realistic padding (an H200's aim)
TARGETS = [
    ("bert", "fp32", "hf-eager", 4.0),
    ("bert s128 b16 h256x4", "fp32", "fastlm-padded", 1.5),
    ("gpt2", "fp32", "hf-sdpa", 1.2),
    ("t5", "fp32", "hf-sdpa", 1.2),
    ("bert", "bf16-amp", "hf-sdpa", 2.0),
]
BASELINES = ("hf-eager", "hf-sdpa")


@dataclass
class ModelCase:
    name: str  # e.g. "bert-base s128 b32 dropout 0.1"
    fastlm_cls: type
    config: object
    batch: callable  # device -> dict of forward kwargs (HF names)
    tokens: int  # tokens per step
    note: str = ""  # e.g. how much of the batch is padding


def _bert_batch(config, B, L, padding=harness.padding_mask):
    """MLM + NSP batches whose attention_mask pads the (B, L) tokens on the right as ``padding(B, L)`` says
    (harness.padding_mask: about 45 % of them)."""

    def make(device):
        mask = padding(B, L, device=device)  # (B, L) bool, True = token
        ids = torch.randint(0, config.vocab_size, (B, L), device=device).masked_fill(~mask, config.pad_token_id)
        labels = torch.where((torch.rand(B, L, device=device) < 0.15) & mask, ids, -100)
        nsp = torch.randint(0, 2, (B,), device=device)
        return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels, "next_sentence_label": nsp}

    return make


def _gpt_batch(config, B, L):
    def make(device):
        ids = torch.randint(0, config.vocab_size, (B, L), device=device)
        return {"input_ids": ids, "labels": ids}

    return make


def _t5_batch(config, B, Ls, Lt):
    def make(device):
        src = torch.randint(0, config.vocab_size, (B, Ls), device=device)
        labels = torch.randint(0, config.vocab_size, (B, Lt), device=device)
        return {"input_ids": src, "attention_mask": torch.ones_like(src), "labels": labels}

    return make


def _dropout_fields(config):
    """The config's dropout probabilities: {field name: p} (fields left None, meaning "as another", skipped)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if "drop" in f.name and isinstance(getattr(config, f.name), float)
    }


def _dropout_label(config):
    """'dropout 0.1' (the distinct dropout probabilities of `config`, joined by /)."""
    return "dropout " + "/".join(f"{p:g}" for p in sorted(set(_dropout_fields(config).values())))


def _dropout_variants(case):
    """`case` with its family's default dropout and with every dropout 0, each named after its dropout."""
    without = dataclasses.replace(case.config, **dict.fromkeys(_dropout_fields(case.config), 0.0))
    return [
        dataclasses.replace(case, name=f"{case.name} {_dropout_label(config)}", config=config)
        for config in (case.config, without)
    ]


def _cpu_unpadding_case(device, quick):
    """On the CPU (full runs): a BERT whose encoder, not the MLM head, holds most of the work (hidden 256, 4
    layers, batch 16 x 128), on the lengths of the default corpus's sentence pairs (harness.sentence_pair_mask),
    where running the padded batch unpadded pays."""
    if device.type == "cuda" or quick:
        return []
    config = BertConfig.preset("bert-tiny", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=1024)
    B, L = 16, 128
    batch = _bert_batch(config, B, L, harness.sentence_pair_mask)
    padding = f"sentence pairs, {harness.padding_note(harness.sentence_pair_mask(B, L))}"
    return [ModelCase(f"bert s{L} b{B} h256x4", BertForPreTraining, config, batch, B * L, padding)]


def cases(device, quick):
    """The model cases for ``device``: the tiny presets on the CPU, each with its family's default dropout
    and with dropout 0; on a GPU the lecture's sizes with the default dropout only (two settings of three
    base-sized models would not fit the device check's time limit)."""
    if device.type == "cuda" and not quick:
        bert, gpt, t5 = BertConfig.preset("bert-base"), GPTConfig.preset("gpt2"), T5Config.preset("t5-base")
        sizes = {"bert": (32, 128), "gpt": (8, 1024), "t5": (16, 512, 114)}
    else:
        bert, gpt = BertConfig.preset("bert-tiny"), GPTConfig.preset("gpt2-tiny")
        t5 = T5Config.preset("t5-tiny")
        sizes = (
            {"bert": (2, 64), "gpt": (2, 64), "t5": (2, 64, 16)}
            if quick
            else {"bert": (8, 128), "gpt": (4, 256), "t5": (8, 128, 32)}
        )
    (bB, bL), (gB, gL), (tB, tLs, tLt) = sizes["bert"], sizes["gpt"], sizes["t5"]
    padding = harness.padding_note(harness.padding_mask(bB, bL))
    t5_batch = _t5_batch(t5, tB, tLs, tLt)
    families = [
        ModelCase(f"bert s{bL} b{bB}", BertForPreTraining, bert, _bert_batch(bert, bB, bL), bB * bL, padding),
        *_cpu_unpadding_case(device, quick),
        ModelCase(f"gpt2 s{gL} b{gB}", GPTLMHeadModel, gpt, _gpt_batch(gpt, gB, gL), gB * gL),
        ModelCase(f"t5 {tLs}->{tLt} b{tB}", T5ForConditionalGeneration, t5, t5_batch, tB * (tLs + tLt)),
    ]
    variants = 1 if device.type == "cuda" and not quick else 2  # a GPU's full run: the default dropout only
    return [variant for case in families for variant in _dropout_variants(case)[:variants]]


def _hf_model(case, attn_implementation):
    """The HF model of the same architecture and config (random weights)."""
    import transformers

    config = case.config.to_hf(case.fastlm_cls.hf_architecture)
    config_cls = transformers.AutoConfig.for_model(config.pop("model_type")).__class__
    hf_cls = getattr(transformers, case.fastlm_cls.hf_architecture)
    return hf_cls(config_cls(**config, attn_implementation=attn_implementation))


def _train_step(model, optimizer, batch, autocast):
    def step():
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _attention_backends(step):
    """The fastlm attention ops and backends that ran during step(), as "attention: cpu" or "varlen_attention:
    cpu" ("" if none)."""
    before = collections.Counter(backends.calls)
    step()
    ran = sorted(f"{op}: {name}" for (op, name), n in backends.calls.items()
                 if op.endswith("attention") and n > before[(op, name)])
    return ", ".join(ran)


def run(case, device, reps):
    """Rows for fastlm, HF eager and HF sdpa on ``case``."""
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else (contextlib.nullcontext)
    )
    dtype = "bf16-amp" if device.type == "cuda" else "fp32"
    torch.manual_seed(0)
    hf_eager = _hf_model(case, "eager").to(device).train()
    models = {"hf-eager": hf_eager, "fastlm": case.fastlm_cls.from_pretrained(hf_eager).to(device).train()}
    if hasattr(models["fastlm"], "bert"):  # BERT runs a padded batch unpadded: time the padded path too
        models["fastlm-padded"] = copy.deepcopy(models["fastlm"])
        models["fastlm-padded"].bert.unpad_inputs = False
    hf_sdpa = _hf_model(case, "sdpa").to(device).train()
    hf_sdpa.load_state_dict(hf_eager.state_dict())
    models["hf-sdpa"] = hf_sdpa
    batch = case.batch(device)
    steps = {
        impl: _train_step(
            model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda"), batch, autocast
        )
        for impl, model in models.items()
    }
    timings = harness.time_many(steps, device, reps)  # round-robin on the CPU: a passing load hits all alike
    rows = []
    for impl, step in steps.items():
        median, p20, p80 = timings[impl]
        peak = harness.peak_memory_mb(step, device)
        ran = _attention_backends(step) if impl.startswith("fastlm") else ""
        rows.append(
            harness.Row(
                op="train-step",
                shape=case.name,
                dtype=dtype,
                impl=impl,
                mode="fwd+bwd",
                median_ms=median,
                p20_ms=p20,
                p80_ms=p80,
                throughput=case.tokens / median * 1e3,
                unit="tok/s",
                peak_mem_mb=peak,
                note="; ".join(filter(None, ("forward + backward + AdamW", case.note, ran))),
            )
        )
    base = next(r for r in rows if r.impl == "hf-eager").median_ms
    for r in rows:
        r.speedup = base / r.median_ms
    return rows


def print_table(rows):
    """One line per row: time, tokens/s, speedup over HF eager and over HF SDPA, peak memory, note."""
    print(
        f"{'case':<34} {'dtype':<9} {'impl':<13} {'median ms':>10} {'[p20, p80]':>20} {'tok/s':>10} "
        f"{'vs eager':>9} {'vs sdpa':>8} {'peak MB':>8}  note"
    )
    for r in rows:
        peak = "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
        vs_sdpa = harness.ratio(rows, r.shape, r.impl, "hf-sdpa")
        print(
            f"{r.shape:<34} {r.dtype:<9} {r.impl:<13} {r.median_ms:>10.1f} {f'[{r.p20_ms:.1f}, {r.p80_ms:.1f}]':>20} "
            f"{r.throughput:>10.0f} {r.speedup:>8.2f}x {vs_sdpa or 0:>7.2f}x {peak:>8}  {r.note}"
        )


def summary(rows):
    """Lines giving fastlm's speedup over the baseline of TARGETS on each case, with its target."""
    lines = []
    for shape, dtype in dict.fromkeys((r.shape, r.dtype) for r in rows):
        for prefix, target_dtype, baseline, target in TARGETS:
            if shape.startswith(prefix + " ") and dtype == target_dtype:
                speedup = harness.ratio(rows, shape, "fastlm", baseline)
                measured = "not timed" if speedup is None else f"{speedup:.2f}×"
                lines.append(f"{shape}: fastlm over {baseline} {measured} (target ≥ {target}×)")
    return lines


def run_all(device, quick, reps, out, meta):
    """Every case on ``device``: prints the table, writes models-<device>.json and .png under ``out``;
    returns the JSON path."""
    rows = []
    for case in cases(device, quick):
        rows.extend(run(case, device, reps))
    print_table(rows)
    lines = summary(rows)
    for line in lines:
        print(line)
    slug = ("quick-" if quick else "") + device.type
    json_path, png_path = out / f"models-{slug}.json", out / f"models-{slug}.png"
    harness.write_json(json_path, meta, {}, rows, lines)
    title = f"fastlm models, one training step, on {meta['device']}"
    harness.plot(png_path, title, rows, baselines=BASELINES, notes=lines)
    print(f"wrote {json_path} and {png_path}")
    return json_path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_models", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller batches, few repetitions (a smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per model on the CPU")
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="folder for JSON and PNG results")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    meta = harness.metadata(device)
    print(f"fastlm model benchmarks on {meta['device']} ({device.type}), torch {meta['torch']}")
    run_all(device, args.quick, args.reps or (3 if args.quick else 10), args.out, meta)


if __name__ == "__main__":
    main()
