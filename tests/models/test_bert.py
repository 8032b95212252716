"""fastlm.models BERT against Hugging Face's eager BERT (tiny random models, no downloads)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import fastlm  # noqa: E402
from fastlm.models import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

from .helpers import assert_grads_match, assert_matches_hf, hf_pair, on_backend, on_device  # noqa: E402

V, B, L = 61, 3, 9
LENGTHS = (9, 6, 4)  # right padding


def hf_config(layers=2, **kw):
    return transformers.BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
        **kw,
    )


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, L)
    ids = ids.masked_fill(mask == 0, 0)
    types = (torch.arange(L)[None, :] >= 3).long().expand(B, L) * mask
    labels = torch.full((B, L), -100).masked_scatter(torch.rand(B, L, generator=g) < 0.3, ids)
    labels[:, 1] = ids[:, 1]  # every row has a labelled position
    labels = labels.masked_fill(mask == 0, -100)
    nsp = torch.tensor([0, 1, 1])
    return ids, mask, types, labels, nsp


def load(cls, hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path).eval()


def from_fused_qkv(name, grad):
    """A fastlm gradient in HF's layout: the fused qkv weight / bias is HF's query, key and value."""
    if ".qkv." not in name:
        return [(name, grad)]
    parts = zip(("query", "key", "value"), grad.chunk(3), strict=True)
    return [(name.replace(".qkv.", f".{part}."), g) for part, g in parts]


def test_pretraining_matches_hf(backend, device, tmp_path):
    """Logits (at the real tokens: a padded batch runs unpadded where varlen attention has kernels), MLM +
    NSP loss and every parameter gradient, with padding, on every backend (1 layer)."""
    torch.manual_seed(0)
    hf32, hf64 = hf_pair(transformers.BertForPreTraining(hf_config(layers=1)), device)
    model = load(BertForPreTraining, hf32, tmp_path).to(device)
    ids, mask, types, labels, nsp = on_device(batch(), device)
    with on_backend(backend):
        out = model(ids, mask, types)
        loss = model(ids, mask, types, labels=labels, next_sentence_label=nsp).loss
        loss.backward()
    ref32 = hf32(ids, attention_mask=mask, token_type_ids=types)
    ref64 = hf64(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()  # (B, L)
    assert_matches_hf(out.logits[real], ref64.prediction_logits[real], ref32.prediction_logits[real], "logits")
    assert_matches_hf(
        out.seq_relationship_logits, ref64.seq_relationship_logits, ref32.seq_relationship_logits, "nsp logits"
    )
    losses = []
    for hf in (hf32, hf64):
        ref = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
        ref.loss.backward()
        losses.append(ref.loss)
    assert_matches_hf(loss, losses[1], losses[0], "loss")
    assert_grads_match(model, hf32, hf64, rename=from_fused_qkv)


def test_masked_lm_and_body_match_hf(tmp_path):
    torch.manual_seed(1)
    hf32, hf64 = hf_pair(transformers.BertForMaskedLM(hf_config()))
    model = load(BertForMaskedLM, hf32, tmp_path)
    ids, mask, types, labels, _ = batch(1)
    out = model(ids, mask, types)
    ref32, ref64 = (hf(ids, attention_mask=mask, token_type_ids=types) for hf in (hf32, hf64))
    real = mask.bool()  # (B, L): the real tokens (padding positions are 0 in the unpadded path)
    assert_matches_hf(out.logits[real], ref64.logits[real], ref32.logits[real], "logits")
    loss = model(ids, mask, types, labels=labels).loss
    loss.backward()
    losses = []
    for hf in (hf32, hf64):
        ref = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        ref.loss.backward()
        losses.append(ref.loss)
    assert_matches_hf(loss, losses[1], losses[0], "loss")
    assert_grads_match(model, hf32, hf64, rename=from_fused_qkv)
    body = BertModel.from_pretrained(hf32)  # an HF instance works as a source; heads are dropped
    h = body(ids, mask, types).last_hidden_state
    assert_matches_hf(
        h[real],
        hf64.bert(ids, mask, types).last_hidden_state[real],
        hf32.bert(ids, mask, types).last_hidden_state[real],
        "last_hidden_state",
    )
    assert not h[~real].any()


@pytest.mark.parametrize("num_labels, kind", [(3, "single"), (1, "regression"), (2, "regression"), (4, "multi")])
def test_sequence_classification_matches_hf(num_labels, kind, tmp_path):
    torch.manual_seed(2)
    problem = {"regression": "regression"}.get(kind)  # HF would take float labels with 2 outputs as multi-label
    config = hf_config(num_labels=num_labels, problem_type=problem)
    hf32, hf64 = hf_pair(transformers.BertForSequenceClassification(config))
    model = load(BertForSequenceClassification, hf32, tmp_path)
    assert model.initialised_keys == []
    ids, mask, types, _, _ = batch(2)
    g = torch.Generator().manual_seed(3)
    labels = {
        "single": torch.randint(0, num_labels, (B,), generator=g),
        "regression": torch.randn(B, num_labels, generator=g).squeeze(-1),
        "multi": (torch.rand(B, num_labels, generator=g) < 0.5).float(),
    }[kind]
    out = model(ids, mask, types, labels=labels)
    out.loss.backward()
    refs = []
    for hf in (hf32, hf64):
        target = labels.double() if hf is hf64 and labels.is_floating_point() else labels
        ref = hf(ids, attention_mask=mask, token_type_ids=types, labels=target)
        ref.loss.backward()
        refs.append(ref)
    assert_matches_hf(out.logits, refs[1].logits, refs[0].logits, "logits")
    assert_matches_hf(out.loss, refs[1].loss, refs[0].loss, "loss")
    assert_grads_match(model, hf32, hf64, rename=from_fused_qkv)


def test_save_pretrained_round_trips_through_hf(tmp_path):
    torch.manual_seed(3)
    model = BertForPreTraining(BertConfig.preset("bert-tiny", vocab_size=V, max_position_embeddings=16)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, types, _, _ = batch(4)
    out = model(ids, mask, types)
    ref = hf(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()  # (B, L)
    torch.testing.assert_close(out.logits[real], ref.prediction_logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, rtol=1e-4, atol=1e-4)
    again = BertForPreTraining.from_pretrained(tmp_path)
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_new_head_on_pretrained_body(tmp_path):
    torch.manual_seed(4)
    BertForPreTraining(BertConfig.preset("bert-tiny", vocab_size=V)).save_pretrained(tmp_path)
    model = BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert model.initialised_keys == ["classifier.bias", "classifier.weight"]
    assert model.classifier.out_features == 5


def test_bad_checkpoints_and_inputs(tmp_path):
    torch.manual_seed(5)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="'gpt2' model"):
        BertForPreTraining.from_pretrained(gpt)
    hf = transformers.BertForPreTraining(hf_config(layers=1))
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = dict(weights)
    del missing["bert.encoder.layer.0.output.dense.weight"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['bert.encoder.layer.0.output.dense.weight'\]"):
        BertForPreTraining.from_pretrained(tmp_path)
    partial_head = {k: v for k, v in weights.items() if k != "cls.seq_relationship.bias"}
    save_file(partial_head, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['cls.seq_relationship.bias'\]"):
        BertForPreTraining.from_pretrained(tmp_path)
    save_file({**weights, "bert.encoder.layer.7.extra": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['bert.encoder.layer.7.extra'\]"):
        BertForPreTraining.from_pretrained(tmp_path)
    model = BertForPreTraining.from_pretrained(hf)
    ids, mask, types, _, _ = batch()
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 61\)"):
        model(ids.masked_fill(ids == ids[0, 0], V))
    with pytest.raises(ValueError, match="17 positions but the model's position table holds 16"):
        model(torch.ones(1, 17, dtype=torch.long))


def test_qkv_stored_fused_with_hf_names_in_state_dict(tmp_path):
    """One (3E, E) parameter per layer, used as it is by forward; state_dict() shows HF's query / key /
    value (separate tensors, so torch.save and safetensors both take them) and load_state_dict takes them
    back, also after a dtype move."""
    torch.manual_seed(6)
    model = BertForMaskedLM(BertConfig.preset("bert-tiny", vocab_size=V, max_position_embeddings=16)).eval()
    attn = model.bert.encoder.layer[0].attention.self
    assert [n for n, _ in attn.named_parameters()] == ["qkv.weight", "qkv.bias"]
    state = model.double().state_dict()
    prefix = "bert.encoder.layer.0.attention.self."
    assert [k for k in state if k.startswith(prefix)] == [
        prefix + f"{part}.{kind}" for part in ("query", "key", "value") for kind in ("weight", "bias")
    ]
    assert torch.equal(state[prefix + "key.weight"], attn.qkv.weight[128:256])
    torch.save(state, tmp_path / "state.pt")
    again = BertForMaskedLM(model.config).double().eval()
    again.load_state_dict(torch.load(tmp_path / "state.pt"))
    ids = batch()[0]
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_unpadded_run_matches_the_padded_one(tmp_path):
    """A padded batch runs unpadded (varlen attention; only real tokens through the layers) where varlen has
    kernels: its logits at the real tokens, NSP logits, loss and every parameter gradient are within the
    rule of the padded run's, both against HF in fp64."""
    torch.manual_seed(5)
    hf32, hf64 = hf_pair(transformers.BertForPreTraining(hf_config()))
    model = load(BertForPreTraining, hf32, tmp_path)
    ids, mask, types, labels, nsp = batch(5)
    real = mask.bool()  # (B, L)
    runs = {}
    for unpadded in (True, False):
        model.bert.unpad_inputs = unpadded
        model.zero_grad()
        before = fastlm.backends.calls.copy()
        out = model(ids, mask, types, labels=labels, next_sentence_label=nsp)
        out.loss.backward()
        logits = model(ids, mask, types).logits[real]  # (T, V)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        runs[unpadded] = (logits, out.seq_relationship_logits, out.loss, grads, fastlm.backends.calls - before)
    if "cpu" in fastlm.available_backends("cpu"):
        assert ("varlen_attention", "cpu") in runs[True][4] and ("attention", "cpu") not in runs[True][4]
        assert ("varlen_attention", "cpu") not in runs[False][4]
    ref = hf64(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    ref.loss.backward()
    oracle = (hf64(ids, attention_mask=mask, token_type_ids=types).prediction_logits[real],
              ref.seq_relationship_logits, ref.loss)
    for name, actual, padded, expected in zip(("logits", "nsp logits", "loss"), runs[True], runs[False], oracle,
                                              strict=False):
        assert_matches_hf(actual, expected, padded, name)
    hf_grads = dict(hf64.named_parameters())
    for name, grad in runs[True][3].items():
        for hf_name, g in from_fused_qkv(name, grad):
            padded = dict(from_fused_qkv(name, runs[False][3][name]))[hf_name]
            assert_matches_hf(g, hf_grads[hf_name].grad, padded, f"grad {hf_name}", factor=3.0)
