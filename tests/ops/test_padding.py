"""fastlm.unpad / fastlm.pad: packing a padded batch's real tokens and scattering them back."""

import pytest
import torch

import fastlm

MASKS = {
    "right": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
    "left-and-holes": [[0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 0]],
    "an-empty-sequence": [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("layout", list(MASKS))
def test_unpad_packs_real_tokens_in_order_and_pad_restores_them(layout, dtype):
    mask = torch.tensor(MASKS[layout]).to(dtype)  # (B, L)
    hidden = torch.randn(3, 5, 2, 4, dtype=torch.float64, requires_grad=True)  # (B, L, H, D)
    packed, indices, cu_seqlens, max_seqlen = fastlm.unpad(hidden, mask)
    lengths = mask.bool().sum(1)
    expected = torch.cat([hidden[b][mask[b].bool()] for b in range(3)])  # batch order, then position
    assert torch.equal(packed, expected)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert max_seqlen == lengths.max().item() and isinstance(max_seqlen, int)
    assert indices.dtype == torch.int64 and torch.equal(hidden.flatten(0, 1)[indices], packed)
    restored = fastlm.pad(packed, indices, 3, 5)
    assert torch.equal(restored, hidden * mask.bool()[..., None, None])
    # both differentiable: a gradient reaches exactly the real tokens
    grad = torch.randn_like(restored)
    (hidden_grad,) = torch.autograd.grad(restored, hidden, grad)
    assert torch.equal(hidden_grad, grad * mask.bool()[..., None, None])
    assert torch.autograd.gradcheck(lambda x: fastlm.pad(x, indices, 3, 5), packed.detach().requires_grad_())


def test_given_max_seqlen_and_empty_batch():
    mask = torch.tensor(MASKS["right"])
    hidden = torch.randn(3, 5, 8)
    assert fastlm.unpad(hidden, mask, max_seqlen=7)[3] == 7
    packed, indices, cu_seqlens, max_seqlen = fastlm.unpad(torch.randn(0, 5, 8), torch.ones(0, 5, dtype=torch.bool))
    assert packed.shape == (0, 8) and cu_seqlens.tolist() == [0] and max_seqlen == 0
    assert fastlm.pad(packed, indices, 0, 5).shape == (0, 5, 8)


BAD = [
    ("float mask", lambda h, m: fastlm.unpad(h, m.float()), TypeError, "bool or integer"),
    ("mask shape", lambda h, m: fastlm.unpad(h, m[:, :4]), ValueError, r"first two dims \(B, L\) = \(3, 5\)"),
    ("mask values", lambda h, m: fastlm.unpad(h, m * 2), ValueError, "0 .padding. and 1 .real token., got the value 2"),
    ("hidden 1-D", lambda h, m: fastlm.unpad(h[0, 0], m), ValueError, r"hidden must be a tensor \(B, L, ...\)"),
    ("max_seqlen", lambda h, m: fastlm.unpad(h, m, max_seqlen=4), ValueError, "max_seqlen=4 is less than the longest"),
    ("indices dtype", lambda h, m: fastlm.pad(h[0], torch.arange(5, dtype=torch.int32), 3, 5), ValueError, "int64"),
    ("batch", lambda h, m: fastlm.pad(h[0], torch.arange(5), -1, 5), ValueError, "batch must be a non-negative int"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, fn, error, words = case
    hidden, mask = torch.randn(3, 5, 8), torch.tensor(MASKS["right"])
    with pytest.raises(error, match=words):
        fn(hidden, mask)
