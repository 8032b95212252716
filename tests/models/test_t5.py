"""fastlm.models T5 against Hugging Face's eager T5ForConditionalGeneration, v1.0 and v1.1 configs (tiny
random models, no downloads)."""

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastlm  # noqa: E402
from fastlm.models import T5Config, T5ForConditionalGeneration  # noqa: E402

from .helpers import assert_grads_match, assert_matches_hf, hf_pair, on_backend, on_device  # noqa: E402

V, B, LS, LT = 53, 3, 9, 7
SOURCE_LENGTHS, TARGET_LENGTHS = (9, 6, 3), (7, 5, 2)
VERSIONS = {
    "v1.0": {"feed_forward_proj": "relu"},
    "v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}


def hf_config(version, layers=2):
    return transformers.T5Config(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        attn_implementation="eager",
        **VERSIONS[version],
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    src_mask = (torch.arange(LS)[None, :] < torch.tensor(SOURCE_LENGTHS)[:, None]).long()
    src = torch.randint(2, V, (B, LS), generator=g).masked_fill(src_mask == 0, 0)
    tgt_mask = torch.arange(LT)[None, :] < torch.tensor(TARGET_LENGTHS)[:, None]
    labels = torch.randint(2, V, (B, LT), generator=g).masked_fill(~tgt_mask, -100)
    return src, src_mask, labels


@pytest.mark.parametrize("version", VERSIONS)
def test_matches_hf(version, backend, device, tmp_path):
    """Logits, loss and every parameter gradient with padded sources and targets, on every backend
    (1 layer; the reference backend also with 2 layers, where layer 1 reuses layer 0's position table)."""
    layers = 2 if backend == "reference" else 1
    torch.manual_seed(0)
    hf32, hf64 = hf_pair(transformers.T5ForConditionalGeneration(hf_config(version, layers)), device)
    hf32.save_pretrained(tmp_path)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path).to(device).eval()
    src, src_mask, labels = on_device(batch(), device)
    decoder_input_ids = model.shift_right(labels)
    with on_backend(backend):
        logits = model(src, src_mask, decoder_input_ids=decoder_input_ids).logits
        loss = model(src, src_mask, labels=labels).loss
        loss.backward()
    refs = [hf(src, attention_mask=src_mask, decoder_input_ids=decoder_input_ids).logits for hf in (hf32, hf64)]
    assert_matches_hf(logits, refs[1], refs[0], "logits")
    losses = []
    for hf in (hf32, hf64):
        ref = hf(src, attention_mask=src_mask, labels=labels)
        ref.loss.backward()
        losses.append(ref.loss)
    assert_matches_hf(loss, losses[1], losses[0], "loss")
    assert_grads_match(model, hf32, hf64)


@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_generate_equals_hf(version):
    torch.manual_seed(1)
    hf = transformers.T5ForConditionalGeneration(hf_config(version)).eval()
    model = T5ForConditionalGeneration.from_pretrained(hf).eval()
    src, src_mask, _ = batch(1)
    ours = model.generate(src, src_mask, max_new_tokens=8)
    theirs = hf.generate(src, attention_mask=src_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs), f"\n{ours}\n{theirs}"


def test_generate_cache_equals_full_forward():
    torch.manual_seed(2)
    model = T5ForConditionalGeneration(T5Config.preset("t5-tiny", vocab_size=V)).eval()
    src, src_mask, _ = batch(2)
    out = model.generate(src, src_mask, max_new_tokens=6, eos_token_id=None)
    for t in range(1, out.shape[1]):
        full = model(src, src_mask, decoder_input_ids=out[:, :t]).logits[:, -1]
        assert torch.equal(full.argmax(-1), out[:, t])


def count_calls(monkeypatch, module, name):
    """Record each call of ``module.name`` (still calling it) in the returned list."""
    seen, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        seen.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return seen


def test_relative_position_buckets_once_per_stack_and_forward(monkeypatch):
    """Every layer reads layer 0's table with the same lengths: one bucket computation per stack and forward
    serves them all (it was one per layer)."""
    buckets = count_calls(monkeypatch, importlib.import_module("fastlm.ops.attention"), "relative_position_bucket")
    model = T5ForConditionalGeneration(T5Config.preset("t5-tiny", vocab_size=V, num_layers=3)).train()
    src, src_mask, labels = batch()
    model(src, src_mask, labels=labels).loss.backward()
    assert len(buckets) == 2  # the encoder's and the decoder's self-attention
    model.generate(src, src_mask, max_new_tokens=3, eos_token_id=None)
    assert len(buckets) == 2 + 1 + 3  # the encoder, then one per decoding step


def test_inputs_checked_and_mask_converted_once_before_the_encoder(monkeypatch):
    """One forward converts the attention mask once for the encoder and every cross-attention (it was
    twice, the second time after the encoder), does not re-check the decoder inputs it shifts from checked
    labels, and refuses bad decoder inputs before any encoder work."""
    t5 = importlib.import_module("fastlm.models.t5")
    masks, ids = count_calls(monkeypatch, t5, "key_padding_mask"), count_calls(monkeypatch, t5, "check_ids")
    model = T5ForConditionalGeneration(T5Config.preset("t5-tiny", vocab_size=V))
    src, src_mask, labels = batch()
    model(src, src_mask, labels=labels)
    assert sum(args[0] is not None for args in masks) == 1
    assert len(ids) == 1  # input_ids (labels go through check_labels)
    encoder = count_calls(monkeypatch, model.encoder, "forward")
    with pytest.raises(ValueError, match="labels must have the shape of decoder_input_ids"):
        model(src, src_mask, decoder_input_ids=model.shift_right(labels)[:, :-1], labels=labels)
    assert not encoder


def assert_same_logits(model, hf, src_batch):
    """fastlm and Hugging Face T5 give the same logits on (src, src_mask, labels), teacher-forced."""
    src, src_mask, labels = src_batch
    dec = model.shift_right(labels)
    torch.testing.assert_close(
        model(src, src_mask, decoder_input_ids=dec).logits,
        hf(src, attention_mask=src_mask, decoder_input_ids=dec).logits,
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("preset", ["t5-tiny", "t5-v1_1-small"])
def test_save_pretrained_round_trips(preset, tmp_path):
    """fastlm -> HF format -> fastlm keeps every tensor; HF reads it (tied v1.0, untied v1.1) to the same logits."""
    torch.manual_seed(3)
    config = T5Config.preset(preset, vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    again = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config == model.config
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_same_logits(model, hf, batch(3))


def test_hf_checkpoint_with_its_own_lm_head(tmp_path):
    """An HF T5 whose lm_head differs from the embedding (real v1.1 weights) stays untied here too."""
    torch.manual_seed(5)
    hf = transformers.T5ForConditionalGeneration(hf_config("v1.1", layers=1)).eval()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight))
    hf.save_pretrained(tmp_path)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert model.lm_head is not None and not model.config.tie_word_embeddings
    assert_same_logits(model, hf, batch(5))


def test_bad_inputs_and_checkpoints():
    torch.manual_seed(4)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="'gpt2' model"):
        T5ForConditionalGeneration.from_pretrained(gpt)
    model = T5ForConditionalGeneration(T5Config.preset("t5-tiny", vocab_size=V))
    src, src_mask, labels = batch()
    with pytest.raises(
        ValueError, match=r"decoder_input_ids holds ids in \[53, 53\], outside the vocabulary \[0, 53\)"
    ):
        model(src, src_mask, decoder_input_ids=torch.full((B, 2), V))
    with pytest.raises(ValueError, match="pass decoder_input_ids or labels"):
        model(src, src_mask)


@pytest.mark.parametrize("padded_source", [True, False])
@pytest.mark.parametrize("version", VERSIONS)
def test_unpadded_model_matches_the_padded_one(version, padded_source):
    """Padded sources and ragged targets run unpadded where varlen has kernels: the encoder (varlen attention
    with the relative-position bias per sequence), the decoder (causal varlen self-attention with the
    unidirectional bias, varlen cross-attention on the packed encoder output, or on the uniform source without
    padding) and the head. Logits at real targets (0 at the padding), loss and every parameter gradient are
    within the rule of the padded run's, both against HF in fp64 (2 layers: layer 1 reuses layer 0's table).
    The loss's decoder unpads on the trailing -100s of labels only: a -100 inside a target stays a token."""
    torch.manual_seed(2)
    hf32, hf64 = hf_pair(transformers.T5ForConditionalGeneration(hf_config(version)))
    model = T5ForConditionalGeneration.from_pretrained(hf32).eval()
    src, src_mask, labels = batch(2)
    if not padded_source:
        src_mask = torch.ones_like(src_mask)
    labels[0, 2] = -100  # ignored, not padding
    decoder_input_ids = model.shift_right(labels)
    tgt_mask = torch.arange(LT)[None, :] < torch.tensor(TARGET_LENGTHS)[:, None]  # (B, Lt) bool
    runs = {}
    for unpadded in (True, False):
        model.unpad_inputs = unpadded
        model.zero_grad()
        before = fastlm.backends.calls.copy()
        logits = model(src, src_mask, decoder_input_ids=decoder_input_ids, decoder_attention_mask=tgt_mask).logits
        loss = model(src, src_mask, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        runs[unpadded] = (logits, loss, grads, fastlm.backends.calls - before)
    if "cpu" in fastlm.available_backends("cpu"):
        encoder, decoder = 2 * padded_source, 2 * 2  # varlen calls per forward: per layer, self- and cross-
        assert runs[True][3][("varlen_attention", "cpu")] == 2 * (encoder + decoder)  # 2 forwards
        assert ("varlen_attention", "cpu") not in runs[False][3]
    assert not runs[True][0][~tgt_mask].any()  # 0 at the target padding
    ref = hf64(src, attention_mask=src_mask, labels=labels)
    ref.loss.backward()
    oracle_logits = hf64(
        src, attention_mask=src_mask, decoder_input_ids=decoder_input_ids, decoder_attention_mask=tgt_mask
    ).logits
    actual, padded = (runs[u][0][tgt_mask] for u in (True, False))  # (T, V) at the real targets
    assert_matches_hf(actual, oracle_logits[tgt_mask], padded, "logits")
    assert_matches_hf(runs[True][1], ref.loss, runs[False][1], "loss")
    hf_grads = dict(hf64.named_parameters())
    for name, grad in runs[True][2].items():
        assert_matches_hf(grad, hf_grads[name].grad, runs[False][2][name], f"grad {name}", factor=3.0)


def test_decoder_unpads_only_on_target_padding():
    """The decoder runs varlen on decoder_attention_mask's padding (labels -100 there) or, with labels only, on
    their trailing -100s; padded without target padding, when labels at the padding are not -100 (the loss
    counts them), in generate() and with unpad_inputs False."""
    if "cpu" not in fastlm.available_backends("cpu"):
        pytest.skip("no cpu varlen kernel")
    model = T5ForConditionalGeneration(T5Config.preset("t5-tiny", vocab_size=V)).eval()
    src, src_mask, labels = batch()
    tgt_mask = labels != -100  # (B, Lt), right padding

    def varlen_calls(run=model, **kwargs):
        before = fastlm.backends.calls.copy()
        run(src, src_mask, **kwargs)
        return (fastlm.backends.calls - before)[("varlen_attention", "cpu")]

    encoder, decoder = 2, 2 * 2  # per forward: 2 encoder layers; 2 decoder layers, self- and cross-attention
    dec, other_labels = model.shift_right(labels), labels.masked_fill(~tgt_mask, 5)
    assert varlen_calls(labels=labels) == encoder + decoder
    assert varlen_calls(labels=labels, decoder_attention_mask=tgt_mask) == encoder + decoder
    assert varlen_calls(decoder_input_ids=dec, decoder_attention_mask=tgt_mask) == encoder + decoder
    assert varlen_calls(labels=other_labels, decoder_attention_mask=tgt_mask) == encoder
    assert varlen_calls(labels=other_labels) == encoder
    assert varlen_calls(decoder_input_ids=dec) == encoder
    assert varlen_calls(model.generate, max_new_tokens=2, eos_token_id=None) == encoder
    model.unpad_inputs = False
    assert varlen_calls(labels=labels) == 0


def test_masks_with_holes_stay_padded():
    """Padding between two tokens of a row (in the source or the target mask) keeps that stack padded:
    packing would bring the tokens closer and change their relative-position buckets. Logits still match HF,
    and a right-padded row next to it changes nothing."""
    if "cpu" not in fastlm.available_backends("cpu"):
        pytest.skip("no cpu varlen kernel")
    torch.manual_seed(3)
    hf32, hf64 = hf_pair(transformers.T5ForConditionalGeneration(hf_config("v1.0")))
    model = T5ForConditionalGeneration.from_pretrained(hf32).eval()
    src, src_mask, labels = batch(3)
    src_mask[0, 3] = 0  # a hole in row 0 (length 9)
    tgt_mask = (labels != -100).long()
    tgt_mask[0, 2] = 0  # a hole in row 0 (length 7)
    dec = model.shift_right(labels)
    before = fastlm.backends.calls.copy()
    logits = model(src, src_mask, decoder_input_ids=dec, decoder_attention_mask=tgt_mask).logits
    assert ("varlen_attention", "cpu") not in fastlm.backends.calls - before
    model.unpad_inputs = False
    padded = model(src, src_mask, decoder_input_ids=dec, decoder_attention_mask=tgt_mask).logits
    oracle = hf64(src, attention_mask=src_mask, decoder_input_ids=dec, decoder_attention_mask=tgt_mask).logits
    real = tgt_mask.bool()
    assert_matches_hf(logits[real], oracle[real], padded[real], "logits")
