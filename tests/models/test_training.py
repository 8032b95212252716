"""Training mode of every model: dropout (hidden and attention) active, a finite loss, a gradient for every
parameter, and an AdamW step that lowers the loss on a repeated batch."""

import pytest
import torch

from fastlm.models import (
    BertConfig,
    BertForPreTraining,
    GPTConfig,
    GPTLMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

V = 50


def bert():
    config = BertConfig.preset("bert-tiny", vocab_size=V, hidden_size=32, intermediate_size=64)
    ids = torch.randint(1, V, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.3, ids, -100)
    labels[:, 0] = ids[:, 0]
    return BertForPreTraining(config), {"input_ids": ids, "labels": labels, "next_sentence_label": torch.tensor([0, 1])}


def gpt():
    config = GPTConfig.preset("gpt2-tiny", vocab_size=V, n_embd=32)
    ids = torch.randint(0, V, (2, 12))
    return GPTLMHeadModel(config), {"input_ids": ids, "labels": ids}


def t5():
    config = T5Config.preset("t5-tiny", vocab_size=V, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return T5ForConditionalGeneration(config), {
        "input_ids": torch.randint(2, V, (2, 10)),
        "labels": torch.randint(2, V, (2, 6)),
    }


@pytest.mark.parametrize("make", [bert, gpt, t5], ids=["bert", "gpt2", "t5"])
def test_train_steps(make):
    torch.manual_seed(0)
    model, batch = make()
    model.train()
    first, second = model(**batch).loss, model(**batch).loss
    assert torch.isfinite(first) and not torch.equal(first, second)  # dropout is on
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.eval()
    before = model(**batch).loss.item()
    model.train()
    for _ in range(5):
        model(**batch).loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing}"
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert model(**batch).loss.item() < before
