"""The benchmark cases themselves: padded batches, CPU peak memory, SDPA backends that must run their own
kernel, the attention and model summaries, and the models' dropout variants (no timing)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bench import bench_attention, bench_models, harness

CPU = torch.device("cpu")


def test_padding_mask_pads_about_45_percent_seeded():
    mask = harness.padding_mask(16, 128)
    assert mask.shape == (16, 128) and mask.dtype == torch.bool
    assert torch.equal(mask, harness.padding_mask(16, 128))
    assert 0.40 <= 1 - mask.float().mean().item() <= 0.50
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(128)[None, :] < lengths[:, None])  # right padding, no holes
    assert lengths.min() >= 1 and harness.padding_note(mask).startswith("padding 4")


def test_sentence_pair_mask_follows_the_default_corpus_seeded():
    mask = harness.sentence_pair_mask(16, 128)
    assert mask.shape == (16, 128) and mask.dtype == torch.bool
    assert torch.equal(mask, harness.sentence_pair_mask(16, 128))
    assert not torch.equal(mask, harness.sentence_pair_mask(16, 128, seed=1))
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(128)[None, :] < lengths[:, None])  # right padding, no holes
    pairs = harness._sentence_pair_lengths()
    assert pairs.min() >= 5  # [CLS] A [SEP] B [SEP] with A, B a token or more
    assert 30 <= pairs.float().median() <= 60  # two sentences of docstring prose
    assert 0.45 <= 1 - harness.sentence_pair_mask(256, 128).float().mean().item() <= 0.75


def test_cpu_peak_memory_is_the_calls_own_allocations():
    """8 MiB held at once inside the call, 4 of them freed before the next 4 are made: 8 MiB, whatever
    was allocated before the call or is cached by malloc."""
    before = torch.ones(2**22)  # 16 MiB allocated before: not counted

    def fn():
        a, b = torch.ones(2**19), torch.ones(2**19)  # 2 + 2 MiB
        c = torch.ones(2**20)  # + 4 MiB: 8 MiB live
        del a, b
        d = torch.ones(2**20)  # 4 + 4 MiB live
        return c, d

    assert harness.peak_memory_mb(fn, CPU) == pytest.approx(8, abs=0.01)
    assert before.sum() > 0


def test_cpu_timing_is_round_robin():
    """One call of each fn per round, after a warm-up round: a load that comes and goes weighs on all alike."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    timings = harness.time_many(fns, CPU, reps=4)
    assert calls == ["a", "b"] * 5
    assert set(timings) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in timings.values())


def test_sdpa_flash_runs_the_cpu_flash_kernel_with_a_padding_mask():
    (case,) = bench_attention.cases(CPU, keep=lambda shape, dtype: shape.startswith("bert-pad"))
    assert "sdpa flash" in case.impls and "sdpa flash" not in case.absent
    assert case.note.startswith("padding 4")
    q, k, v, mask, table = case.inputs()
    ops = bench_attention._ops_run(lambda: case.impls["sdpa flash"](q, k, v, mask, table).sum().backward())
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops


def test_an_sdpa_backend_that_falls_back_is_listed_absent():
    """A "sdpa flash" that in fact runs the math kernel is not timed under that name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_in_disguise(q, k, v, mask, table):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    impls, absent = {"sdpa flash": math_in_disguise}, {}
    bench_attention._probe(impls, absent, CPU, torch.float32, 16, False, False, False)
    assert impls == {}
    assert absent["sdpa flash"].startswith("fell back: ran aten::_scaled_dot_product_attention_math")


def test_cpu_cases_and_the_fastlm_cpu_row():
    shapes = [c.shape for c in bench_attention.cases(CPU, keep=lambda shape, dtype: False)]
    assert shapes == []
    labels = {entry[0]: entry[1:] for entry in bench_attention.CPU_SHAPES}
    assert labels["long-causal"] == (1, 8, 2048, 2048, 64, True, None, False)
    impls, absent = bench_attention._impls(CPU, causal=False, rel_pos=True, padded=True)
    assert {"torch eager", "torch.compile eager", "hf T5 eager", "sdpa flash"} <= set(impls)
    assert ("fastlm cpu" in impls) != ("fastlm cpu" in absent)
    assert ("fastlm cpu varlen" in impls) == ("fastlm cpu" in impls)  # padded cases time varlen too


def _row(shape, impl, ms, peak=None):
    return harness.Row("attention", shape, "float32", impl, "fwd+bwd", ms, ms, ms, peak_mem_mb=peak)


def test_attention_summary_gives_the_issues_ratios():
    rows = [
        _row("bert-pad 4x4x128x128x64", "sdpa flash", 3.0),
        _row("bert-pad 4x4x128x128x64", "fastlm cpu", 2.0),
        _row("bert-pairs 16x4x128x128x64", "fastlm cpu", 4.5),
        _row("bert-pairs 16x4x128x128x64", "fastlm cpu varlen", 2.0),
        _row("t5-relpos 4x4x128x128x64", "torch eager", 8.0),
        _row("t5-relpos 4x4x128x128x64", "torch.compile eager", 6.0),
        _row("long-causal 1x8x2048x2048x64", "sdpa flash", 10.0, peak=40.0),
        _row("long-causal 1x8x2048x2048x64", "torch eager", 30.0, peak=900.0),
        _row("long-causal 2x16x4096x4096x128", "fastlm triton", 1.0),  # a GPU case: no target
    ]
    assert bench_attention.summary(rows) == [
        "bert-pad 4x4x128x128x64: fastlm cpu over sdpa flash 1.50× (target ≥ 1.0×)",
        "bert-pairs 16x4x128x128x64: fastlm cpu varlen over fastlm cpu 2.25× (target ≥ 1.5×)",
        "t5-relpos 4x4x128x128x64: fastlm cpu over torch eager not timed (target ≥ 2.0×)",
        "t5-relpos 4x4x128x128x64: fastlm cpu over torch.compile eager not timed (target ≥ 1.3×)",
        "long-causal 1x8x2048x2048x64: fastlm cpu over sdpa flash not timed (target ≥ 1.0×)",
        "long-causal 1x8x2048x2048x64: peak memory growth, MB: sdpa flash 40, torch eager 900",
    ]


def test_models_run_with_default_dropout_and_without():
    cases = bench_models.cases(CPU, quick=True)
    names = [c.name for c in cases]
    assert names == [
        "bert s64 b2 dropout 0.1",
        "bert s64 b2 dropout 0",
        "gpt2 s64 b2 dropout 0.1",
        "gpt2 s64 b2 dropout 0",
        "t5 64->16 b2 dropout 0.1",
        "t5 64->16 b2 dropout 0",
    ]
    for case in cases:
        p = 0.1 if case.name.endswith("0.1") else 0.0
        hf = bench_models._hf_model(case, "eager")
        ours = case.fastlm_cls.from_pretrained(hf)
        for model in (hf, ours):
            assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {p}, case.name
        attention_p = {getattr(m, a) for m in ours.modules() for a in ("dropout_p", "attn_pdrop") if hasattr(m, a)}
        assert attention_p == {p}, case.name


def test_gpu_models_run_with_default_dropout_only():
    names = [c.name for c in bench_models.cases(torch.device("cuda"), quick=False)]
    assert names == ["bert s128 b32 dropout 0.1", "gpt2 s1024 b8 dropout 0.1", "t5 512->114 b16 dropout 0.1"]


def test_bert_batches_are_padded():
    cases = bench_models.cases(CPU, quick=False)
    case = cases[0]  # bert s128 b8
    batch = case.batch(CPU)
    mask = batch["attention_mask"].bool()
    assert 0.40 <= 1 - mask.float().mean().item() <= 0.50 and case.note.startswith("padding 4")
    assert (batch["labels"][~mask] == -100).all() and (batch["input_ids"][~mask] == 0).all()
    pairs = next(c for c in cases if c.name.startswith("bert s128 b16 h256x4"))  # the unpadding case
    assert torch.equal(pairs.batch(CPU)["attention_mask"].bool(), harness.sentence_pair_mask(16, 128))
    assert pairs.note.startswith("sentence pairs, padding")


def test_models_summary_and_table_show_both_baselines(capsys):
    shape = "bert s128 b16 h256x4 dropout 0"
    rows = [
        harness.Row("train-step", shape, "fp32", impl, "fwd+bwd", ms, ms, ms, 1.0, "tok/s", speedup=s)
        for impl, ms, s in (("hf-eager", 30.0, 1.0), ("fastlm", 10.0, 3.0), ("fastlm-padded", 15.0, 2.0),
                            ("hf-sdpa", 20.0, 1.5))
    ]
    assert bench_models.summary(rows) == [
        "bert s128 b16 h256x4 dropout 0: fastlm over hf-eager 3.00× (target ≥ 4.0×)",
        "bert s128 b16 h256x4 dropout 0: fastlm over fastlm-padded 1.50× (target ≥ 1.5×)",
    ]
    tiny = [dataclasses.replace(r, shape="bert s128 b8 dropout 0") for r in rows]
    assert bench_models.summary(tiny) == ["bert s128 b8 dropout 0: fastlm over hf-eager 3.00× (target ≥ 4.0×)"]
    gpu = [dataclasses.replace(r, shape="bert s128 b32 dropout 0.1", dtype="bf16-amp") for r in rows]
    assert bench_models.summary(gpu) == ["bert s128 b32 dropout 0.1: fastlm over hf-sdpa 2.00× (target ≥ 2.0×)"]
    bench_models.print_table(rows)
    out = capsys.readouterr().out
    assert "vs eager" in out and "vs sdpa" in out and "3.00x    2.00x" in out


def test_models_report_which_attention_backend_ran():
    from fastlm.models import BertConfig, BertModel

    model = BertModel(BertConfig.preset("bert-tiny")).train()
    ids = torch.randint(0, 100, (2, 16))
    ran = bench_models._attention_backends(lambda: model(ids).last_hidden_state.sum().backward())
    assert ran in ("attention: cpu", "attention: reference")
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0  # padding: the batch runs unpadded where varlen attention has kernels
    ran = bench_models._attention_backends(lambda: model(ids, mask).last_hidden_state.sum().backward())
    assert ran in ("varlen_attention: cpu", "attention: reference")
