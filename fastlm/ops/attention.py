"""Fused attention for BERT, GPT and T5: scaled dot product with causal masking, key padding, an
additive bias, T5's relative-position bias, dropout and GQA.

The stack, in order: T5's bucketing and the RelativePositionBias holder, the dropout random stream, the
PyTorch reference, the kernel entry points (Triton in fastlm.kernels.attention) registered with
torch.library, the autograd.Function, and the public function. The conventions (causal alignment,
relative positions, the dropout random stream) are stated in the docstring of kernels/attention.py;
``attention_reference`` with ``dropout_keep_mask`` is their executable statement. The softmax runs
in fp32 and its log-sum-exp (fp32) is what forward saves for backward.
"""

import math
import numbers
from dataclasses import dataclass

import torch

from .. import _ext
from ._family import Kernels, OpFamily
from ._library import kernel_op

__all__ = ["RelativePositionBias", "attention", "attention_reference", "dropout_keep_mask", "relative_position_bucket"]


# ----------------------------------------------------------------------------------------------
# T5 relative position bias
# ----------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucket of each relative position (key position minus query position), as in HF T5.

    Half of the buckets (of each direction when bidirectional) hold exact distances, the other half
    log-spaced distances up to max_distance; farther distances share the last bucket. Unidirectional
    (decoder) bucketing maps every positive relative position to bucket 0.
    relative_position: integer tensor of any shape; returns int64 buckets in [0, num_buckets).
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(buckets.dtype) * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(buckets.dtype)
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


@dataclass
class RelativePositionBias:
    """T5's learned relative-position bias, computed inside the attention kernel.

    table: (num_buckets, Hq) float tensor (e.g. ``nn.Embedding(num_buckets, Hq).weight``), differentiable.
    bidirectional: True for T5's encoder, False for its (causal) decoder self-attention.
    max_distance: relative distances at or beyond it share the last bucket (T5: 128).
    """

    table: torch.Tensor
    bidirectional: bool = True
    max_distance: int = 128

    def diagonal_buckets(self, Lq, Lk):
        """Bucket of each diagonal ``j - i + Lq - 1`` of an (Lq, Lk) score matrix: (Lq + Lk - 1,) int64."""
        # query i sits at position i + (Lk - Lq), so j - i + Lq - 1 = t gives j - pos(i) = t - (Lk - 1)
        relative = torch.arange(max(Lq + Lk - 1, 0), device=self.table.device) - (Lk - 1)  # none when Lq = Lk = 0
        return relative_position_bucket(relative, self.bidirectional, self.table.shape[0], self.max_distance)

    def bias(self, Lq, Lk):
        """The materialised (Hq, Lq, Lk) bias, for the reference only."""
        return _table_bias(self.table, self.diagonal_buckets(Lq, Lk), Lq, Lk)


# ----------------------------------------------------------------------------------------------
# Dropout random stream (Philox4x32-10 exactly as triton.language.rand)
# ----------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(a, x):
    """(hi, lo) 32-bit halves of the 64-bit product of the constant a and the uint32 tensor x (int64)."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    t_hi, t_lo = a * x_hi, a * x_lo  # each < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi, lo


def dropout_keep_mask(seed, shape, dropout_p, device=None):
    """Keep-mask (True = kept) of attention dropout for scores of shape (B, Hq, Lq, Lk).

    Bit-exact with the Triton kernels: element (b, h, i, j) is kept iff ``tl.rand(seed, offset) >=
    dropout_p`` with ``offset = ((b * Hq + h) * Lq + i) * Lk + j``. Plain PyTorch int64 arithmetic.
    """
    offset = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    c0, c1 = offset & _MASK32, (offset >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(0xCD9E8D57, c2)
        hi_a, lo_a = _mul32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    u = x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return (u >= dropout_p).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def _default_scale(D):
    """1/sqrt(D), the default scale of q.k; 1.0 for an empty head dim (every score is then 0 anyway)."""
    return 1.0 / math.sqrt(D) if D > 0 else 1.0


def _working_dtype(dtype, upcast):
    """The dtype the reference computes in: fp32 for fp16/bf16 input when `upcast`, else the input's."""
    return torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype


def _table_bias(table, bucket, Lq, Lk):
    """The (Hq, Lq, Lk) bias of a (num_buckets, Hq) table for the (Lq + Lk - 1,) diagonal buckets."""
    device = table.device
    diag = torch.arange(Lk, device=device)[None, :] - torch.arange(Lq, device=device)[:, None]  # (Lq, Lk)
    return table[bucket.long()[diag + Lq - 1]].permute(2, 0, 1)  # (Lq, Lk, Hq) -> (Hq, Lq, Lk)


def _masked_scores(q, k, *, causal, key_padding_mask, attn_bias, rel_bias, scale):
    """Scores (B, Hq, Lq, Lk) in q's dtype: q.k * scale + attn_bias + rel_bias, -inf where a key is hidden
    (causal or key_padding_mask). q (B, Hq, Lq, D), k (B, Hkv, Lk, D); rel_bias (Hq, Lq, Lk) or None."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)  # (B, Hkv, Lk, D) -> (B, Hq, Lk, D)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lk)
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    if rel_bias is not None:
        s = s + rel_bias.to(s.dtype)
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)  # (Lq, Lk)
    if causal:
        visible = visible.tril(Lk - Lq)
    visible = visible.expand(B, 1, Lq, Lk)  # (B, 1, Lq, Lk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return s.masked_fill(~visible, float("-inf"))


def _reference(q, k, v, *, rel_bias, dropout_p, dropout_mask, scale, upcast, return_lse, **masks):
    """attention_reference with the relative-position bias materialised: rel_bias (Hq, Lq, Lk) or None.
    `masks` holds causal, key_padding_mask and attn_bias. Returns o, or (o, lse) with ``return_lse``."""
    dtype = _working_dtype(q.dtype, upcast)
    s = _masked_scores(q.to(dtype), k.to(dtype), rel_bias=rel_bias, scale=scale, **masks)  # (B, Hq, Lq, Lk)
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)  # (B, Hq, Lq, 1): rows that see no key give zeros
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("attention_reference: dropout_p > 0 needs dropout_mask (B, Hq, Lq, Lk) bool")
        p = p.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    Hq = q.shape[1]
    v = v.to(dtype).repeat_interleave(Hq // v.shape[1], dim=1)  # (B, Hkv, Lk, D) -> (B, Hq, Lk, D)
    o = (p @ v).to(q.dtype)  # (B, Hq, Lq, D)
    if not return_lse:
        return o
    return o, s.detach().logsumexp(dim=-1).float()  # (B, Hq, Lq)


def attention_reference(
    q,
    k,
    v,
    *,
    causal=False,
    key_padding_mask=None,
    attn_bias=None,
    rel_pos=None,
    dropout_p=0.0,
    dropout_mask=None,
    scale=None,
    upcast=True,
    return_lse=False,
):
    """Plain PyTorch attention, the oracle (pass fp64 tensors) and the `reference` backend.

    Same arguments and conventions as ``attention``; dropout needs ``dropout_mask`` (B, Hq, Lq, Lk)
    bool, True = kept (see ``dropout_keep_mask``). Materialises the (B, Hq, Lq, Lk) scores. With
    ``upcast`` (the default) fp16/bf16 input is computed in fp32 and the output rounded to q's dtype
    once; ``upcast=False`` runs every step in q's dtype (the same-dtype PyTorch baseline of the tests).
    Returns (B, Hq, Lq, D) in q's dtype, and with ``return_lse`` also the (B, Hq, Lq) fp32 log-sum-exp
    of the scores (no gradient).
    """
    Lq, D = q.shape[2], q.shape[3]
    Lk = k.shape[2]
    return _reference(
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        attn_bias=attn_bias,
        rel_bias=None if rel_pos is None else rel_pos.bias(Lq, Lk),
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
        scale=_default_scale(D) if scale is None else scale,
        upcast=upcast,
        return_lse=return_lse,
    )


# ----------------------------------------------------------------------------------------------
# Kernel entry points
# ----------------------------------------------------------------------------------------------

# The Triton kernels and the CPU C++ kernels (fastlm._C, csrc/cpu/attention.cpp) take every kernel dtype
# and head dims up to 256. The CUDA C++ kernels (fastlm._C / fastlm._C_emu, csrc/cuda/attention*.cu) have
# every feature, on fp16/bf16 q, k, v (tensor cores) and the head dims this build has kernels for
# (csrc/cuda/generate_kernels.py's list less what FASTLM_ATTN_HDIMS left out; none without the extension);
# attn_bias and the rel_pos table may be fp32 too.
CUDA_HEAD_DIMS = tuple(next((m.attention_head_dims() for m in (_ext.C, _ext.C_EMU) if m is not None), ()))
CUDA_LIMITS = Kernels(dtypes=(torch.float16, torch.bfloat16), head_dims=CUDA_HEAD_DIMS)
ATTENTION = OpFamily(
    "attention",
    ("attention",),
    {"triton": Kernels(max_head_dim=256), "cuda": CUDA_LIMITS, "cuda_emu": CUDA_LIMITS,
     "cpu": Kernels(max_head_dim=256)},
)


def _fwd_fake(q, k, v, bias, mask, table, bucket, seed, causal, scale, dropout_p, backend):
    B, Hq, Lq, D = q.shape
    return q.new_empty((B, Hq, Lq, D)), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@kernel_op("attention_fwd", _fwd_fake)
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    table: torch.Tensor | None,
    bucket: torch.Tensor | None,
    seed: torch.Tensor,
    causal: bool,
    scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), any strides; bias (B, Hq, Lq, Lk) (an
    expanded view, zero strides allowed) or None; mask (B, Lk) bool or None; table (num_buckets, Hq) with
    bucket (Lq + Lk - 1,) int32 or None; seed (1,) int64 CPU. Returns o (B, Hq, Lq, D) in q's dtype and
    lse (B, Hq, Lq) fp32."""
    kernels = ATTENTION.module(backend)
    return tuple(kernels.attention_fwd(q, k, v, bias, mask, table, bucket, seed, causal, scale, dropout_p))


def _bwd_fake(
    do, q, k, v, o, lse, bias, mask, table, bucket, seed, causal, scale, dropout_p, need_dbias, need_dtable, backend
):
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty((B, Hq, Lq, Lk) if need_dbias else (0,), dtype=torch.float32),
        q.new_empty(tuple(table.shape) if need_dtable else (0,), dtype=torch.float32),
    )


@kernel_op("attention_bwd", _bwd_fake)
def _attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    table: torch.Tensor | None,
    bucket: torch.Tensor | None,
    seed: torch.Tensor,
    causal: bool,
    scale: float,
    dropout_p: float,
    need_dbias: bool,
    need_dtable: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels. Arguments as the forward, plus do (B, Hq, Lq, D) and forward's o and lse.
    Returns dq, dk, dv (shapes and dtypes of q, k, v); dbias (B, Hq, Lq, Lk) fp32, the gradient of the
    expanded bias, when need_dbias; dtable (num_buckets, Hq) fp32 when need_dtable; empty otherwise."""
    return tuple(
        ATTENTION.module(backend).attention_bwd(
            do, q, k, v, o, lse, bias, mask, table, bucket, seed, causal, scale, dropout_p, need_dbias, need_dtable
        )
    )


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------


def _reduce_to(grad, shape):
    """Sum a (B, Hq, Lq, Lk) gradient over the dims that ``shape`` broadcasts, back to ``shape``."""
    padded = (1,) * (4 - len(shape)) + tuple(shape)
    dims = tuple(d for d in range(4) if padded[d] == 1 and grad.shape[d] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(shape)


def _reference_backward(do, q, k, v, attn_bias, table, mask, bucket, seed, causal, scale, dropout_p, needs):
    """Gradients of (q, k, v, attn_bias, table), None where `needs` says so, by autograd through the fp32
    reference; they carry a graph, so they can be differentiated again (the backward of create_graph=True).
    Arguments as saved by _AttentionFunction.forward; do (B, Hq, Lq, D)."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    keep = dropout_keep_mask(int(seed.item()), (B, Hq, Lq, Lk), dropout_p, q.device) if dropout_p > 0.0 else None
    o = _reference(
        q,
        k,
        v,
        causal=causal,
        key_padding_mask=mask,
        attn_bias=attn_bias,
        rel_bias=None if table is None else _table_bias(table, bucket, Lq, Lk),
        dropout_p=dropout_p,
        dropout_mask=keep,
        scale=scale,
        upcast=True,
        return_lse=False,
    )
    wanted = [t for t, need in zip((q, k, v, attn_bias, table), needs, strict=True) if need]
    grads = iter(torch.autograd.grad(o, wanted, do, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


class _AttentionFunction(torch.autograd.Function):
    """The kernels' forward and backward; a backward asked to build a graph (create_graph=True, as for
    double backward) runs the reference formula instead, so its gradients are differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, table, mask, bucket, seed, causal, scale, dropout_p, backend):
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        bias = None if attn_bias is None else attn_bias.expand(B, Hq, Lq, Lk)  # (B, Hq, Lq, Lk), no copy
        o, lse = _attention_fwd(q, k, v, bias, mask, table, bucket, seed, causal, scale, dropout_p, backend)
        ctx.save_for_backward(q, k, v, o, lse, attn_bias, table, mask, bucket, seed)
        ctx.args = (causal, scale, dropout_p, backend)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, attn_bias, table, mask, bucket, seed = ctx.saved_tensors
        causal, scale, dropout_p, backend = ctx.args
        if torch.is_grad_enabled():  # create_graph=True
            needs = ctx.needs_input_grad[:5]
            grads = _reference_backward(
                do, q, k, v, attn_bias, table, mask, bucket, seed, causal, scale, dropout_p, needs
            )
            return (*grads, None, None, None, None, None, None, None)
        B, Hq, Lq, _ = q.shape
        Lk = k.shape[2]
        bias = None if attn_bias is None else attn_bias.expand(B, Hq, Lq, Lk)  # (B, Hq, Lq, Lk)
        need_dbias = attn_bias is not None and ctx.needs_input_grad[3]
        need_dtable = table is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias, dtable = _attention_bwd(
            do,
            q,
            k,
            v,
            o,
            lse,
            bias,
            mask,
            table,
            bucket,
            seed,
            causal,
            scale,
            dropout_p,
            need_dbias,
            need_dtable,
            backend,
        )
        dbias = _reduce_to(dbias, attn_bias.shape).to(attn_bias.dtype) if need_dbias else None
        dtable = dtable.to(table.dtype) if need_dtable else None
        return dq, dk, dv, dbias, dtable, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _describe(t):
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _validate(q, k, v, key_padding_mask, attn_bias, rel_pos):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, L, D), got {_describe(t)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {_describe(t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"attention: k and v must have the same shape (B, Hkv, Lk, D), got "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[0] != B:
        raise ValueError(
            f"attention: k batch size {k.shape[0]} differs from q batch size {B} "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if k.shape[3] != D:
        raise ValueError(
            f"attention: head dims differ: q has D={D} (shape {tuple(q.shape)}), k and v "
            f"have D={k.shape[3]} (shape {tuple(k.shape)})"
        )
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"attention: q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv} "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"attention: key_padding_mask must be a bool tensor (B, Lk) = ({B}, {Lk}), "
                f"got {_describe(key_padding_mask)}"
            )
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"attention: key_padding_mask must have shape (B, Lk) = ({B}, {Lk}), got "
                f"{tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    full = (B, Hq, Lq, Lk)
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
            raise TypeError(
                f"attention: attn_bias must be a floating-point tensor broadcastable to "
                f"(B, Hq, Lq, Lk) = {full}, got {_describe(attn_bias)}"
            )
        shape = tuple(attn_bias.shape)
        if len(shape) > 4 or any(s not in (1, f) for s, f in zip(shape[::-1], full[::-1], strict=False)):
            raise ValueError(f"attention: attn_bias of shape {shape} is not broadcastable to (B, Hq, Lq, Lk) = {full}")
        if attn_bias.device != q.device:
            raise ValueError(f"attention: attn_bias is on {attn_bias.device} but q is on {q.device}")
    if rel_pos is not None:
        _validate_rel_pos(rel_pos, Hq, q.device)


def _validate_rel_pos(rel_pos, Hq, device, fn="attention"):
    """Check rel_pos for `fn` with Hq query heads on `device`."""
    if not isinstance(rel_pos, RelativePositionBias):
        raise TypeError(f"{fn}: rel_pos must be a fastlm.RelativePositionBias, got {type(rel_pos).__name__}")
    table = rel_pos.table
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != Hq or not table.is_floating_point():
        raise ValueError(
            f"{fn}: rel_pos.table must be a floating-point (num_buckets, Hq={Hq}) tensor, got {_describe(table)}"
        )
    exact = table.shape[0] // (2 if rel_pos.bidirectional else 1) // 2
    if exact < 1 or rel_pos.max_distance <= exact:
        raise ValueError(
            f"{fn}: rel_pos needs num_buckets >= {4 if rel_pos.bidirectional else 2} "
            f"and max_distance > its exact buckets ({exact}), got "
            f"num_buckets={table.shape[0]}, max_distance={rel_pos.max_distance}"
        )
    if table.device != device:
        raise ValueError(f"{fn}: rel_pos.table is on {table.device} but q is on {device}")


def _is_number(value):
    """Whether `value` is a real number (a Python or NumPy one, or a symbolic one under torch.compile)."""
    return isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(value, bool)


def _validate_options(causal, dropout_p, scale, fn="attention"):
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__} {causal!r}")
    if not _is_number(dropout_p):
        raise TypeError(f"{fn}: dropout_p must be a number in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not _is_number(scale):
        raise TypeError(f"{fn}: scale must be a number or None, got {type(scale).__name__} {scale!r}")
    if isinstance(scale, numbers.Real) and not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")


def _autocast_dtype(q):
    """The dtype autocast runs attention in for q's device (fp16/bf16/fp32 input is cast to it, fp64 is
    not, as for torch's scaled_dot_product_attention), or None outside an autocast region."""
    device = q.device.type
    if q.dtype == torch.float64 or not torch.amp.is_autocast_available(device):
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def attention(
    q,
    k,
    v,
    *,
    causal=False,
    key_padding_mask=None,
    attn_bias=None,
    rel_pos=None,
    dropout_p=0.0,
    scale=None,
    return_lse=False,
):
    """Fused scaled-dot-product attention for BERT, GPT and T5.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq a multiple of Hkv (GQA/MQA); float32, float16 or
        bfloat16 (float64 runs on the reference backend); any strides (views of a fused QKV projection
        are used as they are). Returns (B, Hq, Lq, D) in q's dtype, and with ``return_lse`` also the
        (B, Hq, Lq) fp32 log-sum-exp of the scores (natural log, -inf for rows that see no key; it
        carries no gradient). Under torch.autocast, q, k and v (unless fp64) are first cast to the
        autocast dtype, as torch's scaled_dot_product_attention does; attn_bias and the rel_pos table are
        used as they are.
    causal: key j is visible to query i iff j <= i + (Lk - Lq) (bottom-right aligned; top-left when
        Lq == Lk).
    key_padding_mask: (B, Lk) bool, True = attend.
    attn_bias: additive float tensor broadcastable to (B, Hq, Lq, Lk); differentiable, its gradient
        reduced over the broadcast dims. -inf hides a key.
    rel_pos: fastlm.RelativePositionBias, a (num_buckets, Hq) table with T5's bucketing; the query i
        sits at position i + (Lk - Lq). The (Hq, Lq, Lk) bias is never materialised; the table gets
        a gradient.
    dropout_p: dropout on the probabilities, a number in [0, 1) (pass 0.0 at evaluation); the mask comes
        from a seed drawn from torch's default CPU generator, so torch.manual_seed reproduces it
        (``dropout_keep_mask``).
    scale: a finite number multiplying q.k; default 1/sqrt(D) (T5 uses 1.0).

    A query that sees no key (every score -inf: hidden by causal, key_padding_mask or an attn_bias of
    -inf) gets zeros, zero gradients (for attn_bias too) and an LSE of -inf, on every backend, as in
    torch's scaled_dot_product_attention. NaN in any input reaches the output. Gradients taken with
    create_graph=True are computed by the reference formula (fp32), so they can be differentiated again.
    """
    _validate(q, k, v, key_padding_mask, attn_bias, rel_pos)
    _validate_options(causal, dropout_p, scale)
    options = {
        "causal": causal,
        "key_padding_mask": key_padding_mask,
        "attn_bias": attn_bias,
        "rel_pos": rel_pos,
        "dropout_p": float(dropout_p),
        "scale": _default_scale(q.shape[-1]) if scale is None else float(scale),
        "return_lse": return_lse,
    }
    dtype = _autocast_dtype(q)
    if dtype is None:
        return _attention(q, k, v, **options)
    with torch.autocast(q.device.type, enabled=False):
        return _attention(q.to(dtype), k.to(dtype), v.to(dtype), **options)


def _attention(q, k, v, *, causal, key_padding_mask, attn_bias, rel_pos, dropout_p, scale, return_lse):
    """attention on validated arguments (scale a float): pick the backend and run it."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    others = tuple(t.dtype for t in (attn_bias, None if rel_pos is None else rel_pos.table) if t is not None)
    backend = ATTENTION.select("attention", q.device, q.dtype, others, head_dim=D)
    seed = torch.randint(0, 2**62, (1,)) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
    if backend == "reference":
        keep = None
        if dropout_p > 0.0:
            keep = dropout_keep_mask(int(seed.item()), (B, Hq, Lq, Lk), dropout_p, q.device)
        return attention_reference(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=key_padding_mask,
            attn_bias=attn_bias,
            rel_pos=rel_pos,
            dropout_p=dropout_p,
            dropout_mask=keep,
            scale=scale,
            return_lse=return_lse,
        )
    table = bucket = None
    if rel_pos is not None:
        table = rel_pos.table
        bucket = rel_pos.diagonal_buckets(Lq, Lk).to(torch.int32)  # (Lq + Lk - 1,)
    o, lse = _AttentionFunction.apply(
        q, k, v, attn_bias, table, key_padding_mask, bucket, seed, causal, scale, dropout_p, backend
    )
    return (o, lse) if return_lse else o
