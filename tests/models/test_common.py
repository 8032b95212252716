"""Bad inputs to every model: a clear error naming the argument and what was expected."""

import dataclasses

import pytest
import torch

from fastlm.models import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPTConfig,
    GPTLMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

V, B, L = 29, 2, 5


def tiny(family):
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig.preset("bert-tiny", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
        return BertForMaskedLM(config).eval()
    if family == "gpt":
        return GPTLMHeadModel(GPTConfig.preset("gpt2-tiny", vocab_size=V, n_embd=16, n_layer=1, n_positions=8)).eval()
    config = T5Config.preset("t5-tiny", vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_layers=1)
    return T5ForConditionalGeneration(config).eval()


def call(model, ids, **kw):
    """The model's forward on ids (T5: as the source and the decoder input)."""
    if isinstance(model, T5ForConditionalGeneration):
        kw.setdefault("decoder_input_ids", torch.zeros(B, 2, dtype=torch.long))
    return model(ids, **kw)


IDS = torch.arange(B * L).reshape(B, L) % V


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
@pytest.mark.parametrize(
    "ids, error, message",
    [
        (IDS[0], ValueError, r"input_ids must have shape \(B, L\) with L >= 1, got \(5,\)"),
        (IDS[:, :0], ValueError, r"input_ids must have shape \(B, L\) with L >= 1, got \(2, 0\)"),
        (
            IDS.float(),
            TypeError,
            r"input_ids must be an integer tensor \(B, L\) of dtype int64 or int32, got dtype torch.float32",
        ),
        (IDS.tolist(), TypeError, r"input_ids must be an integer tensor \(B, L\), got a list"),
        (IDS.to(torch.uint8), TypeError, r"input_ids must be .* of dtype int64 or int32, got dtype torch.uint8"),
        (IDS + V, ValueError, r"input_ids holds ids in \[29, 38\], outside the vocabulary \[0, 29\)"),
    ],
)
def test_bad_input_ids(family, ids, error, message):
    with pytest.raises(error, match=message):
        call(tiny(family), ids)


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
@pytest.mark.parametrize(
    "mask, error, message",
    [
        (torch.ones(B, L - 1), ValueError, r"attention_mask must have shape \(B, .*L\) = \(2, 5\), got \(2, 4\)"),
        (torch.ones(B, 1, L), ValueError, r"attention_mask must have shape .* got \(2, 1, 5\)"),
        (torch.full((B, L), 0.5), ValueError, "attention_mask must hold only 0 .padding. and 1 .token."),
        (torch.zeros(B, L).index_fill(1, torch.tensor([4]), -1e4), ValueError, "must hold only 0"),  # additive
        (torch.ones(B, L, dtype=torch.complex64), TypeError, "attention_mask must be bool, integer or floating"),
    ],
)
def test_bad_attention_mask(family, mask, error, message):
    with pytest.raises(error, match=message):
        call(tiny(family), IDS, attention_mask=mask)


@pytest.mark.parametrize("family", ["bert", "gpt", "t5"])
def test_float_bool_and_int_masks_agree(family):
    model = tiny(family)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    outs = [call(model, IDS, attention_mask=m).logits for m in (mask, mask.bool(), mask.float())]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bert_token_types_and_classification_labels():
    model = tiny("bert")
    with pytest.raises(ValueError, match=r"token_type_ids must have shape \(B, L\) = \(2, 5\), got \(2, 3\)"):
        model(IDS, token_type_ids=torch.zeros(B, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_type_ids holds ids in \[0, 2\], outside the token types \[0, 2\)"):
        model(IDS, token_type_ids=torch.arange(L).repeat(B, 1) % 3)
    classifier = BertForSequenceClassification(dataclasses.replace(model.config, num_labels=1))
    with pytest.raises(ValueError, match=r"labels of a regression must have shape \(B, num_labels\) = \(2, 1\)"):
        classifier(IDS, labels=torch.zeros(B + 1))
    multi = BertForSequenceClassification(dataclasses.replace(model.config, num_labels=3))
    with pytest.raises(ValueError, match=r"labels must have shape \(B, num_labels\) = \(2, 3\), got \(2, 2\)"):
        multi(IDS, labels=torch.zeros(B, 2))


def test_gpt_position_ids():
    model = tiny("gpt")
    with pytest.raises(ValueError, match=r"position_ids holds ids in \[0, 8\], outside the position table \[0, 8\)"):
        model(IDS, position_ids=torch.tensor([[0, 1, 2, 3, 8]]))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(B, L\) = \(2, 5\) or \(1, L\), got \(1, 4\)"):
        model(IDS, position_ids=torch.arange(4)[None])
    assert torch.equal(model(IDS, position_ids=torch.arange(L)[None]).logits, model(IDS).logits)


def test_t5_labels_are_checked_before_shifting():
    model = tiny("t5")
    with pytest.raises(ValueError, match=r"labels \(where not -100\) holds ids in \[0, 29\], outside the vocabulary"):
        model(IDS, labels=torch.tensor([[1, 29], [-100, 0]]))
    with pytest.raises(TypeError, match=r"labels \(where not -100\) must be an integer tensor"):
        model(IDS, labels=torch.ones(B, 2))


def test_t5_decoder_mask_and_encoder_outputs():
    model = tiny("t5")
    dec = torch.zeros(B, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"decoder_attention_mask must have shape \(B, Lt\) = \(2, 2\), got \(2, 3\)"):
        model(IDS, decoder_input_ids=dec, decoder_attention_mask=torch.ones(B, 3))
    with pytest.raises(ValueError, match=r"encoder_outputs must be a tensor \(B, Ls, d_model=16\).*got \(2, 5, 7\)"):
        model(IDS, decoder_input_ids=dec, encoder_outputs=torch.zeros(B, L, 7))
    encoded = model.encode(IDS)
    assert torch.equal(
        model(IDS, decoder_input_ids=dec, encoder_outputs=encoded).logits, model(IDS, decoder_input_ids=dec).logits
    )
