"""fastlm.varlen_attention in every backend that has its kernels, against the fp64 per-sequence reference
(docs/architecture.md, "Numerics and bad input")."""

import pytest
import torch

import fastlm
from fastlm.ops.attention import CUDA_HEAD_DIMS, RelativePositionBias, attention, dropout_keep_mask
from fastlm.ops.varlen_attention import VARLEN_ATTENTION, varlen_attention, varlen_attention_reference
from fastlm.testing import assert_close_to_reference, default_device, randn

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DEVICE = default_device()
KERNELS = [name for name in VARLEN_ATTENTION.available(DEVICE) if name != "reference"]
# The CUDA C++ kernels (cuda on a GPU, cuda_emu on the CPU through the emulator) take fp16 / bf16 and the head
# dims of CUDA_HEAD_DIMS only: the tests hand them such inputs.
CUDA_KERNELS = [name for name in KERNELS if name in ("cuda", "cuda_emu")]


def kernel_inputs(backend, dtype=FP32, D=16):
    """(dtype, head dim) of a test's inputs on `backend`: `dtype` and `D`, or for the CUDA kernels fp16 (bf16
    stays) and the smallest CUDA head dim at least D."""
    if backend not in CUDA_KERNELS:
        return dtype, D
    return (dtype if dtype == BF16 else FP16), min(d for d in CUDA_HEAD_DIMS if d >= D)


def cu(lengths):
    """(B + 1,) int32 prefix sums of `lengths`."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _forward_backward(fn, leaves, do, **kw):
    out = fn(leaves["q"], leaves["k"], leaves["v"], rel_pos=kw.pop("rel_pos", None), **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), do.to(out.dtype))
    return out, dict(zip(leaves, grads, strict=True))


def _run(backend, lengths_q, lengths_k, Hq=4, Hkv=2, D=24, dtype=FP16, causal=False, rel_pos=None, dropout_p=0.0):
    """Forward and backward of varlen_attention on `backend` (on inputs it takes: kernel_inputs) against the
    reference (fp64 oracle and the same-dtype baseline, given the same dropout mask): output and every
    gradient under the rule."""
    dtype, D = kernel_inputs(backend, dtype, D)
    Tq, Tk = sum(lengths_q), sum(lengths_k)
    max_q, max_k = max(lengths_q), max(lengths_k)
    leaves = {"q": randn(Tq, Hq, D, dtype=dtype, device=DEVICE), "k": randn(Tk, Hkv, D, dtype=dtype, device=DEVICE),
              "v": randn(Tk, Hkv, D, dtype=dtype, device=DEVICE)}
    if rel_pos is not None:
        leaves["table"] = randn(32, Hq, device=DEVICE)
    do = randn(Tq, Hq, D, dtype=torch.float64, device=DEVICE)
    lengths = (cu(lengths_q), cu(lengths_k), max_q, max_k)

    def call(fn, dt, **extra):
        xs = {n: t.detach().to(dt or t.dtype).requires_grad_() for n, t in leaves.items()}
        table = xs.pop("table", None)
        kw = {"causal": causal, "dropout_p": dropout_p, **extra}
        if table is not None:
            kw["rel_pos"] = RelativePositionBias(table, bidirectional=rel_pos, max_distance=20)
            xs["table"] = table
        out = fn(xs["q"], xs["k"], xs["v"], *lengths, **kw)
        grads = torch.autograd.grad(out, list(xs.values()), do.to(out.dtype))
        return out, dict(zip(xs, grads, strict=True))

    rng = torch.get_rng_state()  # varlen_attention draws its dropout seed from it
    with fastlm.use_backend(backend):
        out, grads = call(varlen_attention, None)
    extra = {}
    if dropout_p > 0.0:
        torch.set_rng_state(rng)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        extra["dropout_mask"] = dropout_keep_mask(seed, (len(lengths_q), Hq, max_q, max_k), dropout_p, DEVICE)
    oracle, oracle_grads = call(varlen_attention_reference, torch.float64, **extra)
    base, base_grads = call(varlen_attention_reference, None, upcast=False, **extra)
    assert out.dtype == dtype and out.shape == (Tq, Hq, D)
    assert_close_to_reference(out, oracle, base, name=f"{backend} out")
    for name, grad in grads.items():
        assert_close_to_reference(grad, oracle_grads[name], base_grads[name], factor=3.0, name=f"{backend} d{name}")
    return out, grads


CASES = {
    "self": {"lengths_q": [70, 1, 130, 0, 5], "lengths_k": [70, 1, 130, 0, 5]},
    "self-causal-relpos-dropout": {"lengths_q": [65, 3, 90], "lengths_k": [65, 3, 90], "causal": True,
                                   "rel_pos": False, "dropout_p": 0.2},
    "cross-relpos": {"lengths_q": [17, 1, 40], "lengths_k": [80, 9, 0], "rel_pos": True},
    "decode-causal": {"lengths_q": [1, 1, 2], "lengths_k": [33, 70, 5], "causal": True, "dtype": BF16},
    "fp32-mqa": {"lengths_q": [30, 66], "lengths_k": [30, 66], "Hq": 3, "Hkv": 1, "D": 40, "dtype": FP32,
                 "causal": True},
}
# The Triton interpreter is slow: triton runs the longest cases on shorter sequences, still several of its
# 16-row tiles long (with the lengths 0 and 1 kept).
SHORTER = {
    "triton": {
        "self": {"lengths_q": [40, 1, 37, 0, 5], "lengths_k": [40, 1, 37, 0, 5]},
        "self-causal-relpos-dropout": {"lengths_q": [33, 3, 50], "lengths_k": [33, 3, 50]},
        "deterministic": {"lengths_q": [21, 45], "lengths_k": [21, 45]},
    }
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_per_sequence_reference(backend, case):
    """Lengths of 0 and 1, maxima that are no multiple of any block, GQA / MQA, causal in both alignments,
    T5 relative positions per sequence (encoder and decoder bucketing), dropout; every gradient."""
    torch.manual_seed(0)
    _run(backend, **{**CASES[case], **SHORTER.get(backend, {}).get(case, {})})


@pytest.mark.parametrize("kernel", KERNELS)
def test_equals_padded_attention_dropout_included(kernel):
    """The same seed gives padded attention's dropout mask: varlen on the packed tokens equals
    fastlm.attention on the right-padded batch, at the real rows."""
    lengths = [37, 64, 5]
    dtype, D = kernel_inputs(kernel)
    B, H, L = len(lengths), 2, max(lengths)
    q, k, v = (randn(B, H, L, D, dtype=dtype, device=DEVICE) for _ in range(3))
    keep = torch.arange(L, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]  # (B, L)
    with fastlm.use_backend(kernel):
        torch.manual_seed(7)
        padded = attention(q, k, v, key_padding_mask=keep, dropout_p=0.3)  # (B, H, L, D)
        # (B, H, L, D) -> (B, L, H, D) -> (T, H, D)
        (q_p, _, cu_seqlens, max_seqlen), (k_p, *_), (v_p, *_) = (fastlm.unpad(t.transpose(1, 2), keep)
                                                                  for t in (q, k, v))
        torch.manual_seed(7)
        out = varlen_attention(q_p, k_p, v_p, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.3)
    expected = padded.transpose(1, 2)[keep]  # (B, H, L, D) -> (B, L, H, D) -> (T, H, D)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_deterministic_backward(kernel):
    case = {"lengths_q": [70, 130], "lengths_k": [70, 130], "dtype": BF16, "causal": True, "rel_pos": True,
            "dropout_p": 0.1, **SHORTER.get(kernel, {}).get("deterministic", {})}
    torch.manual_seed(0)
    first = _run(kernel, **case)
    torch.manual_seed(0)
    second = _run(kernel, **case)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][n], second[1][n]) for n in first[1])


def _call(q=None, cu_q=None, max_q=5, **kw):
    q = torch.randn(9, 2, 16) if q is None else q
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32) if cu_q is None else cu_q
    return varlen_attention(q, q, q, cu_q, cu_q, max_q, max_q, **kw)


BAD = [
    ("q 4-D", lambda: _call(q=torch.randn(1, 9, 2, 16)), ValueError, r"q must be a floating-point 3-D tensor"),
    ("cu dtype", lambda: _call(cu_q=torch.tensor([0, 4, 9])), TypeError, "cu_seqlens_q must be an int32"),
    ("cu start", lambda: _call(cu_q=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError, "must start at 0"),
    ("cu decreasing", lambda: _call(cu_q=torch.tensor([0, 6, 4, 9], dtype=torch.int32)), ValueError, "never decrease"),
    ("cu end", lambda: _call(cu_q=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "end at the token count 9"),
    ("max_seqlen", lambda: _call(max_q=4), ValueError, "a sequence of 5 tokens is longer than max_seqlen=4"),
    ("max_seqlen type", lambda: _call(max_q=4.0), ValueError, "max_seqlen_q must be a non-negative int"),
    ("dropout", lambda: _call(dropout_p=1.0), ValueError, r"varlen_attention: dropout_p must be in \[0, 1\)"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, fn, error, words = case
    with pytest.raises(error, match=words):
        fn()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "cu_q, max_q, words",
    [
        ([1, 4, 9], 5, "must start at 0 and end at the token count 9"),
        ([0, 6, 4, 9], 6, "gives sequence 1 a length of -2"),
        ([0, 4, 9], 4, r"gives sequence 1 a length of 5 \(it must lie in \[0, max_seqlen=4\]\)"),
    ],
)
def test_glue_checks_before_reading(kernel, cu_q, max_q, words):
    """Direct calls of the kernel entry point: bad prefix sums are refused before any row is read."""
    dtype, D = kernel_inputs(kernel)
    q = torch.randn(9, 2, D).to(dtype)
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    seed = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=words):
        VARLEN_ATTENTION.module(kernel).varlen_attention_fwd(q, q, q, cu_q, cu_k, max_q, 5, None, None, seed, False,
                                                             0.25, 0.0)


def test_any_strides(backend):
    """q, k, v as views whose head dim is not unit-stride (a (T, D, H) storage transposed), and a sliced
    do: the same output and gradients as contiguous copies."""
    dtype, D = kernel_inputs(backend)
    lengths = cu([9, 4, 13])
    # (T, D, H) storage -> (T, H, D) views
    leaves = [randn(26, D, 2, dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3)]
    do = randn(26, 2, 2 * D, dtype=dtype, device=DEVICE)[..., ::2]  # (T, H, D), stride 2 along D
    with fastlm.use_backend(backend):
        out = varlen_attention(*leaves, lengths, lengths, 13, 13, causal=True)
        grads = torch.autograd.grad(out, leaves, do)
        copies = [t.detach().contiguous().requires_grad_() for t in leaves]
        expected = varlen_attention(*copies, lengths, lengths, 13, 13, causal=True)
        expected_grads = torch.autograd.grad(expected, copies, do.contiguous())
    torch.testing.assert_close(out, expected)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("D", CUDA_HEAD_DIMS)
def test_cuda_head_dims(kernel, D):
    """Every head dim of the CUDA kernels (their tiles and dK/dV column split differ), over several query and
    key blocks, with causal and T5 relative positions at the larger dims."""
    torch.manual_seed(D)
    _run(kernel, [71, 1, 0, 40], [71, 1, 0, 40], Hq=2, Hkv=1, D=D, dtype=BF16 if D in (96, 256) else FP16,
         causal=D >= 128, rel_pos=False if D >= 96 else None)
