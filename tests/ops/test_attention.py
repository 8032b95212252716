"""fastlm.attention in every backend that has its kernels, against the fp64 reference
(docs/architecture.md, "Numerics and bad input")."""

import contextlib
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.ops._family import KERNEL_DTYPES
from fastlm.ops.attention import (
    ATTENTION,
    CUDA_HEAD_DIMS,
    RelativePositionBias,
    attention,
    attention_reference,
    dropout_keep_mask,
    relative_position_bucket,
)
from fastlm.testing import LAYOUTS, assert_close_to_reference, default_device, poisoned_outputs, randn, with_layout

FP16, BF16, FP32, I32 = torch.float16, torch.bfloat16, torch.float32, torch.int32
DEVICE = default_device()
# Every attention kernel that runs on DEVICE: triton and cuda on a GPU; triton (interpreted), cpu (the C++
# kernels of csrc/cpu) and cuda_emu (the CUDA C++ sources, emulated) on the CPU.
AVAILABLE = [name for name in ATTENTION.available(DEVICE) if name != "reference"]
# The CUDA C++ kernels implement a subset (fp16/bf16, the head dims of CUDA_HEAD_DIMS; see ATTENTION) and
# the emulator runs them slowly: they get the lean covering suite of their own section below.
KERNELS = [name for name in ATTENTION.available(DEVICE, dtypes=KERNEL_DTYPES) if name != "reference"]  # triton, cpu
CUDA_KERNELS = [name for name in AVAILABLE if name not in KERNELS]  # cuda on a GPU, cuda_emu on the CPU
CPU_KERNELS = [name for name in AVAILABLE if name == "cpu"]


def _run(
    kernel,
    B=2,
    Hq=2,
    Hkv=2,
    Lq=17,
    Lk=17,
    D=32,
    dtype=FP16,
    causal=False,
    pad=False,
    bias_shape=None,
    bias_dtype=None,
    rel_pos=None,
    dropout_p=0.0,
    scale=None,
    backward=True,
):
    """Forward and backward of fastlm.attention on `kernel` and of the reference (fp64 oracle and
    same-dtype baseline, given the kernel's dropout mask); compare the output and every gradient
    (only the output when not `backward`). The bias is in `bias_dtype` (default: dtype), the rel_pos
    table in fp32. Returns the kernel's output and gradients."""
    q = randn(B, Hq, Lq, D, dtype=dtype, device=DEVICE)
    k = randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE)
    v = randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE)
    leaves = {"q": q, "k": k, "v": v}
    mask = None
    if pad == "right":  # BERT-style: whole key tiles after each sequence's end are skipped
        lengths = torch.tensor([Lk // 3, Lk, 1][:B], device=DEVICE)
        mask = torch.arange(Lk, device=DEVICE)[None, :] < lengths[:, None]  # (B, Lk)
    elif pad:
        mask = torch.rand(B, Lk, device=DEVICE) > 0.3
        mask[0, : Lk // 2] = False
        if B > 1:  # a sequence with every key padded out (never the only one: all-zero results prove nothing)
            mask[-1] = False
    if bias_shape is not None:
        leaves["attn_bias"] = randn(*bias_shape, dtype=bias_dtype or dtype, device=DEVICE)
    if rel_pos is not None:
        leaves["table"] = randn(32, Hq, device=DEVICE)
    do = randn(B, Hq, Lq, D, dtype=torch.float64, device=DEVICE)

    def call(fn, dt, **extra):
        xs = {
            n: t.detach().to(t.dtype if n in ("table", "attn_bias") and dt != torch.float64 else dt)
            .requires_grad_(backward)
            for n, t in leaves.items()
        }
        kw = {
            "causal": causal,
            "key_padding_mask": mask,
            "attn_bias": xs.get("attn_bias"),
            "scale": scale,
            "dropout_p": dropout_p,
        }
        if rel_pos is not None:
            kw["rel_pos"] = RelativePositionBias(xs["table"], bidirectional=rel_pos, max_distance=20)
        out = fn(xs["q"], xs["k"], xs["v"], **kw, **extra)
        if not backward:
            return out, {}
        grads = torch.autograd.grad(out, list(xs.values()), do.to(out.dtype))
        return out, dict(zip(xs, grads, strict=True))

    def fused(*args, **kw):
        with fastlm.use_backend(kernel), poisoned_outputs():
            return attention(*args, **kw)

    rng = torch.get_rng_state()  # attention draws its dropout seed from it
    out, grads = call(fused, dtype)
    extra = {}
    if dropout_p > 0.0:
        torch.set_rng_state(rng)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        extra["dropout_mask"] = dropout_keep_mask(seed, (B, Hq, Lq, Lk), dropout_p, DEVICE)
    oracle, oracle_grads = call(attention_reference, torch.float64, **extra)
    base, base_grads = call(attention_reference, dtype, upcast=False, **extra)
    assert out.shape == (B, Hq, Lq, D) and out.dtype == dtype
    assert_close_to_reference(out, oracle, base, factor=2.0, name=f"{kernel} out")
    for name, grad in grads.items():
        assert grad.shape == leaves[name].shape and grad.dtype == leaves[name].dtype
        assert_close_to_reference(grad, oracle_grads[name], base_grads[name], factor=3.0, name=f"{kernel} d{name}")
    return out, grads


FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_bottom_right": {"causal": True, "Lq": 17, "Lk": 40},
    "causal_lq_gt_lk": {"causal": True, "Lq": 40, "Lk": 17},
    "padding": {"pad": True},
    "right_padding": {"pad": "right", "B": 3, "Lq": 40, "Lk": 70},
    "right_padding_causal_gqa": {"pad": "right", "B": 3, "Hq": 4, "Hkv": 2, "Lq": 40, "Lk": 40,
                                 "causal": True},
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
    "everything": {
        "causal": True,
        "pad": True,
        "bias_shape": (1, 4, 1, 33),
        "rel_pos": False,
        "dropout_p": 0.2,
        "Hq": 4,
        "Hkv": 2,
        "Lq": 17,
        "Lk": 33,
    },
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32], ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features(kernel, feature, dtype):
    _run(kernel, dtype=dtype, **FEATURES[feature])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("Lq", [1, 17, 64, 130])
@pytest.mark.parametrize("Lk", [1, 17, 64, 130])
def test_lengths(kernel, Lq, Lk):
    # A single query or key leaves few independent gradient errors (about one per head): with 2 heads the
    # baseline's max error is too noisy a yardstick (under a third of the kernel's in ~1 of 300 runs at
    # Lq=1, Lk=17); with 16 heads the ratio of the two maxima stays under 2 (100 runs).
    Hq = 16 if min(Lq, Lk) == 1 else 2
    _run(kernel, B=1, Hq=Hq, Hkv=Hq // 2, Lq=Lq, Lk=Lk, D=16, causal=(Lq + Lk) % 2 == 0, pad=Lk > 1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("D", [16, 24, 40, 64, 80, 96, 128, 256])
def test_head_dims(kernel, D):
    _run(kernel, B=1, Hq=2, Hkv=1, Lq=20, Lk=33, D=D, pad=True, dtype=BF16 if D in (80, 128) else FP16)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", AVAILABLE)  # triton and cuda: every case is within the CUDA kernels' subset
@pytest.mark.parametrize("case", [
    {"B": 2, "Hq": 12, "Hkv": 12, "Lq": 512, "Lk": 512, "D": 64, "pad": "right"},
    {"B": 2, "Hq": 8, "Hkv": 2, "Lq": 1000, "Lk": 1000, "D": 64, "causal": True, "pad": True, "rel_pos": False,
     "dropout_p": 0.1},
    {"B": 2, "Hq": 4, "Hkv": 4, "Lq": 333, "Lk": 777, "D": 96, "bias_shape": (1, 4, 333, 777)},
    {"B": 1, "Hq": 4, "Hkv": 4, "Lq": 2048, "Lk": 2048, "D": 128, "causal": True},
], ids=["bert", "t5-decoder-gqa", "cross-bias-d96", "long-causal-d128"])
def test_gpu_tiles(kernel, case):
    """Real GPU tiles (64-128 wide, several per row) on BERT/T5/long shapes, in bf16."""
    _run(kernel, dtype=BF16, **case)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows_give_zeros(kernel):
    q = randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    k = randn(2, 2, 7, 16, device=DEVICE, requires_grad=True)
    v = randn(2, 2, 7, 16, device=DEVICE, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    with fastlm.use_backend(kernel), poisoned_outputs():
        o, lse = attention(q, k, v, key_padding_mask=mask, return_lse=True)
        o.sum().backward()
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.equal(grad[1], torch.zeros_like(grad[1])) and torch.isfinite(grad).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's row max of a NaN row
@pytest.mark.parametrize("kernel", KERNELS)
def test_nan_propagates(kernel):
    q, k, v = (randn(2, 2, 20, 16, device=DEVICE) for _ in range(3))
    q[0, 1, 3, 5] = float("nan")  # one query row
    v[1, 0, 7, 2] = float("nan")  # one value: every output of (b=1, h=0) at d=2
    with fastlm.use_backend(kernel):
        out = attention(q, k, v)
    expected = attention_reference(q.double(), k.double(), v.double())
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.isnan(out[0, 1, 3]).all() and torch.isnan(out[1, 0, :, 2]).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_views_of_fused_qkv(kernel):
    """q, k, v as the (B, H, L, D) views of a fused (B, L, 3, H, D) projection: used without copies."""
    B, L, H, D = 2, 19, 3, 32
    qkv = randn(B, L, 3, H, D, dtype=FP16, device=DEVICE)  # (B, L, 3, H, D)
    dout = randn(B, H, L, D, dtype=torch.float64, device=DEVICE)

    def grads(fn, dtype):
        x = qkv.detach().to(dtype).requires_grad_()
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D), non-contiguous views
        out = fn(q, k, v, causal=True)
        out.backward(dout.to(out.dtype))
        return out, x.grad

    def fused(*args, **kw):
        with fastlm.use_backend(kernel), poisoned_outputs():
            return attention(*args, **kw)

    out, dqkv = grads(fused, FP16)
    oracle, oracle_dqkv = grads(attention_reference, torch.float64)
    base, base_dqkv = grads(attention_reference, FP16)
    assert_close_to_reference(out, oracle, base, name="out")
    assert_close_to_reference(dqkv, oracle_dqkv, base_dqkv, factor=3.0, name="dqkv")


@pytest.mark.parametrize("kernel", KERNELS)
def test_return_lse(kernel):
    q, k, v = (randn(2, 2, L, 32, device=DEVICE) for L in (17, 30, 30))
    with fastlm.use_backend(kernel), poisoned_outputs():
        out, lse = attention(q, k, v, causal=True, return_lse=True)
        assert torch.equal(out, attention(q, k, v, causal=True))
    assert lse.shape == (2, 2, 17) and lse.dtype == torch.float32
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)  # (B, H, Lq, Lk)
    s = s.masked_fill(~torch.ones(17, 30, dtype=torch.bool, device=DEVICE).tril(30 - 17), float("-inf"))
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), atol=1e-5, rtol=1e-5)
    with fastlm.use_backend("reference"):
        torch.testing.assert_close(attention(q, k, v, causal=True, return_lse=True)[1], lse)


def test_relative_position_bucket_matches_hf_t5():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    hf_bucket = t5.T5Attention._relative_position_bucket
    relative = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (16, 40)):
            expected = hf_bucket(relative, bidirectional, buckets, max_distance)
            actual = relative_position_bucket(relative, bidirectional, buckets, max_distance)
            assert torch.equal(actual, expected)


@pytest.mark.parametrize("kernel", KERNELS)
def test_dropout_mask_matches_kernel_and_rate(kernel):
    """q = 0 makes the probabilities uniform; v = identity then reads the kernel's keep-mask back."""
    B, H, L, p = 2, 2, 64, 0.3
    q = torch.zeros(B, H, L, L, device=DEVICE)
    k = randn(B, H, L, L, device=DEVICE)
    v = torch.eye(L, device=DEVICE).expand(B, H, L, L)  # (B, H, Lk, D=Lk)
    torch.manual_seed(123)
    with fastlm.use_backend(kernel):
        out = attention(q, k, v, dropout_p=p)
        torch.manual_seed(123)
        assert torch.equal(attention(q, k, v, dropout_p=p), out)  # a fixed seed reproduces the output
    kept = out * L * (1 - p) > 0.5  # (B, H, Lq, Lk)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    assert torch.equal(kept, dropout_keep_mask(seed, (B, H, L, L), p, DEVICE))
    assert abs((1 - kept.float().mean().item()) - p) < 4 * math.sqrt(p * (1 - p) / kept.numel())
    torch.manual_seed(123)
    with fastlm.use_backend("reference"):
        torch.testing.assert_close(attention(q, k, v, dropout_p=p), out)  # every backend, one stream


def test_float64_runs_on_reference_and_refuses_kernels():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q))
    for kernel in KERNELS:
        with fastlm.use_backend(kernel), pytest.raises(RuntimeError, match="no attention on torch.float64"):
            attention(q, q, q)


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_inputs(kernel):
    empty = torch.randn(0, 2, 5, 16, device=DEVICE)
    q = torch.randn(1, 2, 3, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 0, 16, device=DEVICE, requires_grad=True)
    with fastlm.use_backend(kernel):
        assert attention(empty, empty, empty).shape == (0, 2, 5, 16)
        out = attention(q, k, k)  # no keys at all: zeros
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("kernel", AVAILABLE)
def test_custom_ops_pass_opcheck(kernel):
    """The torch.library registration: schema, fake (meta) implementations, autograd and AOT dispatch."""
    ops = importlib.import_module("fastlm.ops.attention")  # the module; fastlm.ops.attention is the function
    D, dtype = (32, FP16) if kernel in CUDA_KERNELS else (16, FP32)
    q = randn(1, 2, 5, D, dtype=dtype, device=DEVICE)
    k, v = randn(1, 1, 7, D, dtype=dtype, device=DEVICE), randn(1, 1, 7, D, dtype=dtype, device=DEVICE)
    mask = torch.tensor([[True] * 5 + [False] * 2], device=DEVICE)
    table = randn(8, 2, device=DEVICE)
    bucket = RelativePositionBias(table, True, 16).diagonal_buckets(5, 7).to(torch.int32)
    bias = randn(1, 2, 1, 7, device=DEVICE).expand(1, 2, 5, 7)
    args = (q, k, v, bias, mask, table, bucket, torch.tensor([123]), True, 0.25, 0.1, kernel)
    torch.library.opcheck(ops._attention_fwd.op, args)
    o, lse = ops._attention_fwd(*args)
    torch.library.opcheck(ops._attention_bwd.op, (torch.randn_like(o), *args[:3], o, lse, *args[3:-1], True, True,
                                                  kernel))


SM90_BUILD = r"""
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlm.kernels import attention as A

dtype, D, features = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ty = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
pointers = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
fp32_pointers = {"LSE", "DELTA", "DBIAS", "DTABLE"}
int_pointers = {"CU_Q", "CU_K"}
scalars = {"sm_scale": "fp32", "dropout_p": "fp32", "seed": "i64"}
strides = ("i32",) * 4
terms = A.ScoreTerms(bias="*" + ty, bias_strides=strides, mask="*u8", mask_strides=("i32", "i32"),
                     kv_len="*i32", table="*fp32", table_strides=("i32", "i32"), bucket="*i32")
for backward in (False, True):
    q = torch.empty(1, 1, 1, D, dtype=getattr(torch, dtype), device="meta")
    bias = q if "bias" in features else None
    table = q if "relpos" in features else None
    mask = q if "mask" in features else None
    opt, options = A._options(q, "causal" in features, bias, mask, table, 0.1 * ("dropout" in features), backward)
    kernels = [A._bwd_dq_kernel, A._bwd_dkdv_kernel] if backward else [A._fwd_kernel]
    for kernel in kernels:
        constexprs = {"OPT": opt, "VARLEN": "varlen" in features}
        if kernel is A._bwd_dkdv_kernel:
            constexprs.update(WRITE_DBIAS=bias is not None, WRITE_DTABLE=table is not None, BLOCK_NB=32)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name == "terms":
                signature[name] = terms
            elif name in pointers:
                signature[name] = "*" + ty
            elif name in fp32_pointers:
                signature[name] = "*fp32"
            elif name in int_pointers:
                signature[name] = "*i32"
            elif name in scalars:
                signature[name] = scalars[name]
            elif name.startswith("s"):  # sq, sk, ...: the (B, H, L, D) strides of a tensor
                signature[name] = strides
            else:
                signature[name] = "i32"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        print(kernel.__name__, dtype, D, features, "shared", compiled.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype, D, features", [
    ("bfloat16", 64, ["causal", "mask", "dropout"]),
    ("float16", 96, ["bias", "relpos"]),
    ("bfloat16", 128, ["causal"]),
    ("float16", 64, ["causal", "relpos", "dropout", "varlen"]),
])
def test_kernels_build_for_sm90(dtype, D, features):
    """Every kernel compiles to sm_90 code (Triton's own ptxas, no GPU needed): catches what only a
    GPU build checks (layouts, tl.gather, dot shapes), which the interpreter does not. "varlen": the kernels
    as kernels/varlen_attention.py launches them (VARLEN, sequences from cu_seqlens)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SM90_BUILD, dtype, str(D), *features],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)


BAD_INPUTS = [
    ("head dims", lambda q, k, v: attention(q, k[..., :8], v[..., :8]), ValueError, "head dims"),
    ("Hq % Hkv", lambda q, k, v: attention(torch.randn(2, 3, 7, 16), k, v), ValueError, "multiple"),
    ("k/v shapes", lambda q, k, v: attention(q, k, v[:, :, :5]), ValueError, "same shape"),
    ("3-D q", lambda q, k, v: attention(q[0], k, v), ValueError, "q must be 4-D"),
    ("mixed dtypes", lambda q, k, v: attention(q, k.half(), v), TypeError, "k dtype"),
    (
        "mask shape",
        lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 5).bool()),
        ValueError,
        "key_padding_mask",
    ),
    (
        "mask dtype",
        lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 9)),
        TypeError,
        "key_padding_mask",
    ),
    ("bias shape", lambda q, k, v: attention(q, k, v, attn_bias=torch.zeros(2, 4, 7, 9)), ValueError, "attn_bias"),
    (
        "table shape",
        lambda q, k, v: attention(q, k, v, rel_pos=RelativePositionBias(torch.zeros(32, 3))),
        ValueError,
        "rel_pos.table",
    ),
    ("dropout_p", lambda q, k, v: attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout_p < 0", lambda q, k, v: attention(q, k, v, dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout_p nan", lambda q, k, v: attention(q, k, v, dropout_p=float("nan")), ValueError, "dropout_p"),
    ("dropout_p str", lambda q, k, v: attention(q, k, v, dropout_p="0.1"), TypeError, "dropout_p must be a number"),
    ("dropout_p bool", lambda q, k, v: attention(q, k, v, dropout_p=True), TypeError, "dropout_p must be a number"),
    ("scale str", lambda q, k, v: attention(q, k, v, scale="abc"), TypeError, "scale must be a number"),
    ("scale tensor", lambda q, k, v: attention(q, k, v, scale=torch.ones(2)), TypeError, "scale must be a number"),
    ("scale inf", lambda q, k, v: attention(q, k, v, scale=float("inf")), ValueError, "scale must be finite"),
    ("causal", lambda q, k, v: attention(q, k, v, causal="yes"), TypeError, "causal must be a bool"),
    (
        "mask uint8",
        lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 9, dtype=torch.uint8)),
        TypeError,
        "key_padding_mask must be a bool",
    ),
    (
        "mask 4-D",
        lambda q, k, v: attention(q, k, v, key_padding_mask=torch.ones(2, 1, 1, 9, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask must have shape \(B, Lk\)",
    ),
    ("bool bias", lambda q, k, v: attention(q, k, v, attn_bias=torch.ones(7, 9).bool()), TypeError, "attn_bias"),
    ("bias 5-D", lambda q, k, v: attention(q, k, v, attn_bias=torch.zeros(1, 2, 2, 7, 9)), ValueError, "attn_bias"),
    ("bias Lk", lambda q, k, v: attention(q, k, v, attn_bias=torch.zeros(7, 8)), ValueError, "attn_bias"),
    ("not a tensor", lambda q, k, v: attention(q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
    ("devices", lambda q, k, v: attention(q, k.to("meta"), v), ValueError, "k is on meta"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case):
    _, fn, exc, words = case
    q, k, v = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    with pytest.raises(exc, match=words):
        fn(q, k, v)


# ----------------------------------------------------------------------------------------------
# CUDA C++ kernels (cuda on a GPU, cuda_emu on the CPU through the emulator): what they implement, at
# small odd sizes, and a clear refusal of what they do not
# ----------------------------------------------------------------------------------------------

CUDA_FEATURES = [
    "plain",
    "causal",
    "causal_bottom_right",
    "causal_lq_gt_lk",
    "padding",
    "right_padding",
    "right_padding_causal_gqa",
    "cross",
    "gqa",
    "mqa",
    "causal_gqa",
    "cross_padding",
    "bias_full",
    "bias_head",
    "bias_batch_key",
    "bias_2d",
    "rel_pos_encoder",
    "rel_pos_decoder",
    "dropout",
    "padding_rel_pos_dropout",
    "everything",
]


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=str)
@pytest.mark.parametrize("feature", CUDA_FEATURES)
def test_cuda_features(kernel, feature, dtype):
    _run(kernel, dtype=dtype, **FEATURES[feature])


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("Lq, Lk", [(1, 1), (1, 130), (130, 1), (17, 64), (65, 17), (97, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_lengths(kernel, Lq, Lk, causal):
    _run(kernel, B=2, Hq=2, Hkv=1, Lq=Lq, Lk=Lk, D=32, causal=causal, pad=Lk > 1)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("D, dtype", [(D, dtype) for D in CUDA_HEAD_DIMS for dtype in (FP16, BF16)], ids=str)
def test_cuda_head_dims(kernel, D, dtype):
    _run(kernel, B=2, Hq=2, Hkv=1, Lq=20, Lk=33, D=D, pad=True, causal=D in (64, 256), scale=0.3, dtype=dtype)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("D, dtype, causal", [(96, BF16, True), (256, FP16, False), (256, BF16, True)], ids=str)
def test_cuda_large_head_dims_several_blocks(kernel, D, dtype, causal):
    """Two query blocks and several key blocks (at D = 256 the dK/dV kernel takes 32 keys per block, two
    warps per 16 keys each holding half of the columns), right padding, a GQA group of 2."""
    _run(kernel, B=2, Hq=2, Hkv=1, Lq=71, Lk=97, D=D, pad="right", causal=causal, dtype=dtype)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_long_gqa_and_deterministic_backward(kernel):
    """Several query and key blocks, a GQA group of 4 summed inside the dK/dV kernel; bit-identical reruns."""
    _run(kernel, B=1, Hq=4, Hkv=1, Lq=130, Lk=130, D=64, dtype=BF16, causal=True, pad="right")
    torch.manual_seed(0)
    q, k, v = (randn(1, H, 130, 64, dtype=BF16, device=DEVICE, requires_grad=True) for H in (4, 1, 1))
    do = randn(1, 4, 130, 64, dtype=BF16, device=DEVICE)
    with fastlm.use_backend(kernel):
        first = torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), do)
        second = torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), do)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_extras_long_and_deterministic_backward(kernel):
    """An fp32 bias broadcast over the batch (on bf16 q), T5 decoder relative positions, dropout and GQA
    over several query blocks and key tiles; every gradient (dbias reduced over the batch, the table's
    summed over slabs and tiles) is bit-identical on a rerun with the same seed. The rerun is unchecked:
    checked mode hands the emulated kernels contiguous copies, unchecked they read the expanded bias
    through its zero batch stride."""
    case = {"B": 2, "Hq": 4, "Hkv": 2, "Lq": 90, "Lk": 130, "D": 32, "dtype": BF16, "causal": True,
            "pad": "right", "bias_shape": (1, 4, 90, 130), "bias_dtype": FP32, "rel_pos": False, "dropout_p": 0.15}
    torch.manual_seed(0)
    out, grads = _run(kernel, **case)
    torch.manual_seed(0)
    with fastlm.emu.checked(False):
        again, grads_again = _run(kernel, **case)
    assert set(grads) == {"q", "k", "v", "attn_bias", "table"}
    assert torch.equal(out, again)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_again[name]), f"d{name} differs between reruns"


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_rel_pos_table_read_through_strides(kernel):
    """A bf16 table (fp16 q) read through the strides of a transposed view gives exactly what its
    contiguous copy gives, output and table gradient."""
    q, k, v = (randn(1, 3, L, 32, dtype=FP16, device=DEVICE) for L in (20, 33, 33))
    weight = randn(3, 16, dtype=BF16, device=DEVICE)  # (Hq, num_buckets)
    do = randn(1, 3, 20, 32, dtype=FP16, device=DEVICE)

    def run(table):
        table = table.detach().requires_grad_()
        with fastlm.use_backend(kernel):
            out = attention(q, k, v, rel_pos=RelativePositionBias(table, bidirectional=True, max_distance=20))
        return out, torch.autograd.grad(out, table, do)[0]

    strided, contiguous = run(weight.t()), run(weight.t().contiguous())  # (num_buckets, Hq), strides (1, 16)
    assert weight.t().stride() == (1, 16)
    assert torch.equal(strided[0], contiguous[0]) and torch.equal(strided[1], contiguous[1])


@pytest.mark.parametrize("kernel", [*CUDA_KERNELS, *CPU_KERNELS])
def test_dropout_mask_is_the_stream_of_every_backend(kernel):
    """q = 0 makes the probabilities uniform and v = identity reads the keep-mask back: the C++ kernels
    keep exactly dropout_keep_mask's elements, and every other backend's, for the same torch seed."""
    B, H, Lq, L, p = 2, 3, 33, 32, 0.3
    q = torch.zeros(B, H, Lq, L, dtype=FP16, device=DEVICE)
    k = randn(B, H, L, L, dtype=FP16, device=DEVICE)
    v = torch.eye(L, dtype=FP16, device=DEVICE).expand(B, H, L, L)  # (B, H, Lk, D=Lk)

    def kept(backend):
        torch.manual_seed(123)
        with fastlm.use_backend(backend):
            return attention(q, k, v, dropout_p=p).float() * L * (1 - p) > 0.5  # (B, H, Lq, Lk)

    mask = kept(kernel)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    assert torch.equal(mask, dropout_keep_mask(seed, (B, H, Lq, L), p, DEVICE))
    assert 0.2 < 1 - mask.float().mean().item() < 0.4
    for other in AVAILABLE:
        assert torch.equal(mask, kept(other)), f"{kernel} and {other} drop different elements"


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_strided_views_and_masked_row_grads(kernel):
    """Gradients through (B, H, L, D) views of a fused QKV projection; rows with no key get zero gradients."""
    qkv = randn(2, 19, 3, 2, 32, dtype=FP16, device=DEVICE, requires_grad=True)  # (B, L, 3, H, D)
    mask = torch.ones(2, 19, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    do = randn(2, 2, 19, 32, dtype=FP16, device=DEVICE)

    def grads(backend, x):
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D), non-contiguous views
        with fastlm.use_backend(backend), poisoned_outputs():
            out = attention(q, k, v, key_padding_mask=mask, causal=True)
        return out, torch.autograd.grad(out, x, do)[0]

    out, dqkv = grads(kernel, qkv)
    oracle, oracle_dqkv = grads("reference", qkv.detach().double().requires_grad_())
    base, base_dqkv = grads("reference", qkv)
    assert_close_to_reference(out, oracle, base, name="out")
    assert_close_to_reference(dqkv, oracle_dqkv, base_dqkv, factor=3.0, name="dqkv")
    assert torch.equal(dqkv[1], torch.zeros_like(dqkv[1]))


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_masked_rows_nan_lse_and_views(kernel):
    """Rows with no key give zeros and lse -inf; NaN propagates; strided QKV views; lse matches."""
    qkv = randn(2, 19, 3, 2, 32, dtype=FP16, device=DEVICE)  # (B, L, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D), non-contiguous views
    mask = torch.ones(2, 19, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    with fastlm.use_backend(kernel), poisoned_outputs():
        o, lse = attention(q, k, v, key_padding_mask=mask, causal=True, return_lse=True)
    with fastlm.use_backend("reference"):
        ref, ref_lse = attention(
            q.double(), k.double(), v.double(), key_padding_mask=mask, causal=True, return_lse=True
        )
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isneginf(lse[1]).all()
    torch.testing.assert_close(o.double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-3, rtol=1e-3)
    v = v.clone()
    v[0, 1, 7, 2] = float("nan")
    with fastlm.use_backend(kernel):
        out = attention(q, k, v)
    assert torch.isnan(out[0, 1, :, 2]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_empty_inputs(kernel):
    with fastlm.use_backend(kernel):
        x = torch.randn(0, 2, 5, 32, dtype=FP16, device=DEVICE)
        assert attention(x, x, x).shape == (0, 2, 5, 32)
        q, k = (torch.randn(1, 2, L, 32, dtype=FP16, device=DEVICE) for L in (3, 0))
        assert torch.equal(attention(q, k, k), torch.zeros(1, 2, 3, 32, dtype=FP16, device=DEVICE))


CUDA_REFUSED = [
    ("fp32", lambda q, k, v: attention(q.float(), k.float(), v.float()), "on torch.float32"),
    ("head dim", lambda q, k, v: attention(q[..., :16], k[..., :16], v[..., :16]), "with head dim 16"),
]


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("case", CUDA_REFUSED, ids=[c[0] for c in CUDA_REFUSED])
def test_cuda_refuses_what_it_lacks(kernel, case):
    """A forced CUDA backend refuses what its kernels lack with a clear error, never a wrong result."""
    _, fn, words = case
    q, k, v = (torch.randn(2, 2, L, 32, dtype=FP16, device=DEVICE) for L in (7, 9, 9))
    with fastlm.use_backend(kernel), pytest.raises(RuntimeError, match=f"{kernel}.*no attention {words}"):
        fn(q, k, v)


def _same(q, k, v):
    return q, k, v


GLUE_ERRORS = [
    ("q 3-D", lambda q, k, v: (q[0], k, v), {}, "4-D"),
    ("k/v shapes", lambda q, k, v: (q, k, v[:, :, :5]), {}, "same shape"),
    ("Hq % Hkv", lambda q, k, v: (q, k[:, :1].expand(2, 3, 9, 32), v[:, :1].expand(2, 3, 9, 32)), {}, "multiple"),
    ("mask", _same, {"mask": torch.ones(2, 5, dtype=torch.bool)}, "key_padding_mask"),
    ("bias shape", _same, {"bias": torch.zeros(2, 2, 7, 8)}, r"attn_bias must be \(B, Hq, Lq, Lk\)"),
    ("bias dtype", _same, {"bias": torch.zeros(2, 2, 7, 9, dtype=torch.float64)}, "attn_bias must be float32"),
    ("table shape", _same, {"table": torch.zeros(8, 3), "bucket": torch.zeros(15, dtype=I32)},
     r"rel_pos table must be \(num_buckets, Hq=2\), got \[8, 3\]"),
    ("bucket length", _same, {"table": torch.zeros(8, 2), "bucket": torch.zeros(14, dtype=I32)},
     r"bucket must be a contiguous int32 \(Lq \+ Lk - 1,\) = \(15,\) tensor, got Int \[14\]"),
    ("bucket range", _same, {"table": torch.zeros(8, 2), "bucket": torch.full((15,), 8, dtype=I32)},
     r"bucket entries must lie in \[0, num_buckets=8\), got \[8, 8\]"),
    ("no bucket", _same, {"table": torch.zeros(8, 2)}, "rel_pos needs both table and bucket"),
    ("dropout_p", _same, {"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)"),
    ("seed", _same, {"dropout_p": 0.1, "seed": torch.zeros(2, dtype=torch.int64)}, r"seed must be a \(1,\) int64 CPU"),
]


# what only one C++ backend's kernels lack, refused by its glue
GLUE_LIMITS = {
    "cuda": [
        ("dtype", lambda q, k, v: (q.float(), k.float(), v.float()), {}, r"torch.float32 \(CUDA kernels: fp16/bf16\)"),
        ("head dim", lambda q, k, v: (q[..., :16], k[..., :16], v[..., :16]), {},
         rf"head dim 16 \(CUDA kernels: {', '.join(map(str, CUDA_HEAD_DIMS))}\)"),
    ],
    "cpu": [
        ("dtype", lambda q, k, v: (q.double(), k.double(), v.double()), {},
         r"torch.float64 \(CPU kernels: fp32/fp16/bf16\)"),
        ("head dim", lambda q, k, v: tuple(t.new_zeros(*t.shape[:3], 264) for t in (q, k, v)), {},
         r"head dim 264 \(CPU kernels: up to 256\)"),
    ],
}
# the C++ kernels, behind the glue, with the cases each must refuse
GLUE_CASES = [
    (kernel, case)
    for kernel in [*CUDA_KERNELS, *(["cpu"] if "cpu" in AVAILABLE else [])]
    for case in [*GLUE_ERRORS, *GLUE_LIMITS["cpu" if kernel == "cpu" else "cuda"]]
]


@pytest.mark.parametrize("kernel, case", GLUE_CASES, ids=[f"{kernel}-{case[0]}" for kernel, case in GLUE_CASES])
def test_glue_checks_before_launch(kernel, case):
    """The glue's TORCH_CHECKs catch bad input that bypasses the Python validation."""
    name, tensors, extra, words = case
    if name == "bucket range" and DEVICE != "cpu":
        pytest.skip("the glue reads bucket entries back only from CPU tensors (on a GPU the kernels clamp them)")
    q, k, v = (torch.randn(2, 2, L, 32, dtype=FP16, device=DEVICE) for L in (7, 9, 9))
    # the bad argument on q's device, so that the check under test fires, not the device check; seed is a CPU
    # tensor on every device
    extra = {key: value.to(DEVICE) if key != "seed" and torch.is_tensor(value) else value
             for key, value in extra.items()}
    args = {
        "bias": None,
        "mask": None,
        "table": None,
        "bucket": None,
        "seed": torch.zeros(1, dtype=torch.int64),
        "causal": False,
        "scale": 1.0,
        "dropout_p": 0.0,
        **extra,
    }
    with pytest.raises(RuntimeError, match=words):
        ATTENTION.module(kernel).attention_fwd(*tensors(q, k, v), *args.values())


# ----------------------------------------------------------------------------------------------
# The CPU C++ kernels: blocks of 64 queries and 64 keys, one backward task per (batch, KV head)
# ----------------------------------------------------------------------------------------------

CPU_BLOCK_CASES = {
    "fp32-bias-relpos-dropout-causal-Lq<Lk": {
        "B": 2, "Hq": 4, "Hkv": 2, "Lq": 130, "Lk": 200, "D": 40, "dtype": FP32, "causal": True, "pad": "right",
        "bias_shape": (1, 4, 130, 200), "rel_pos": True, "dropout_p": 0.15,
    },
    "bf16-relpos-dropout-causal-Lq>Lk": {
        "B": 2, "Hq": 2, "Hkv": 1, "Lq": 150, "Lk": 70, "D": 64, "dtype": BF16, "causal": True, "pad": True,
        "bias_shape": (2, 1, 150, 70), "bias_dtype": FP32, "rel_pos": False, "dropout_p": 0.1,
    },
    # one (batch, KV head) pair for 4 threads: the backward splits its key blocks into chunks
    "fp16-one-kv-head-key-chunks": {
        "B": 1, "Hq": 3, "Hkv": 1, "Lq": 70, "Lk": 250, "D": 24, "dtype": FP16, "causal": True, "pad": "right",
        "bias_shape": (1, 3, 70, 250), "bias_dtype": FP32, "rel_pos": True, "dropout_p": 0.2,
    },
}


@contextlib.contextmanager
def cpu_threads(n):
    """torch's intra-op threads set to n (more than the cores is fine) for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("case", list(CPU_BLOCK_CASES))
def test_cpu_several_blocks_and_deterministic_backward(kernel, case):
    """Several query and key blocks with every feature at once (GQA, padding that cuts key blocks, causal in
    both alignments, queries that see no key, a broadcast bias, rel_pos, dropout, a backward split into key
    chunks), under the rule, on 4 threads; every gradient (dbias reduced over the broadcast dims, the
    table's) is bit-identical on a rerun."""
    with cpu_threads(4):
        torch.manual_seed(0)
        out, grads = _run(kernel, **CPU_BLOCK_CASES[case])
        torch.manual_seed(0)
        again, grads_again = _run(kernel, **CPU_BLOCK_CASES[case])
    assert set(grads) == {"q", "k", "v", "attn_bias", "table"}
    assert torch.equal(out, again)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_again[name]), f"d{name} differs between reruns"


# ----------------------------------------------------------------------------------------------
# Every backend, the reference included, under the rule: argument layouts, rows with no visible key,
# double backward, autocast, precision of the reference, random draws of everything at once
# ----------------------------------------------------------------------------------------------

BACKENDS = [*AVAILABLE, "reference"]


def _dtypes(backend):
    """The input dtypes `backend` takes."""
    return (FP16, BF16) if backend in CUDA_KERNELS else (FP16, BF16, FP32)


def _forward_backward(fn, leaves, do, *, rel_pos=None, create_graph=False, **kw):
    """fn(q, k, v, attn_bias=, rel_pos=, **kw) on `leaves` (dict q, k, v[, attn_bias][, table]) and the
    gradients of every leaf for the upstream gradient `do`. rel_pos: None, or bidirectional (a bool)."""
    if rel_pos is not None:
        rel_pos = RelativePositionBias(leaves["table"], bidirectional=rel_pos, max_distance=20)
    out = fn(leaves["q"], leaves["k"], leaves["v"], attn_bias=leaves.get("attn_bias"), rel_pos=rel_pos, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), do, create_graph=create_graph)
    return out, dict(zip(leaves, grads, strict=True))


def _compare(backend, leaves, do, *, cast=None, **kw):
    """Run fastlm.attention on `backend` with `leaves` (any layouts) and upstream gradient `do`; compare the
    output and every gradient with the fp64 oracle under the rule, the baseline being the reference at the
    input dtype without upcast (given the backend's dropout mask). With `cast`, run under torch.autocast
    in that dtype (the oracle and baseline take q, k, v rounded to it). kw: causal, key_padding_mask,
    rel_pos (bidirectional or None), scale, dropout_p. Returns the backend's output and gradients."""
    autocast = torch.autocast(torch.device(DEVICE).type, dtype=cast) if cast else contextlib.nullcontext()
    rng = torch.get_rng_state()  # attention draws its dropout seed from it
    with fastlm.use_backend(backend), poisoned_outputs(), autocast:
        out, grads = _forward_backward(attention, leaves, do, **kw)
    dtype = cast or leaves["q"].dtype
    if kw.get("dropout_p", 0.0) > 0.0:
        torch.set_rng_state(rng)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        kw["dropout_mask"] = dropout_keep_mask(seed, (*out.shape[:3], leaves["k"].shape[2]), kw["dropout_p"], DEVICE)

    def reference(dt, upcast):
        xs = {n: t.detach().to(dtype if n in ("q", "k", "v") else t.dtype) for n, t in leaves.items()}
        xs = {n: t.to(dt or t.dtype).requires_grad_() for n, t in xs.items()}
        return _forward_backward(attention_reference, xs, do.to(dt or dtype), upcast=upcast, **kw)

    oracle, oracle_grads = reference(torch.float64, True)
    base, base_grads = reference(None, False)
    assert out.dtype == dtype, f"{backend}: output dtype {out.dtype}, expected {dtype}"
    assert_close_to_reference(out, oracle, base, name=f"{backend} out")
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape, f"{backend} d{name}"
        assert_close_to_reference(grad, oracle_grads[name], base_grads[name], factor=3.0, name=f"{backend} d{name}")
    return out, grads


# the dim that the "sliced" and "expanded" layouts act on, per tensor argument
LAYOUT_DIMS = {"q": -1, "k": -1, "v": -1, "attn_bias": -1, "table": 0, "key_padding_mask": -1, "do": -1}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("shift", range(len(LAYOUTS)))
def test_every_argument_in_every_layout(impl, shift):
    """Every tensor argument (the upstream gradient included) read through the strides of each layout:
    argument i takes LAYOUTS[(i + shift) % 4], so over the four shifts each argument meets every layout,
    and within a run neighbouring arguments differ (a kernel reading one's strides for another's fails).
    The emulated CUDA kernels also run unchecked: checked mode hands them compact copies."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 9, 13, 32
    mask = torch.rand(B, Lk, device=DEVICE) > 0.3
    mask[:, 0] = True  # an expanded mask repeats key 0: keep it visible
    tensors = {
        "q": randn(B, Hq, Lq, D, dtype=FP16, device=DEVICE),
        "k": randn(B, Hkv, Lk, D, dtype=FP16, device=DEVICE),
        "v": randn(B, Hkv, Lk, D, dtype=FP16, device=DEVICE),
        "attn_bias": randn(B, Hq, Lq, Lk, dtype=FP16, device=DEVICE),
        "table": randn(16, Hq, device=DEVICE),
        "key_padding_mask": mask,
        "do": randn(B, Hq, Lq, D, dtype=FP16, device=DEVICE),
    }
    laid = {
        name: with_layout(t.requires_grad_(t.is_floating_point() and name != "do"), LAYOUTS[(i + shift) % 4],
                          LAYOUT_DIMS[name])
        for i, (name, t) in enumerate(tensors.items())
    }
    do, mask = laid.pop("do"), laid.pop("key_padding_mask")
    for checked in (True, False) if impl == "cuda_emu" else (True,):
        with fastlm.emu.checked(checked):
            _compare(impl, laid, do, causal=True, key_padding_mask=mask, rel_pos=True)


@pytest.mark.parametrize("impl", BACKENDS)
def test_rows_whose_scores_are_all_minus_inf_give_zeros(impl):
    """A row hidden entirely by an attn_bias of -inf, or by -inf bias and padding together, gets zeros,
    zero gradients (dbias too) and lse -inf on every backend, as SDPA does; partial -inf rows are normal."""
    B, H, Lq, Lk = 2, 2, 5, 7
    bias = randn(B, H, Lq, Lk, dtype=FP16, device=DEVICE)
    bias[0, 1, 1] = float("-inf")  # a whole row
    bias[1, 0, 2, ::2] = float("-inf")  # part of a row
    bias[:, :, 3, :4] = float("-inf")  # with the padding below: rows 3 see no key
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    mask[:, 4:] = False
    leaves = {
        "q": randn(B, H, Lq, 32, dtype=FP16, device=DEVICE, requires_grad=True),
        "k": randn(B, H, Lk, 32, dtype=FP16, device=DEVICE, requires_grad=True),
        "v": randn(B, H, Lk, 32, dtype=FP16, device=DEVICE, requires_grad=True),
        "attn_bias": bias.requires_grad_(),
    }
    do = randn(B, H, Lq, 32, dtype=FP16, device=DEVICE)
    out, grads = _compare(impl, leaves, do, key_padding_mask=mask)
    with fastlm.use_backend(impl):
        _, lse = attention(*(leaves[n] for n in "qkv"), attn_bias=bias, key_padding_mask=mask, return_lse=True)
    empty = torch.zeros(B, H, Lq, dtype=torch.bool, device=DEVICE)
    empty[0, 1, 1] = True
    empty[:, :, 3] = True
    assert torch.equal(torch.isneginf(lse), empty) and not torch.isnan(lse).any()
    assert not out[empty].any() and not grads["q"][empty].any() and not grads["attn_bias"][empty].any()
    assert all(torch.isfinite(g).all() for n, g in grads.items() if n != "attn_bias")


@pytest.mark.parametrize("impl", BACKENDS)
def test_double_backward(impl):
    """Gradients taken with create_graph=True carry a graph on every backend (the kernels' backward then
    runs the reference formula), and differentiating them again matches the fp64 oracle under the rule:
    a gradient penalty through q, k, v, a broadcast attn_bias, the rel_pos table, with padding and dropout."""
    dtype = FP16 if impl in CUDA_KERNELS else FP32
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 7, 11, 32
    leaves = {
        "q": randn(B, Hq, Lq, D, dtype=dtype, device=DEVICE, requires_grad=True),
        "k": randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE, requires_grad=True),
        "v": randn(B, Hkv, Lk, D, dtype=dtype, device=DEVICE, requires_grad=True),
        "attn_bias": randn(1, Hq, 1, Lk, dtype=dtype, device=DEVICE, requires_grad=True),
        "table": randn(16, Hq, device=DEVICE, requires_grad=True),
    }
    mask = torch.rand(B, Lk, device=DEVICE) > 0.2
    do = randn(B, Hq, Lq, D, device=DEVICE)
    weights = {n: randn(*t.shape, device=DEVICE) for n, t in leaves.items()}
    kw = {"causal": True, "key_padding_mask": mask, "rel_pos": False, "dropout_p": 0.2}

    def second(fn, xs, dropout_seed, **extra):
        torch.manual_seed(dropout_seed)
        out, grads = _forward_backward(fn, xs, do.to(xs["q"].dtype), create_graph=True, **kw, **extra)
        assert all(g.requires_grad for g in grads.values()), "create_graph=True gave gradients without a graph"
        penalty = sum((g.double() * weights[n].double()).sum() for n, g in grads.items())
        return torch.autograd.grad(penalty, list(xs.values()), allow_unused=True, materialize_grads=True)

    def fused(*args, **kw):
        with fastlm.use_backend(impl):
            return attention(*args, **kw)

    torch.manual_seed(7)
    keep = dropout_keep_mask(int(torch.randint(0, 2**62, (1,)).item()), (B, Hq, Lq, Lk), 0.2, DEVICE)
    actual = second(fused, leaves, 7)

    def copies(dt):
        return {n: t.detach().to(dt or t.dtype).requires_grad_() for n, t in leaves.items()}

    oracle = second(attention_reference, copies(torch.float64), 7, dropout_mask=keep)
    base = second(attention_reference, copies(None), 7, dropout_mask=keep, upcast=False)
    for name, a, o, b in zip(leaves, actual, oracle, base, strict=True):
        assert_close_to_reference(a, o, b, factor=3.0, name=f"{impl} second derivative of {name}")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("cast", [BF16, FP16], ids=str)
def test_autocast(impl, cast):
    """Under torch.autocast every backend computes in the autocast dtype (fp32 q, k, v cast to it, as
    SDPA does; an fp32 bias and table used as they are) and agrees with the reference backend."""
    leaves = {
        "q": randn(2, 2, 9, 32, device=DEVICE, requires_grad=True),
        "k": randn(2, 1, 12, 32, device=DEVICE, requires_grad=True),
        "v": randn(2, 1, 12, 32, device=DEVICE, requires_grad=True),
        "attn_bias": randn(2, 1, 9, 12, device=DEVICE, requires_grad=True),
        "table": randn(16, 2, device=DEVICE, requires_grad=True),
    }
    do = randn(2, 2, 9, 32, dtype=cast, device=DEVICE)
    mask = torch.rand(2, 12, device=DEVICE) > 0.3
    kw = {"causal": True, "key_padding_mask": mask, "rel_pos": True}
    out, grads = _compare(impl, leaves, do, cast=cast, **kw)
    with fastlm.use_backend("reference"), torch.autocast(torch.device(DEVICE).type, dtype=cast):
        expected, expected_grads = _forward_backward(attention, leaves, do, **kw)
    assert out.dtype == expected.dtype == cast
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "q_shape, kv_shape, causal",
    [((1, 4, 113, 128), (1, 2, 211, 128), False), ((1, 2, 127, 192), (1, 2, 513, 192), True)],
    ids=["gqa-cross", "causal-d192"],
)
def test_reference_backend_fp16_within_rule_of_sdpa(q_shape, kv_shape, causal):
    """The reference backend (the default for CPU tensors) on fp16 is within the rule of torch's own
    fp16 attention (SDPA), output and gradients: it computes in fp32 and rounds once."""
    q = randn(*q_shape, dtype=FP16, device=DEVICE)
    k, v = (randn(*kv_shape, dtype=FP16, device=DEVICE) for _ in range(2))
    do = randn(*q_shape[:3], kv_shape[3], dtype=FP16, device=DEVICE)
    visible = torch.ones(q_shape[2], kv_shape[2], dtype=torch.bool, device=DEVICE).tril(kv_shape[2] - q_shape[2])

    def run(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*xs)
        return [out, *torch.autograd.grad(out, xs, do.to(dtype))]

    def reference(*xs):
        with fastlm.use_backend("reference"):
            return attention(*xs, causal=causal)

    def sdpa(*xs):
        mask = visible if causal else None
        return torch.nn.functional.scaled_dot_product_attention(*xs, attn_mask=mask, enable_gqa=True)

    actual, oracle, base = run(reference, FP16), run(reference, torch.float64), run(sdpa, FP16)
    for name, a, o, b in zip(("out", "dq", "dk", "dv"), actual, oracle, base, strict=True):
        assert_close_to_reference(a, o, b, factor=2.0 if name == "out" else 3.0, name=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_head_dims_over_256_are_refused_by_kernels(kernel):
    q = torch.randn(1, 2, 5, 264, device=DEVICE)
    with fastlm.use_backend(kernel), pytest.raises(RuntimeError) as error:
        attention(q, q, q)
    assert f"'{kernel}'" in str(error.value) and "no attention with head dim 264" in str(error.value)
    assert "up to 256" in str(error.value)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("B, Lq, Lk", [(0, 3, 4), (2, 0, 5), (2, 3, 0)])
def test_empty_batch_or_lengths(impl, B, Lq, Lk):
    """Empty batch, no query or no key: the right shapes, zeros (no key: lse -inf) and zero gradients for
    every argument, bias and table included."""
    q = randn(B, 2, Lq, 32, dtype=FP16, device=DEVICE, requires_grad=True)
    k, v = (randn(B, 1, Lk, 32, dtype=FP16, device=DEVICE, requires_grad=True) for _ in range(2))
    bias = randn(B, 1, Lq, Lk, device=DEVICE, requires_grad=True)
    table = randn(16, 2, device=DEVICE, requires_grad=True)
    mask = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    with fastlm.use_backend(impl), poisoned_outputs():
        out, lse = attention(q, k, v, attn_bias=bias, key_padding_mask=mask, rel_pos=RelativePositionBias(table),
                             return_lse=True)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v, bias, table), materialize_grads=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and torch.isneginf(lse).all()
    assert not out.any()
    for grad, leaf in zip(grads, (q, k, v, bias, table), strict=True):
        assert grad.shape == leaf.shape and not grad.any()


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's row max of a NaN row
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v", "attn_bias", "table", "v_padded_key", "attn_bias_plus_inf"])
def test_nan_and_inf_reach_the_output(impl, where):
    """NaN in any input (a padded key's value included: 0 x NaN is NaN, as in SDPA) and +inf in the bias
    reach the output where the fp64 reference has them, on every backend."""
    q, k, v = (randn(1, 2, L, 32, dtype=FP16, device=DEVICE) for L in (6, 9, 9))
    bias, table = randn(1, 2, 6, 9, dtype=FP16, device=DEVICE), randn(16, 2, device=DEVICE)
    mask = torch.ones(1, 9, dtype=torch.bool, device=DEVICE)
    mask[0, 7:] = False
    poisoned = {  # the tensor and the element set to NaN (or +inf)
        "q": (q, (0, 1, 2, 3)),
        "k": (k, (0, 0, 4, 5)),
        "v": (v, (0, 1, 3, 7)),
        "attn_bias": (bias, (0, 0, 5, 2)),
        "table": (table, (3, 1)),
        "v_padded_key": (v, (0, 0, 8, 1)),
        "attn_bias_plus_inf": (bias, (0, 1, 4, 4)),
    }
    tensor, index = poisoned[where]
    tensor[index] = float("inf") if where.endswith("inf") else float("nan")
    kw = {"attn_bias": bias, "key_padding_mask": mask, "causal": True}
    with fastlm.use_backend(impl):
        out = attention(q, k, v, rel_pos=RelativePositionBias(table, max_distance=20), **kw)
    expected = attention_reference(q.double(), k.double(), v.double(),
                                   rel_pos=RelativePositionBias(table.double(), max_distance=20), **kw)
    assert torch.isnan(expected).any()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))


def _pick(gen, options):
    """One of `options`, drawn with the torch.Generator `gen`."""
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _draw_bias_shape(gen, B, Hq, Lq, Lk):
    """A random shape broadcastable to (B, Hq, Lq, Lk): B, Hq, Lq each kept or 1, leading dims maybe dropped.
    Lk is kept: a bias constant along the keys has an exactly zero gradient (softmax ignores a shift), which
    the kernels' reduction returns as rounding noise that the rule's baseline does not have."""
    shape = [n if _pick(gen, (True, False)) else 1 for n in (B, Hq, Lq)] + [Lk]
    return tuple(shape[_pick(gen, (0, 0, 1, 2)):])


def _draw_case(gen, impl):
    """Random arguments for fastlm.attention on `impl`: odd lengths (Lq != Lk), GQA/MQA, head dims, dtypes,
    layouts, causal, key padding (whole rows too), attn_bias with -inf rows, rel_pos, dropout, scale.
    Dropout only with 16 keys or more: a row that keeps one or two keys has a gradient that cancels exactly
    in the baseline, but not in kernels that take delta = rowsum(do * o) from the rounded output (FlashAttention's
    backward), and the rule would then hold them to zero error. The same cancellation makes bucket 0 of a
    unidirectional table cover whole rows unless causal, so that draws causal. Returns (leaves, do, kw)."""
    dtype = _pick(gen, _dtypes(impl))
    Lq, Lk = (_pick(gen, (1, 2, 5, 16, 17, 33, 40)) for _ in range(2))
    # one or two queries or keys leave few independent errors per head: many heads keep the baseline's max
    # error a steady yardstick (as in test_lengths)
    Hkv = _pick(gen, (1, 2)) * (8 if min(Lq, Lk) <= 2 else 1)
    B, Hq = _pick(gen, (1, 2, 3)), Hkv * _pick(gen, (1, 2, 3))
    D = _pick(gen, (32, 64) if impl in CUDA_KERNELS else (16, 24, 32, 40, 64))

    def tensor(*shape, dt=dtype):  # sliced and expanded along the last dim: expanded keys would all be equal
        return with_layout(randn(*shape, dtype=dt, device=DEVICE, generator=gen, requires_grad=True),
                           _pick(gen, LAYOUTS))

    leaves = {"q": tensor(B, Hq, Lq, D), "k": tensor(B, Hkv, Lk, D), "v": tensor(B, Hkv, Lk, D)}
    kw = {"causal": _pick(gen, (False, True)), "scale": _pick(gen, (None, 1.0, 0.3)),
          "dropout_p": _pick(gen, (0.0, 0.0, 0.0, 0.2)) if Lk >= 16 else 0.0,
          "rel_pos": _pick(gen, (None, None, True, False))}
    kw["causal"] = kw["causal"] or kw["rel_pos"] is False  # T5's unidirectional buckets are its decoder's
    if _pick(gen, (True, False)):
        mask = torch.rand(B, Lk, generator=gen).to(DEVICE) > 0.3
        mask[torch.rand(B, generator=gen).to(DEVICE) < 0.3] = False  # sequences with every key padded
        kw["key_padding_mask"] = mask
    if _pick(gen, (True, False)):
        bias = randn(*_draw_bias_shape(gen, B, Hq, Lq, Lk), dtype=_pick(gen, (dtype, FP32)), device=DEVICE,
                     generator=gen)
        if bias.dim() >= 2 and _pick(gen, (True, False)):
            bias[..., 0, :] = float("-inf")  # rows that see no key
        leaves["attn_bias"] = bias.requires_grad_()
    if kw["rel_pos"] is not None:
        leaves["table"] = tensor(16, Hq, dt=FP32)
    return leaves, tensor(B, Hq, Lq, D), kw


SEED = 16
# a few seconds each on two idle CPU cores
DRAWS = {"triton": 4, "cuda_emu": 12, "cuda": 12, "cpu": 24, "reference": 24}


@pytest.mark.parametrize("impl", BACKENDS)
def test_random_calls_match_the_reference(impl):
    """A seeded loop of random calls (_draw_case), each compared with the fp64 reference under the rule,
    output and every gradient. The failing draw's arguments are in the message."""
    gen = torch.Generator().manual_seed(SEED)
    for draw in range(DRAWS[impl]):
        leaves, do, kw = _draw_case(gen, impl)
        shapes = {n: (tuple(t.shape), t.dtype, t.stride()) for n, t in leaves.items()}
        try:
            _compare(impl, leaves, do.detach(), **kw)
        except AssertionError as error:
            raise AssertionError(f"draw {draw}: {shapes}, {kw}: {error}") from None


@pytest.mark.parametrize(
    "impl",
    [*KERNELS, "reference"],
)
def test_empty_head_dim(impl):
    """D = 0 (as SDPA allows): an empty output, scores 0 + bias, so lse = logsumexp of the bias over the visible
    keys, and zero gradients; the default scale does not divide by zero."""
    q = torch.zeros(1, 2, 3, 0, device=DEVICE, requires_grad=True)
    k = torch.zeros(1, 1, 5, 0, device=DEVICE, requires_grad=True)
    bias = randn(1, 2, 3, 5, device=DEVICE, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True]], device=DEVICE)
    with fastlm.use_backend(impl), poisoned_outputs():
        out, lse = attention(q, k, k, attn_bias=bias, key_padding_mask=mask, return_lse=True)
        (dbias,) = torch.autograd.grad(out.sum(), bias, materialize_grads=True)
    assert out.shape == (1, 2, 3, 0)
    torch.testing.assert_close(lse, bias.detach()[..., mask[0]].logsumexp(-1))
    assert not dbias.any()
