"""fastlm.attention: Triton kernels (interpreted on the CPU) against the fp64 reference."""

import math

import pytest
import torch

from fastlm.ops.attention import (
    RelativePositionBias,
    attention,
    attention_reference,
    dropout_keep_mask,
    relative_position_bucket,
)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def _assert_close(name, out, ref64, ref_same, factor):
    """FlashAttention's rule: error vs fp64 at most factor x the same-dtype PyTorch error, plus a floor."""
    assert not torch.isnan(out).any(), f"{name}: NaN"
    err = (out.double() - ref64).abs().max().item()
    base = (ref_same.double() - ref64).abs().max().item()
    floor = 1e-5 if out.dtype == torch.float32 else 1e-3
    assert err <= factor * base + floor, f"{name}: error {err:.3e} > {factor} x {base:.3e} + {floor}"


def _run(B=2, Hq=2, Hkv=2, Lq=17, Lk=17, D=32, dtype=FP16, causal=False, pad=False, bias_shape=None,
         rel_pos=None, dropout_p=0.0, scale=None):
    """Forward and backward of fastlm.attention and of the reference (fp64 and same dtype); compare."""
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    leaves = {"q": q, "k": k, "v": v}
    mask = None
    if pad:
        mask = torch.rand(B, Lk) > 0.3
        mask[0, : Lk // 2] = False
        mask[-1] = False  # a sequence with every key padded out
    if bias_shape is not None:
        leaves["attn_bias"] = torch.randn(bias_shape, dtype=dtype)
    if rel_pos is not None:
        leaves["table"] = torch.randn(32, Hq, dtype=torch.float32)
    do = torch.randn(B, Hq, Lq, D, dtype=dtype)

    def call(fn, dt, **extra):
        xs = {n: t.detach().to(dt if n != "table" or dt == torch.float64 else t.dtype).requires_grad_()
              for n, t in leaves.items()}
        kw = {"causal": causal, "key_padding_mask": mask, "attn_bias": xs.get("attn_bias"), "scale": scale,
              "dropout_p": dropout_p}
        if rel_pos is not None:
            kw["rel_pos"] = RelativePositionBias(xs["table"], bidirectional=rel_pos, max_distance=20)
        out = fn(xs["q"], xs["k"], xs["v"], **kw, **extra)
        grads = torch.autograd.grad(out, list(xs.values()), do.to(dt))
        return out, dict(zip(xs, grads))

    rng = torch.get_rng_state()  # attention draws its dropout seed from it
    out, grads = call(attention, dtype)
    extra = {}
    if dropout_p > 0.0:
        torch.set_rng_state(rng)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        extra["dropout_mask"] = dropout_keep_mask(seed, (B, Hq, Lq, Lk), dropout_p)
    out64, grads64 = call(attention_reference, torch.float64, **extra)
    out_same, grads_same = call(attention_reference, dtype, **extra)
    assert out.shape == (B, Hq, Lq, D) and out.dtype == dtype
    _assert_close("out", out, out64, out_same, 2)
    for name in grads:
        assert grads[name].shape == leaves[name].shape
        _assert_close(f"d{name}", grads[name], grads64[name], grads_same[name], 3)
    return out, grads


FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_bottom_right": {"causal": True, "Lq": 17, "Lk": 40},
    "causal_lq_gt_lk": {"causal": True, "Lq": 40, "Lk": 17},
    "padding": {"pad": True},
    "cross": {"Lq": 9, "Lk": 33},
    "gqa": {"Hq": 4, "Hkv": 2},
    "mqa": {"Hq": 3, "Hkv": 1},
    "bias_full": {"bias_shape": (2, 2, 17, 17)},
    "bias_head": {"bias_shape": (1, 2, 17, 17)},
    "bias_batch_key": {"bias_shape": (2, 1, 1, 17)},
    "bias_2d": {"bias_shape": (17, 17)},
    "rel_pos_encoder": {"rel_pos": True, "Lq": 40, "Lk": 40, "scale": 1.0},
    "rel_pos_decoder": {"rel_pos": False, "causal": True, "Lq": 40, "Lk": 40, "scale": 1.0},
    "dropout": {"dropout_p": 0.25},
    "padding_rel_pos_dropout": {"pad": True, "rel_pos": True, "dropout_p": 0.1, "Lq": 20, "Lk": 33},
    "causal_gqa": {"causal": True, "Hq": 4, "Hkv": 2, "Lq": 33, "Lk": 33},
    "cross_padding": {"pad": True, "Lq": 20, "Lk": 9},
    "everything": {"causal": True, "pad": True, "bias_shape": (1, 4, 1, 33), "rel_pos": False, "dropout_p": 0.2,
                   "Hq": 4, "Hkv": 2, "Lq": 17, "Lk": 33},
}


@pytest.mark.parametrize("dtype", [FP16, BF16, FP32], ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(feature, dtype):
    torch.manual_seed(0)
    _run(dtype=dtype, **FEATURES[feature])


@pytest.mark.parametrize("Lq", [1, 17, 64, 130])
@pytest.mark.parametrize("Lk", [1, 17, 64, 130])
def test_lengths(Lq, Lk):
    torch.manual_seed(Lq * 1000 + Lk)
    _run(B=1, Hq=2, Hkv=1, Lq=Lq, Lk=Lk, D=16, causal=(Lq + Lk) % 2 == 0, pad=Lk > 1)


@pytest.mark.parametrize("D", [16, 24, 40, 64, 80, 96, 128, 256])
def test_head_dims(D):
    torch.manual_seed(D)
    _run(B=1, Hq=2, Hkv=1, Lq=20, Lk=33, D=D, pad=True)


def test_fully_masked_rows_give_zeros():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 5, 16, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, requires_grad=True)
    v = torch.randn(2, 2, 7, 16, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    o, lse = attention(q, k, v, key_padding_mask=mask, return_lse=True)
    o.sum().backward()
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))
    assert torch.equal(v.grad[1], torch.zeros_like(v.grad[1]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_strided_views_of_fused_qkv():
    torch.manual_seed(0)
    B, L, H, D = 2, 19, 3, 32
    qkv = torch.randn(B, L, 3, H, D, dtype=FP16, requires_grad=True)  # (B, L, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D), non-contiguous views
    out = attention(q, k, v, causal=True)
    out.float().square().sum().backward()
    ref = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref.permute(2, 0, 3, 1, 4).unbind(0)
    ref_out = attention_reference(rq, rk, rv, causal=True)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(qkv.grad.double(), ref.grad, atol=2e-2, rtol=2e-2)


def test_return_lse():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 17, 32), torch.randn(2, 2, 30, 32), torch.randn(2, 2, 30, 32)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    assert lse.shape == (2, 2, 17) and lse.dtype == torch.float32
    assert torch.equal(out, attention(q, k, v, causal=True))
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(~torch.ones(17, 30, dtype=torch.bool).tril(30 - 17), float("-inf"))
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_relative_position_bucket_matches_hf_t5():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    relative = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (16, 40)):
            expected = t5.T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
            assert torch.equal(relative_position_bucket(relative, bidirectional, num_buckets, max_distance), expected)


def test_dropout_mask_matches_kernel_and_rate():
    """q = 0 makes the probabilities uniform; v = identity then reads the kernel's keep-mask back."""
    B, H, L, p = 2, 2, 64, 0.3
    q = torch.zeros(B, H, L, L)
    k = torch.randn(B, H, L, L)
    v = torch.eye(L).expand(B, H, L, L)  # (B, H, Lk, D=Lk)
    torch.manual_seed(123)
    out = attention(q, k, v, dropout_p=p)
    kept = out * L * (1 - p) > 0.5  # (B, H, Lq, Lk)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    assert torch.equal(kept, dropout_keep_mask(seed, (B, H, L, L), p))
    n = kept.numel()
    assert abs((1 - kept.float().mean().item()) - p) < 4 * math.sqrt(p * (1 - p) / n)
    torch.manual_seed(123)
    assert torch.equal(attention(q, k, v, dropout_p=p), out)  # a fixed seed reproduces


def test_fp64_runs_on_the_reference():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q))


def test_empty_batch():
    q = torch.randn(0, 2, 5, 16)
    assert attention(q, q, q).shape == (0, 2, 5, 16)


BAD_INPUTS = [
    ("head dims", lambda q, k, v: attention(q, k[..., :8], v[..., :8]), ValueError, "head dims"),
    ("Hq % Hkv", lambda q, k, v: attention(torch.randn(2, 3, 7, 16), k, v), ValueError, "multiple"),
    ("k/v shapes", lambda q, k, v: attention(q, k, v[:, :, :5]), ValueError, "same shape"),
    ("3-D q", lambda q, k, v: attention(q[0], k, v), ValueError, "q must be 4-D"),
    ("mixed dtypes", lambda q, k, v: attention(q, k.half(), v), TypeError, "k dtype"),
    ("mask shape", lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, "key_padding_mask"),
    ("mask dtype", lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 9)), TypeError,
     "key_padding_mask"),
    ("bias shape", lambda q, k, v: attention(q, k, v, attn_bias=torch.zeros(2, 4, 7, 9)), ValueError, "attn_bias"),
    ("table shape", lambda q, k, v: attention(q, k, v, rel_pos=RelativePositionBias(torch.zeros(32, 3))),
     ValueError, "rel_pos.table"),
    ("dropout_p", lambda q, k, v: attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    ("not a tensor", lambda q, k, v: attention(q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case):
    _, fn, exc, words = case
    q, k, v = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    with pytest.raises(exc, match=words):
        fn(q, k, v)


def test_different_devices():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="k is on meta"):
        attention(q, q.to("meta"), q)
