"""Training mode of every model: dropout (hidden and attention) active, a finite loss, a gradient for every
parameter, and an AdamW step that lowers the loss on a repeated batch."""

import pytest
import torch

import fastlm
from fastlm.backends import calls
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


@pytest.mark.skipif("cpu" not in fastlm.available_backends("cpu"), reason="fastlm._C not built")
@pytest.mark.parametrize("make", [bert, gpt, t5], ids=["bert", "gpt2", "t5"])
def test_a_cpu_training_step_runs_on_fastlm_kernels_only(make):
    """With the extension built, a training step (dropout on, a padded batch) runs every fused op on the cpu
    kernels: attention, the norms and the loss; none falls back to the reference."""
    torch.manual_seed(0)
    model, batch = make()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, -3:] = 0
    before = calls.copy()
    model.train()(**batch).loss.backward()
    ran = {key for key, n in calls.items() if n > before[key]}
    # BERT's padded batch runs unpadded, on varlen attention
    attention_op = "varlen_attention" if make is bert else "attention"
    assert {op for op, _ in ran} >= {attention_op, "layer_norm" if make is not t5 else "rms_norm"}
    assert {backend for _, backend in ran} == {"cpu"}, sorted(ran)
