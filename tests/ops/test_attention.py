"""fastlm.attention in every backend that has its kernels, against the fp64 reference
(docs/architecture.md, "Numerics and bad input")."""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.ops.attention import (
    CUDA_BACKENDS,
    CUDA_HEAD_DIMS,
    IMPLEMENTED,
    RelativePositionBias,
    attention,
    attention_reference,
    dropout_keep_mask,
    relative_position_bucket,
)
from fastlm.testing import assert_close_to_reference, default_device, poisoned_outputs, randn

FP16, BF16, FP32, I32 = torch.float16, torch.bfloat16, torch.float32, torch.int32
DEVICE = default_device()
# Every attention kernel that runs on DEVICE: triton and cuda on a GPU; triton (interpreted) and cuda_emu
# (the same CUDA C++ sources, emulated) on the CPU.
AVAILABLE = [name for name in IMPLEMENTED if name != "reference" and name in fastlm.available_backends(DEVICE)]
# The CUDA C++ kernels implement a subset (fp16/bf16, the head dims of CUDA_HEAD_DIMS; see _cuda_missing) and
# the emulator runs them slowly: they get the lean covering suite of their own section below.
KERNELS = [name for name in AVAILABLE if name not in CUDA_BACKENDS]  # triton
CUDA_KERNELS = [name for name in AVAILABLE if name in CUDA_BACKENDS]  # cuda on a GPU, cuda_emu on the CPU


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
    base, base_grads = call(attention_reference, dtype, **extra)
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
    D, dtype = (32, FP16) if kernel in CUDA_BACKENDS else (16, FP32)
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
pointers = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "BIAS"}
fp32_pointers = {"LSE", "DELTA", "DBIAS", "DTABLE", "TABLE"}
int_pointers = {"MASK": "*u8", "KV_LEN": "*i32", "BUCKET": "*i32"}
for backward in (False, True):
    q = torch.empty(1, 1, 1, D, dtype=getattr(torch, dtype), device="meta")
    bias = q if "bias" in features else None
    table = q if "relpos" in features else None
    mask = q if "mask" in features else None
    block_m, _, flags = A._flags(q, "causal" in features, bias, mask, table, 0.1 * ("dropout" in features),
                                 backward)
    options = {"num_warps": flags.pop("num_warps"), "num_stages": flags.pop("num_stages")}
    kernels = [A._bwd_dq_kernel, A._bwd_dkdv_kernel] if backward else [A._fwd_kernel]
    for kernel in kernels:
        constexprs = dict(flags)
        if kernel is A._bwd_dkdv_kernel:
            constexprs.update(WRITE_DBIAS=bias is not None, WRITE_DTABLE=table is not None, BLOCK_NB=32)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in pointers:
                signature[name] = "*" + {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
            elif name in fp32_pointers:
                signature[name] = "*fp32"
            elif name in int_pointers:
                signature[name] = int_pointers[name]
            else:
                signature[name] = {"sm_scale": "fp32", "dropout_p": "fp32", "seed": "i64"}.get(name, "i32")
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        print(kernel.__name__, dtype, D, features, "shared", compiled.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype, D, features", [
    ("bfloat16", 64, ["causal", "mask", "dropout"]),
    ("float16", 96, ["bias", "relpos"]),
    ("bfloat16", 128, ["causal"]),
])
def test_kernels_build_for_sm90(dtype, D, features):
    """Every kernel compiles to sm_90 code (Triton's own ptxas, no GPU needed): catches what only a
    GPU build checks (layouts, tl.gather, dot shapes), which the interpreter does not."""
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


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_cuda_dropout_mask_is_the_stream_of_every_backend(kernel):
    """q = 0 makes the probabilities uniform and v = identity reads the keep-mask back: the CUDA kernels
    keep exactly dropout_keep_mask's elements, and the triton backend's, for the same torch seed."""
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
    if "triton" in AVAILABLE:
        assert torch.equal(mask, kept("triton"))


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
    ("fp32", lambda q, k, v: attention(q.float(), k.float(), v.float()), "torch.float32"),
    ("head dim", lambda q, k, v: attention(q[..., :16], k[..., :16], v[..., :16]), "head dim 16"),
]


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("case", CUDA_REFUSED, ids=[c[0] for c in CUDA_REFUSED])
def test_cuda_refuses_what_it_lacks(kernel, case):
    """A forced CUDA backend refuses what its kernels lack with a clear error, never a wrong result."""
    _, fn, words = case
    q, k, v = (torch.randn(2, 2, L, 32, dtype=FP16, device=DEVICE) for L in (7, 9, 9))
    with fastlm.use_backend(kernel), pytest.raises(RuntimeError, match=f"{kernel}.*no attention with {words}"):
        fn(q, k, v)


def _same(q, k, v):
    return q, k, v


GLUE_ERRORS = [
    ("q 3-D", lambda q, k, v: (q[0], k, v), {}, "4-D"),
    ("k/v shapes", lambda q, k, v: (q, k, v[:, :, :5]), {}, "same shape"),
    ("Hq % Hkv", lambda q, k, v: (q, k[:, :1].expand(2, 3, 9, 32), v[:, :1].expand(2, 3, 9, 32)), {}, "multiple"),
    ("dtype", lambda q, k, v: (q.float(), k.float(), v.float()), {}, r"torch.float32 \(CUDA kernels: fp16/bf16\)"),
    ("head dim", lambda q, k, v: (q[..., :16], k[..., :16], v[..., :16]), {},
     rf"head dim 16 \(CUDA kernels: {', '.join(map(str, CUDA_HEAD_DIMS))}\)"),
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


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("case", GLUE_ERRORS, ids=[c[0] for c in GLUE_ERRORS])
def test_cuda_glue_checks_before_launch(kernel, case):
    """The glue's TORCH_CHECKs catch bad input that bypasses the Python validation."""
    from fastlm.ops.attention import _kernels

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
        _kernels(kernel).attention_fwd(*tensors(q, k, v), *args.values())
