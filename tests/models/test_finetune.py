"""Fine-tuning helpers on a tiny BERT classifier: freezing, linear probing, a new head."""

import pytest
import torch

from fastlm.models import BertConfig, BertForSequenceClassification
from fastlm.models.finetune import freeze_all_but, linear_probe, new_head, trainable_parameters


def tiny():
    torch.manual_seed(0)
    config = BertConfig.preset("bert-tiny", vocab_size=40, hidden_size=16, intermediate_size=32, num_labels=3)
    return BertForSequenceClassification(config)


def test_freeze_all_but_trains_only_the_named_parts():
    model = tiny()
    trainable = freeze_all_but(model, ["classifier", "bert.encoder.layer.1"])
    assert "classifier.weight" in trainable and "bert.encoder.layer.1.output.dense.weight" in trainable
    assert not any(n.startswith(("bert.embeddings", "bert.encoder.layer.0", "bert.pooler")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    ids = torch.randint(0, 40, (2, 6))
    model(ids, labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name
    with pytest.raises(ValueError, match="'clasifier' names no parameter"):
        freeze_all_but(model, ["clasifier"])


def test_linear_probe_with_a_new_head():
    model = tiny()
    params = linear_probe(model, "classifier", out_features=5)
    assert model.classifier.out_features == 5 and model.config.num_labels == 5
    assert [p.shape for p in params] == [torch.Size([5, 16]), torch.Size([5])]
    assert model(torch.randint(0, 40, (2, 6))).logits.shape == (2, 5)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        new_head(model, "bert.embeddings", 4)
