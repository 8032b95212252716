"""The decoding helpers: sampling filters against Hugging Face's logits warpers, the KV cache, the loop."""

import pytest
import torch

from fastlm.models import GPTConfig, GPTLMHeadModel, T5Config, T5ForConditionalGeneration
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


def tiny_gpt():
    torch.manual_seed(0)
    return GPTLMHeadModel(GPTConfig.preset("gpt2-tiny", vocab_size=29, n_embd=16, n_layer=1, n_positions=8)).eval()


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config.preset("t5-tiny", vocab_size=29, d_model=16, d_kv=4, d_ff=32, num_layers=1)
    return T5ForConditionalGeneration(config).eval()


PROMPT = torch.tensor([[3, 4, 5], [6, 7, 8]])


@pytest.mark.parametrize("make", [tiny_gpt, tiny_t5])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": -1}, r"max_new_tokens must be an int >= 0, got -1"),
        ({"max_new_tokens": 2.5}, r"max_new_tokens must be an int >= 0, got 2.5"),
        ({"do_sample": True, "top_p": 0.0}, r"top_p must be None or in \(0, 1\] \(1 = off\), got 0.0"),
        ({"do_sample": True, "top_p": -0.5}, r"top_p must be None or in \(0, 1\]"),
        ({"do_sample": True, "top_p": 1.5}, r"top_p must be None or in \(0, 1\]"),
        ({"do_sample": True, "top_k": -1}, r"top_k must be None or an int >= 0 \(0 = off\), got -1"),
        ({"do_sample": True, "temperature": 0}, r"temperature must be a number > 0 when sampling, got 0"),
        ({"do_sample": True, "temperature": float("nan")}, r"temperature must be a number > 0 when sampling"),
        ({"eos_token_id": 29}, r"eos_token_id must be None or a token id in \[0, 29\), got 29"),
        ({"eos_token_id": 1, "pad_token_id": -1}, r"pad_token_id must be None or a token id in \[0, 29\), got -1"),
    ],
)
def test_generate_refuses_bad_arguments(make, kwargs, message):
    with pytest.raises(ValueError, match=f"generate: {message}"):
        make().generate(PROMPT, **kwargs)


@pytest.mark.parametrize("make, prefix", [(tiny_gpt, 3), (tiny_t5, 1)])
def test_generate_zero_new_tokens_returns_the_prefix(make, prefix):
    out = make().generate(PROMPT, max_new_tokens=0)
    assert out.shape == (2, prefix) and out.dtype == torch.long


def test_generate_empty_prompts():
    """GPT needs a token to continue (an empty prompt is an error naming the BOS token; an all-padding or
    right-padded row, an error asking for left padding); T5 needs a source of at least one token."""
    with pytest.raises(ValueError, match=r"generate: input_ids must hold at least one token .*bos_token_id=50256"):
        tiny_gpt().generate(PROMPT[:, :0])
    with pytest.raises(ValueError, match=r"attention_mask must be 1 in the last column \(pad prompts on the LEFT\)"):
        tiny_gpt().generate(PROMPT, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask must be 1 in the last column"):  # right padding
        tiny_gpt().generate(PROMPT, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, L\) with L >= 1, got \(2, 0\)"):
        tiny_t5().generate(PROMPT[:, :0])
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, L\) with L >= 1, got \(3,\)"):
        tiny_gpt().generate(PROMPT[0])


def test_gpt_generate_stops_at_the_position_table():
    """n_positions=8: a prompt of 3 tokens leaves room for 6 new ones (the last one is never fed back);
    left padding does not use positions."""
    model = tiny_gpt()
    assert model.generate(PROMPT, max_new_tokens=6).shape == (2, 9)
    with pytest.raises(ValueError, match=r"max_new_tokens=7 after a prompt of 3 tokens runs past the position "):
        model.generate(PROMPT, max_new_tokens=7)
    padded = torch.cat([torch.zeros(2, 2, dtype=torch.long), PROMPT], dim=1)  # (2, 5), two pads on the left
    mask = (padded != 0).long()
    assert torch.equal(model.generate(padded, mask, max_new_tokens=6)[:, 2:], model.generate(PROMPT, max_new_tokens=6))
