"""fastlm.models GPT-2 against Hugging Face's eager GPT2LMHeadModel (tiny random models, no downloads)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from fastlm.data import document_sequences  # noqa: E402
from fastlm.models import GPTConfig, GPTLMHeadModel, PackedSequences  # noqa: E402
from fastlm.models.gpt import _CONV1D  # noqa: E402

from .helpers import assert_grads_match, assert_matches_hf, hf_pair, on_backend, on_device  # noqa: E402

V, B, L = 67, 3, 10
LENGTHS = (10, 7, 4)


def hf_config(layers=2):
    return transformers.GPT2Config(
        vocab_size=V,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=24,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )


def padded_batch(seed=0, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # right padding
    if left:
        mask = mask.flip(1)
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def from_hf_layout(name, grad):
    """A fastlm gradient in HF's layout: Conv1D weights are (in, out)."""
    return [(name, grad.t() if name.endswith(_CONV1D) else grad)]


def test_lm_matches_hf(backend, device, tmp_path):
    """Logits, loss and every parameter gradient, right padding, on every backend (1 layer)."""
    torch.manual_seed(0)
    hf32, hf64 = hf_pair(transformers.GPT2LMHeadModel(hf_config(layers=1)), device)
    hf32.save_pretrained(tmp_path)
    model = GPTLMHeadModel.from_pretrained(tmp_path).to(device).eval()
    ids, mask, labels = on_device(padded_batch(), device)
    with on_backend(backend):
        logits = model(ids, mask).logits
        loss = model(ids, mask, labels=labels).loss
        loss.backward()
    valid = mask.bool()
    ref32, ref64 = (hf(ids, attention_mask=mask).logits for hf in (hf32, hf64))
    assert_matches_hf(logits[valid], ref64[valid], ref32[valid], "logits")
    losses = []
    for hf in (hf32, hf64):
        ref = hf(ids, attention_mask=mask, labels=labels)
        ref.loss.backward()
        losses.append(ref.loss)
    assert_matches_hf(loss, losses[1], losses[0], "loss")
    assert_grads_match(model, hf32, hf64, rename=from_hf_layout)


def test_left_padding_with_positions_matches_hf():
    torch.manual_seed(1)
    hf32, hf64 = hf_pair(transformers.GPT2LMHeadModel(hf_config()))
    model = GPTLMHeadModel.from_pretrained(hf32).eval()
    ids, mask, _ = padded_batch(1, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, mask, position_ids=positions).logits
    ref32, ref64 = (hf(ids, attention_mask=mask, position_ids=positions).logits for hf in (hf32, hf64))
    valid = mask.bool()
    assert_matches_hf(out[valid], ref64[valid], ref32[valid], "logits")


def test_greedy_generate_equals_hf():
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(hf_config()).eval()
    model = GPTLMHeadModel.from_pretrained(hf).eval()
    ids, mask, _ = padded_batch(2, left=True)
    ours = model.generate(ids, mask, max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert torch.equal(ours, theirs), f"\n{ours}\n{theirs}"


def test_generate_cache_equals_full_forward_and_sampling_options():
    """Each greedy step with the KV cache picks the argmax of a full, uncached forward pass; sampling
    runs, is reproducible from a generator, and top_k=1 is greedy."""
    torch.manual_seed(3)
    model = GPTLMHeadModel(GPTConfig.preset("gpt2-tiny", vocab_size=V, n_positions=32)).eval()
    ids = torch.randint(0, V, (2, 5))
    out = model.generate(ids, max_new_tokens=6)
    for t in range(5, 11):
        assert torch.equal(model(out[:, :t]).logits[:, -1].argmax(-1), out[:, t])
    a = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=True,
        temperature=0.8,
        top_k=10,
        top_p=0.9,
        generator=torch.Generator().manual_seed(0),
    )
    b = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=True,
        temperature=0.8,
        top_k=10,
        top_p=0.9,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(a, b) and a.shape == (2, 11)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1), out)


def test_save_pretrained_round_trips_through_hf(tmp_path):
    torch.manual_seed(4)
    model = GPTLMHeadModel(GPTConfig.preset("gpt2-tiny", vocab_size=V, n_positions=32)).eval()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, _ = padded_batch(4)
    valid = mask.bool()
    torch.testing.assert_close(
        model(ids, mask).logits[valid], hf(ids, attention_mask=mask).logits[valid], rtol=1e-4, atol=1e-4
    )


def test_bad_checkpoints_and_inputs(tmp_path):
    torch.manual_seed(5)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ValueError, match="'bert' model"):
        GPTLMHeadModel.from_pretrained(bert)
    hf = transformers.GPT2LMHeadModel(hf_config(layers=1))
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["transformer.h.0.mlp.c_fc.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.0.mlp.c_fc.bias'\]"):
        GPTLMHeadModel.from_pretrained(tmp_path)
    model = GPTLMHeadModel.from_pretrained(hf)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 67\)"):
        model(torch.tensor([[1, 2, V]]))
    with pytest.raises(ValueError, match="25 positions but the model's position table holds 24"):
        model(torch.ones(1, 25, dtype=torch.long))


def test_packed_documents_attend_only_within_themselves():
    """document_starts (documents packed into blocks): each document's logits equal those of the document run
    alone, from position 0; the loss is the blocks' next-token loss. GPTModel takes the PackedSequences."""
    torch.manual_seed(0)
    model = GPTLMHeadModel(GPTConfig.preset("gpt2-tiny", vocab_size=50, n_embd=32, n_positions=16)).eval()
    starts = torch.zeros(2, 12, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, [5, 9]] = True  # row 0: documents of 5, 4 and 3 tokens; row 1: one of 12
    ids = torch.randint(0, 50, (2, 12))
    logits = model(ids, document_starts=starts).logits  # (2, 12, V)
    for row, lo, hi in ((0, 0, 5), (0, 5, 9), (0, 9, 12), (1, 0, 12)):
        alone = model(ids[row : row + 1, lo:hi]).logits[0]  # (hi - lo, V)
        torch.testing.assert_close(logits[row, lo:hi], alone, rtol=1e-5, atol=1e-5)
    loss = model(ids, labels=ids, document_starts=starts).loss
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    position_ids, cu_seqlens, max_seqlen = document_sequences(starts)
    sequences = PackedSequences(cu_seqlens, max_seqlen)
    h = model.transformer(ids, position_ids=position_ids, sequences=sequences)  # (2, 12, E)
    torch.testing.assert_close(model(ids, document_starts=starts).last_hidden_state, h)
    with pytest.raises(ValueError, match="given with their position_ids"):
        model.transformer(ids, sequences=sequences)
