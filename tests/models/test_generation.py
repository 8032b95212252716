"""The decoding helpers: sampling filters against Hugging Face's logits warpers, the KV cache, the loop."""

import pytest
import torch

from fastlm.models.generation import KVCache, decode, filter_logits

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, None), (0.7, None, 0.8), (1.3, 20, 0.5), (1.0, 1, 0.9)])
def test_filter_logits_keeps_what_hf_keeps(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(0)) * 3
    ours = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p is not None:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], theirs[kept])


def test_kv_cache_appends_and_guards_capacity():
    cache = KVCache(capacity=5)
    k, v = cache.append(0, torch.ones(2, 3, 4, 8), torch.zeros(2, 3, 4, 8))
    assert k.shape == (2, 3, 4, 8) and cache.length() == 4
    k, v = cache.append(0, torch.full((2, 3, 1, 8), 2.0), torch.ones(2, 3, 1, 8))
    assert k.shape == (2, 3, 5, 8) and torch.equal(k[:, :, 4], torch.full((2, 3, 8), 2.0))
    with pytest.raises(ValueError, match="6 positions exceed its capacity 5"):
        cache.append(0, k[:, :, :1], v[:, :, :1])


def test_decode_stops_rows_at_eos_and_pads():
    V = 6
    script = iter([[3, 1], [1, 4], [5, 1]])  # row 0 emits EOS (1) at step 1, row 1 at step 0

    def logits_of(tokens):
        return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()

    out = decode(lambda t: logits_of(next(script)), logits_of([2, 1]), max_new_tokens=5, eos_token_id=1, pad_token_id=0)
    assert out.tolist() == [[2, 3, 1], [1, 0, 0]]
