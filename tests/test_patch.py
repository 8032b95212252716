"""fastlm.patch on tiny random Hugging Face models and plain PyTorch modules: the same logits, loss and
gradients as the unpatched model, proof that the fused ops ran, generate(), Trainer, unpatch."""

import copy
import sys
import warnings

import pytest
import torch

import fastlm
from fastlm.backends import calls
from fastlm.patch import FusedMultiheadAttention

transformers = pytest.importorskip("transformers")

VOCAB = 99


def bert_config(layers=2):
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def gpt2_config():
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )


def t5_config(gated):
    return transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def llama_config(config_class=None, **overrides):
    """A tiny Llama-style config (GQA, gated MLP); `config_class` for a sibling family (Mistral, ...)."""
    return (config_class or transformers.LlamaConfig)(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )


def build(cls, config):
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="eager").eval()


def padded_batch(lengths=(11, 8)):
    g = torch.Generator().manual_seed(1)
    B, L = len(lengths), max(lengths)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def mlm_labels(ids, mask, fraction=0.3):
    g = torch.Generator().manual_seed(2)
    chosen = (torch.rand(ids.shape, generator=g) < fraction) & (mask == 1)
    chosen[0, 1] = True
    return ids.masked_fill(~chosen, -100)


def run(model, train, **inputs):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(patched, original, inputs, *, train=True, logits=True):
    ref, ref_grads = run(original, train, **inputs)
    out, grads = run(patched, train, **inputs)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    if logits:
        name = "prediction_logits" if hasattr(ref, "prediction_logits") else "logits"
        got, expected = getattr(out, name), getattr(ref, name)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    return out, ref


def patched_copy(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastlm.patch(copy.deepcopy(model), **kwargs)


def count(op_prefix):
    return sum(n for (op, _), n in calls.items() if op.startswith(op_prefix))


def test_bert_masked_lm_and_the_fused_ops_ran():
    model = build(transformers.BertForMaskedLM, bert_config())
    patched = patched_copy(model)
    ids, mask = padded_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": mlm_labels(ids, mask)}
    before = {op: count(op) for op in ("attention", "layer_norm", "linear_cross_entropy")}
    assert_same(patched, model, inputs, train=False)
    for op, n in before.items():
        assert count(op) > n, f"fastlm {op} did not run"
    out = patched.train()(**inputs)
    assert out.logits.numel() == 0, "training with labels must not materialise the logits"
    assert patched.train()(**inputs, return_logits=True).logits.shape == (2, 11, VOCAB)


def test_bert_pretraining_with_nsp():
    model = build(transformers.BertForPreTraining, bert_config())
    patched = patched_copy(model)
    ids, mask = padded_batch()
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": mlm_labels(ids, mask),
        "next_sentence_label": torch.tensor([0, 1]),
        "token_type_ids": (torch.arange(11) > 5).long().expand(2, -1),
    }
    assert_same(patched, model, inputs, train=False)
    assert_same(patched, model, inputs, train=True, logits=False)


def test_bert_sequence_classification():
    model = build(transformers.BertForSequenceClassification, bert_config())
    model.config.num_labels = 2
    patched = patched_copy(model)
    ids, mask = padded_batch()
    assert_same(patched, model, {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])})


def test_gpt2_with_padding_and_generate():
    model = build(transformers.GPT2LMHeadModel, gpt2_config())
    patched = patched_copy(model)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    assert_same(patched, model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, train=False)
    prompt, prompt_mask = padded_batch((5, 5))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(prompt, attention_mask=prompt_mask, **kwargs)
    torch.testing.assert_close(patched.generate(prompt, attention_mask=prompt_mask, **kwargs), expected)


@pytest.mark.parametrize("gated", [False, True], ids=["t5-v1.0", "t5-v1.1"])
def test_t5_uses_in_kernel_relative_bias(gated):
    model = build(transformers.T5ForConditionalGeneration, t5_config(gated))
    patched = patched_copy(model)
    ids, mask = padded_batch()
    labels = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    labels[1, 5:] = -100
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    before = count("attention")
    assert_same(patched, model, inputs, train=False)
    # every self-, causal and cross-attention of both stacks ran fused (the stacks hold copies of the config)
    assert count("attention") - before == 3 * len(patched.encoder.block)
    table = patched.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert table.grad is not None and table.grad.abs().sum() > 0
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    torch.testing.assert_close(
        patched.generate(ids, attention_mask=mask, **kwargs), model.generate(ids, attention_mask=mask, **kwargs)
    )


def test_t5_builds_no_dense_position_bias_and_buckets_once_per_stack(monkeypatch):
    """HF's layer 0 builds its stack's dense (1, H, Lq, Lk) bias (compute_bias: buckets of every pair, a
    table lookup) that the fused kernel never reads: the patched model skips it, computes the buckets once
    per stack rather than per layer, and unpatch brings compute_bias back."""
    from transformers.models.t5 import modeling_t5

    fused = sys.modules["fastlm.ops.attention"]  # the module (fastlm.ops.attention is also the function)
    model = build(transformers.T5ForConditionalGeneration, t5_config(False))
    patched = patched_copy(model).train()
    dense, buckets = [], []
    hf_bucket, our_bucket = modeling_t5.T5Attention._relative_position_bucket, fused.relative_position_bucket
    monkeypatch.setattr(
        modeling_t5.T5Attention,
        "_relative_position_bucket",
        staticmethod(lambda *a, **k: dense.append(a) or hf_bucket(*a, **k)),
    )
    monkeypatch.setattr(fused, "relative_position_bucket", lambda *a, **k: buckets.append(a) or our_bucket(*a, **k))
    ids, mask = padded_batch()
    labels = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    patched(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(dense) == 0
    assert len(buckets) == 2  # the encoder's and the decoder's self-attention, not once per layer
    fastlm.unpatch(patched)
    patched(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(dense) == 2


def test_llama_gqa_rms_norm_and_generate():
    model = build(transformers.LlamaForCausalLM, llama_config())
    patched = patched_copy(model)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    assert_same(patched, model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, train=False)
    assert all(type(m).__name__ != "LlamaRMSNorm" for m in patched.modules())
    prompt, prompt_mask = padded_batch((4, 4))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(
        patched.generate(prompt, attention_mask=prompt_mask, **kwargs),
        model.generate(prompt, attention_mask=prompt_mask, **kwargs),
    )


def test_sliding_window_mask_takes_the_dense_fallback():
    """A sliding window is neither plain causal nor bidirectional: the mask interface builds the dense 4-D
    mask through transformers' sdpa_mask, which once got allow_is_causal_skip twice (a TypeError)."""
    config = llama_config(transformers.MistralConfig, sliding_window=4)
    model = build(transformers.MistralForCausalLM, config)
    patched = patched_copy(model)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    before = count("attention")
    assert_same(patched, model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, train=False)
    assert count("attention") > before


@pytest.mark.parametrize("forced", [None, "triton", "reference"], ids=["default-dispatch", "triton", "reference"])
def test_one_layer_bert_per_backend(forced, device):
    """Default dispatch runs the cpu kernels where they exist on CPU tensors, triton or cuda on CUDA tensors;
    triton (under the interpreter on CPU) has every op, so it can be forced for the whole model."""
    if forced is not None and forced not in fastlm.available_backends(device):
        pytest.skip(f"{forced} unavailable here")
    model = build(transformers.BertForMaskedLM, bert_config(layers=1)).to(device)
    patched = patched_copy(model)
    ids, mask = padded_batch((6, 4))
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": mlm_labels(ids, mask)}
    inputs = {name: t.to(device) for name, t in inputs.items()}
    before = calls.copy()
    if forced is None:
        assert_same(patched, model, inputs, train=False)
    else:
        with fastlm.use_backend(forced):
            assert_same(patched, model, inputs, train=False)
    ran = {backend for (op, backend), n in calls.items() if n > before[(op, backend)]}
    if forced is not None:
        assert ran == {forced}
    elif device == "cuda":
        assert ran & {"triton", "cuda"} and not ran & {"cpu", "cuda_emu"}, ran
    elif "cpu" in fastlm.available_backends("cpu"):
        assert ran == {"cpu"}, ran  # attention too: every fused op has cpu kernels


def test_plain_pytorch_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=37, dropout=0.0, batch_first=True).eval()
    patched = patched_copy(layer)
    assert isinstance(patched.self_attn, FusedMultiheadAttention)
    assert isinstance(patched.norm1, fastlm.nn.LayerNorm)
    x = torch.randn(2, 9, 32, requires_grad=True)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True  # torch's convention: True = ignore
    expected = layer(x, src_key_padding_mask=padding)
    got = patched(x, src_key_padding_mask=padding)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :6], expected[1, :6], atol=1e-5, rtol=1e-5)


def test_plain_multihead_attention_sequence_first_with_mask():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2)
    patched = patched_copy(mha)
    q, kv = torch.randn(5, 3, 16), torch.randn(7, 3, 16)
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    expected, _ = mha(q, kv, kv, attn_mask=causal)
    got, weights = patched(q, kv, kv, attn_mask=causal, need_weights=False)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unpatch_restores_and_patch_twice_is_a_noop(capsys):
    model = build(transformers.BertForMaskedLM, bert_config())
    originals = [m for m in model.modules()]
    fastlm.patch(model, verbose=True)
    assert "LayerNorm -> fastlm LayerNorm" in capsys.readouterr().out
    modules_after_first = [m for m in model.modules()]
    fastlm.patch(model)
    assert [m for m in model.modules()] == modules_after_first
    assert model.config._attn_implementation == "fastlm"
    fastlm.unpatch(model)
    assert [m for m in model.modules()] == originals
    assert model.config._attn_implementation == "eager"
    ids, mask = padded_batch()
    assert model(input_ids=ids, attention_mask=mask, labels=mlm_labels(ids, mask)).logits.shape == (2, 11, VOCAB)


def test_shares_parameters_and_state_dict():
    model = build(transformers.GPT2LMHeadModel, gpt2_config())
    keys = model.state_dict().keys()
    params = {id(p) for p in model.parameters()}
    patched = patched_copy(model)
    assert patched.state_dict().keys() == keys
    fastlm.patch(model)
    assert {id(p) for p in model.parameters()} == params


def test_warns_about_what_it_leaves_alone():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.GroupNorm(2, 4)
            self.ln = torch.nn.LayerNorm(4)

    with pytest.warns(UserWarning, match="GroupNorm"):
        fastlm.patch(Odd())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastlm.patch("not a model")


def test_trainer_runs_a_few_steps_on_a_patched_model(tmp_path):
    pytest.importorskip("accelerate")
    model = fastlm.patch(build(transformers.BertForMaskedLM, bert_config()))
    ids, mask = padded_batch()
    labels = mlm_labels(ids, mask)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(2)] * 4
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))


# --------------------------------------------------------------------------- every nn.MultiheadAttention option
B, L, S, E = 2, 5, 7, 16
_KPM = torch.zeros(B, S, dtype=torch.bool)
_KPM[1, 4:] = True  # torch's convention: True = ignore
_DEAD = torch.rand(B * 2, L, S, generator=torch.Generator().manual_seed(4)) > 0.6
_DEAD[1, 2] = True  # a query that may attend to no key: torch returns zeros there
MHA_CASES = {
    "seq-first-bool-padding": ({"batch_first": False}, {"key_padding_mask": _KPM}),
    "float-padding-finite": ({}, {"key_padding_mask": torch.randn(B, S, generator=torch.Generator().manual_seed(5))}),
    "float-padding-inf": ({}, {"key_padding_mask": torch.zeros(B, S).masked_fill(_KPM, float("-inf"))}),
    "add-zero-attn": ({"add_zero_attn": True}, {"key_padding_mask": _KPM}),
    "add-bias-kv": ({"add_bias_kv": True}, {"attn_mask": torch.ones(L, S, dtype=torch.bool).triu(1)}),
    "bias-kv-zero-attn-causal": (
        {"add_bias_kv": True, "add_zero_attn": True},
        {"attn_mask": torch.ones(L, S, dtype=torch.bool).triu(1), "is_causal": True},
    ),
    "kdim-vdim-no-bias-3d-float": ({"kdim": 8, "vdim": 12, "bias": False}, {"attn_mask": torch.randn(B * 2, L, S)}),
    "3d-bool-with-dead-rows-and-padding": ({}, {"attn_mask": _DEAD, "key_padding_mask": _KPM}),
    "bool-padding-float-mask": ({}, {"attn_mask": torch.randn(L, S), "key_padding_mask": _KPM}),
    "causal-hint-with-padding": ({}, {"attn_mask": torch.ones(L, S, dtype=torch.bool).triu(3), "is_causal": True,
                                      "key_padding_mask": _KPM}),
    "causal-hint-top-left": ({}, {"attn_mask": torch.zeros(L, S, dtype=torch.bool), "is_causal": True}),
    "unbatched": ({"add_zero_attn": True}, {"key_padding_mask": _KPM[1], "attn_mask": _DEAD[:2]}),
}


def _mha_pair(ctor, train=False):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(E, 2, batch_first=ctor.pop("batch_first", True), **ctor).train(train)
    if mha.bias_k is not None:
        torch.nn.init.normal_(mha.bias_k), torch.nn.init.normal_(mha.bias_v)
    return mha, patched_copy(mha)


def _mha_inputs(mha, unbatched=False):
    g = torch.Generator().manual_seed(6)
    batch = () if unbatched else (B,)

    def make(length, dim):
        t = torch.randn(*batch, length, dim, generator=g)
        return (t if mha.batch_first or unbatched else t.transpose(0, 1)).requires_grad_()

    return make(L, E), make(S, mha.kdim), make(S, mha.vdim)


def _mha_run(module, inputs, kwargs):
    out, weights = module(*inputs, need_weights=False, **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * weight).sum(), [*inputs, *module.parameters()])
    return out, grads


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, on the reference
@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_option_matches_torch(case):
    """Each option of torch.nn.MultiheadAttention gives torch's output and gradients once patched (a float
    key_padding_mask is added to the scores, add_zero_attn and add_bias_kv append their keys)."""
    ctor, kwargs = MHA_CASES[case]
    mha, patched = _mha_pair(dict(ctor))
    assert isinstance(patched, FusedMultiheadAttention)
    inputs = _mha_inputs(mha, unbatched=case == "unbatched")
    before = count("attention")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path, no fallback
        out, grads = _mha_run(patched, inputs, kwargs)
    assert count("attention") > before
    expected, expected_grads = _mha_run(mha, inputs, kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which one-time fallback warnings this process already gave."""
    monkeypatch.setattr(sys.modules["fastlm.patch"], "_WARNED", set())


def test_multihead_attention_need_weights_runs_torch_with_one_warning(fresh_warnings):
    mha, patched = _mha_pair({"batch_first": False})
    inputs = _mha_inputs(mha)
    expected = mha(*inputs, key_padding_mask=_KPM, average_attn_weights=False)
    with pytest.warns(UserWarning, match="need_weights=True"):
        got = patched(*inputs, key_padding_mask=_KPM, average_attn_weights=False)
    torch.testing.assert_close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        patched(*inputs)


def test_multihead_attention_is_causal_needs_a_mask_as_in_torch():
    mha, patched = _mha_pair({})
    inputs = _mha_inputs(mha)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mha(*inputs, need_weights=False, is_causal=True)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        patched(*inputs, need_weights=False, is_causal=True)


def test_multihead_attention_dropout_follows_the_module_and_its_mode():
    mha, patched = _mha_pair({"dropout": 0.5})
    inputs = _mha_inputs(mha)
    expected, _ = mha(*inputs, need_weights=False)
    torch.testing.assert_close(patched(*inputs, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)
    patched.train()
    torch.manual_seed(8)
    first, _ = patched(*inputs, need_weights=False)
    torch.manual_seed(8)
    again, _ = patched(*inputs, need_weights=False)
    torch.testing.assert_close(first, again)
    assert (first - expected).abs().max() > 1e-2, "training mode must apply dropout"
    patched.dropout = 0.0
    torch.testing.assert_close(patched(*inputs, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- Hugging Face attention options
HF_MODELS = {
    "bert": (transformers.BertForMaskedLM, bert_config),
    "gpt2": (transformers.GPT2LMHeadModel, gpt2_config),
    "t5": (transformers.T5ForConditionalGeneration, lambda: t5_config(False)),
    "llama": (transformers.LlamaForCausalLM, llama_config),
}


def _attentions(output):
    """Every attention-weight tuple a model output carries, in a fixed order."""
    names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
    return [w for name in names for w in (getattr(output, name, None) or ())]


@pytest.mark.parametrize("name", HF_MODELS)
def test_output_attentions_runs_the_eager_attention_with_one_warning(name, fresh_warnings):
    """output_attentions=True needs the weights, which the fused kernel never forms: the patched model runs
    its own eager attention for that call (same weights, logits, gradients) and says so once."""
    cls, config = HF_MODELS[name]
    model = build(cls, config())
    patched = patched_copy(model)
    ids, mask = padded_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if name == "bert":
        inputs["labels"] = mlm_labels(ids, mask)
    if name == "t5":
        inputs["labels"] = inputs["labels"][:, :7].contiguous()
    with pytest.warns(UserWarning, match="output_attentions=True"):
        out, ref = assert_same(patched, model, {**inputs, "output_attentions": True}, train=False)
    got, expected = _attentions(out), _attentions(ref)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        patched(**inputs, output_attentions=True)
    if name != "t5":  # T5's fused path is slow on CPU and has its own test
        before = count("attention")
        patched(**inputs)  # without the weights: the fused kernel again
        assert count("attention") > before


def test_softcapping_runs_the_models_own_attention_and_loss(fresh_warnings):
    """Gemma-2 soft-caps its attention scores (an attention argument fastlm.attention doesn't implement) and
    its final logits (which the fused loss would skip): the patched model keeps its own code for both."""
    config = llama_config(
        transformers.Gemma2Config, head_dim=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0
    )
    model = build(transformers.Gemma2ForCausalLM, config)
    with pytest.warns(UserWarning, match="final_logit_softcapping changes the logits"):
        patched = fastlm.patch(copy.deepcopy(model))
    ids, mask = padded_batch()
    with pytest.warns(UserWarning, match="attention argument.* softcap"):
        assert_same(patched, model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, train=False)


def test_hf_attention_takes_is_causal_from_the_call():
    """Models that pass is_causal (cross-attention, encoders) override the module's attribute, as in
    transformers' own sdpa path."""
    from fastlm.patch import hf_attention

    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    for is_causal in (False, True):
        got, _ = hf_attention(module, q, k, v, None, is_causal=is_causal)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        torch.testing.assert_close(got, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"key_padding_mask": torch.zeros(1, S)}, ValueError, r"key_padding_mask must have shape \(2, 7\)"),
        ({"attn_mask": torch.zeros(B, L, S, dtype=torch.bool)}, ValueError, r"attn_mask must have shape \(5, 7\) or"),
        ({"attn_mask": torch.zeros(L, S, dtype=torch.long)}, TypeError, "attn_mask must be bool or floating-point"),
    ],
    ids=["broadcastable-padding", "3d-mask-per-batch-only", "integer-mask"],
)
def test_multihead_attention_refuses_masks_torch_refuses(kwargs, error, match):
    """Masks torch.nn.MultiheadAttention rejects are rejected with the argument named, never broadcast."""
    mha, patched = _mha_pair({})
    inputs = _mha_inputs(mha)
    with pytest.raises((AssertionError, RuntimeError)):
        mha(*inputs, need_weights=False, **kwargs)
    with pytest.raises(error, match=match):
        patched(*inputs, need_weights=False, **kwargs)


@pytest.mark.skipif("cpu" not in fastlm.available_backends("cpu"), reason="fastlm._C not built")
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_padding_free_training_with_the_flattening_collator(family):
    """transformers' DataCollatorWithFlattening packs the sequences into one row (positions restart, the
    flash-attention keyword arguments name the sequences): the patched model runs fastlm's varlen attention,
    and three AdamW steps give the losses of the same model trained on the padded batch."""
    lengths = (11, 5, 8)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    if family == "bert":
        model = build(transformers.BertForMaskedLM, bert_config())
        labels = [torch.where(torch.rand(n, generator=g) < 0.4, s, -100) for n, s in zip(lengths, seqs, strict=True)]
    else:
        model = build(transformers.GPT2LMHeadModel, gpt2_config())
        labels = [s.clone() for s in seqs]
    for label in labels:
        label[0] = -100  # the collator puts its separator (-100) on each sequence's first label
    features = [{"input_ids": s.tolist(), "labels": y.tolist()} for s, y in zip(seqs, labels, strict=True)]
    flat = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)  # one row
    B, L = len(lengths), max(lengths)
    padded = {"input_ids": torch.zeros(B, L, dtype=torch.long), "attention_mask": torch.zeros(B, L, dtype=torch.long),
              "labels": torch.full((B, L), -100)}
    for b, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        padded["input_ids"][b, : len(s)], padded["attention_mask"][b, : len(s)], padded["labels"][b, : len(s)] = s, 1, y
    losses = {}
    for name, batch in (("flat", flat), ("padded", padded)):
        trained = patched_copy(model).train()
        optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
        before = calls.copy()
        losses[name] = []
        for _ in range(3):
            loss = trained(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
        ran = calls - before
        assert (("varlen_attention", "cpu") in ran) == (name == "flat"), ran
    torch.testing.assert_close(losses["flat"], losses["padded"], rtol=1e-4, atol=1e-5)
    assert losses["flat"][-1] < losses["flat"][0]
