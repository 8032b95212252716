"""fastlm.nn.MultiHeadAttention against torch.nn.MultiheadAttention and the attention reference."""

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastlm
from fastlm.nn import MultiHeadAttention
from fastlm.ops.attention import ATTENTION, RelativePositionBias, attention_reference
from fastlm.testing import default_device

DEVICE = default_device()
# fp32 modules with gradients and T5 bias: more than the CUDA kernels implement (tests/ops/test_attention.py)
BACKENDS = ATTENTION.available(DEVICE, dtypes=(torch.float32,))


class _TorchMHA(nn.MultiheadAttention):
    """torch's module as the reference, its attention on SDPA's plain fp32 math backend on every device (a
    GPU would otherwise take a fused kernel with its own rounding)."""

    def forward(self, *args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return super().forward(*args, **kwargs)


def _torch_mha(module):
    ref = _TorchMHA(module.embed_dim, module.num_heads, batch_first=True, device=DEVICE)
    ref.load_state_dict(module.state_dict())
    return ref


@pytest.mark.parametrize("kernel", BACKENDS)
def test_self_attention_matches_torch_mha_with_padding(kernel):
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 4).to(DEVICE)
    x = torch.randn(2, 19, 64, device=DEVICE, requires_grad=True)
    mask = torch.ones(2, 19, dtype=torch.bool, device=DEVICE)
    mask[1, 11:] = False
    with fastlm.use_backend(kernel):
        out = mha(x, key_padding_mask=mask)
    ref, _ = _torch_mha(mha)(x, x, x, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_causal_and_cross_attention_match_torch_mha(kernel):
    torch.manual_seed(0)
    x, memory = torch.randn(2, 17, 32, device=DEVICE), torch.randn(2, 23, 32, device=DEVICE)
    causal = MultiHeadAttention(32, 2, causal=True).to(DEVICE)
    future = torch.ones(17, 17, dtype=torch.bool, device=DEVICE).triu(1)
    ref, _ = _torch_mha(causal)(x, x, x, attn_mask=future, need_weights=False)
    with fastlm.use_backend(kernel):
        torch.testing.assert_close(causal(x), ref, atol=1e-5, rtol=1e-5)
    cross = MultiHeadAttention(32, 2).to(DEVICE)
    ref, _ = _torch_mha(cross)(x, memory, memory, need_weights=False)
    with fastlm.use_backend(kernel):
        torch.testing.assert_close(cross(x, memory), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_gqa_and_t5_relative_bias(kernel):
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 4, num_kv_heads=2, bias=False, scale=1.0, rel_pos_buckets=32, rel_pos_max_distance=64)
    mha = mha.to(DEVICE)
    assert mha.in_proj_weight.shape == (64 + 2 * 32, 64)
    x = torch.randn(2, 21, 64, device=DEVICE)
    with fastlm.use_backend(kernel):
        out = mha(x)
        out.sum().backward()
    assert mha.relative_attention_bias.weight.grad.abs().sum() > 0
    w_q, w_k, w_v = mha.in_proj_weight.detach().split([64, 32, 32])
    q = (x @ w_q.T).unflatten(-1, (4, 16)).transpose(1, 2)  # (B, H, L, D)
    k = (x @ w_k.T).unflatten(-1, (2, 16)).transpose(1, 2)  # (B, Hkv, L, D)
    v = (x @ w_v.T).unflatten(-1, (2, 16)).transpose(1, 2)  # (B, Hkv, L, D)
    table = mha.relative_attention_bias.weight.detach()
    rel_pos = RelativePositionBias(table, bidirectional=True, max_distance=64)
    ref = attention_reference(q, k, v, rel_pos=rel_pos, scale=1.0).transpose(1, 2).reshape(2, 21, 64)
    torch.testing.assert_close(out, mha.out_proj(ref), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_torch_compile_fullgraph(kernel):
    """The custom ops' fake implementations let torch.compile trace forward and backward in one graph."""
    torch.manual_seed(0)
    module = fastlm.nn.MultiHeadAttention(32, 2, causal=True, rel_pos_buckets=8, rel_pos_max_distance=16).to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    with fastlm.use_backend(kernel):
        expected = module(x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), module.relative_attention_bias.weight)
        compiled = torch.compile(module, fullgraph=True)
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), module.relative_attention_bias.weight)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_key_keep_mask_is_true_to_attend_and_its_former_name_still_works():
    """key_keep_mask (True = attend) names fastlm's convention; key_padding_mask= keeps working with the same
    meaning (a DeprecationWarning), and passing both, or an unknown keyword, is a TypeError."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 2)
    x = torch.randn(2, 7, 32)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    out = mha(x, key_keep_mask=keep)
    ref, _ = _torch_mha(mha).cpu()(x, x, x, key_padding_mask=~keep, need_weights=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.warns(DeprecationWarning, match="key_padding_mask= is now called key_keep_mask="):
        torch.testing.assert_close(mha(x, key_padding_mask=keep), out)
    with pytest.raises(TypeError, match="key_keep_mask= only"):
        mha(x, key_keep_mask=keep, key_padding_mask=keep)
    with pytest.raises(TypeError, match="unexpected keyword argument.*attn_mask"):
        mha(x, attn_mask=keep)


def test_dropout_p_names_the_rate_and_dropout_still_works():
    """dropout_p, as in fastlm.attention; dropout= (constructor) and .dropout (attribute) keep working."""
    with pytest.warns(DeprecationWarning, match="dropout= is now called dropout_p="):
        old = MultiHeadAttention(32, 2, dropout=0.25)
    assert old.dropout_p == old.dropout == 0.25
    old.dropout = 0.5
    assert old.dropout_p == 0.5
    with pytest.raises(TypeError, match="dropout_p= only"):
        MultiHeadAttention(32, 2, dropout_p=0.1, dropout=0.1)
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 2, dropout_p=0.5)
    x = torch.randn(2, 7, 32)
    expected = mha.eval()(x)
    assert (mha.train()(x) - expected).abs().max() > 1e-2, "training mode applies dropout_p"
    mha.dropout_p = 0.0
    torch.testing.assert_close(mha(x), expected)
