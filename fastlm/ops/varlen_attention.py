"""Attention over packed sequences of different lengths ("varlen"): the tokens of B sequences one after the
other, each sequence attending only within itself, with no padding anywhere.

q (Tq, Hq, D) and k, v (Tk, Hkv, D) hold the tokens; ``cu_seqlens_q`` / ``cu_seqlens_k`` (B + 1,) int32
are the prefix sums of the sequences' lengths (sequence b's queries are rows cu_seqlens_q[b] to
cu_seqlens_q[b + 1]; ``fastlm.unpad`` makes them from a padded batch). Every convention is
``fastlm.attention``'s applied to each sequence on its own (kernels/attention.py's docstring states them):
causal alignment and T5's relative positions use the sequence's own lengths. Dropout element (b, h, i, j)
draws Philox offset ((b * Hq + h) * max_seqlen_q + i) * max_seqlen_k + j: the offset of the right-padded
(B, Hq, max_seqlen_q, max_seqlen_k) batch, so the mask is ``dropout_keep_mask`` of that shape.

The stack: the reference (a loop over the sequences, each through ``attention_reference``: the oracle),
the kernel entry points registered with torch.library, the autograd.Function and the public function.
"""

import torch

from ._family import Kernels, OpFamily
from ._library import kernel_op
from .attention import (
    CUDA_LIMITS,
    _autocast_dtype,
    _default_scale,
    _describe,
    _validate_options,
    _validate_rel_pos,
    attention_reference,
    dropout_keep_mask,
)
from .cross_entropy import _host_checks

__all__ = ["varlen_attention", "varlen_attention_reference"]

# The Triton kernels (kernels/varlen_attention.py) and the CPU C++ kernels (csrc/cpu/attention.cpp) take every
# kernel dtype and head dims up to 256; the CUDA C++ kernels (the VARLEN variants of csrc/cuda/attention*.cu)
# take what they take for fastlm.attention.
VARLEN_ATTENTION = OpFamily(
    "varlen_attention", ("varlen_attention",),
    {"triton": Kernels(max_head_dim=256), "cuda": CUDA_LIMITS, "cuda_emu": CUDA_LIMITS,
     "cpu": Kernels(max_head_dim=256)},
)


def varlen_attention_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    causal=False,
    rel_pos=None,
    dropout_p=0.0,
    dropout_mask=None,
    scale=None,
    upcast=True,
    return_lse=False,
):
    """Plain PyTorch varlen attention, the oracle and the `reference` backend: ``attention_reference`` on
    each sequence. Arguments as ``varlen_attention``; dropout needs ``dropout_mask`` (B, Hq, max_seqlen_q,
    max_seqlen_k) bool, True = kept (``dropout_keep_mask``). Reads cu_seqlens on the host. Returns
    (Tq, Hq, D) in q's dtype, and with ``return_lse`` also the (Tq, Hq) fp32 log-sum-exp."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        rows_q, rows_k = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        Lq, Lk = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        # (L, H, D) -> (1, H, L, D): one sequence as a batch of one
        q_b, k_b, v_b = (t[rows].transpose(0, 1)[None] for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
        o, lse = attention_reference(
            q_b,
            k_b,
            v_b,
            causal=causal,
            rel_pos=rel_pos,
            dropout_p=dropout_p,
            dropout_mask=None if dropout_mask is None else dropout_mask[b : b + 1, :, :Lq, :Lk],
            scale=_default_scale(q.shape[-1]) if scale is None else scale,
            upcast=upcast,
            return_lse=True,
        )
        outs.append(o[0].transpose(0, 1))  # (1, Hq, Lq, D) -> (Lq, Hq, D)
        lses.append(lse[0].t())  # (1, Hq, Lq) -> (Lq, Hq)
    o = torch.cat(outs) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return o
    return o, torch.cat(lses) if lses else q.new_zeros(q.shape[:2], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Kernel entry points
# ----------------------------------------------------------------------------------------------


def _fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, table, bucket, seed, causal, scale, dropout_p, backend):
    Tq, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((Hq, Tq), dtype=torch.float32)


@kernel_op("varlen_attention_fwd", _fwd_fake)
def _varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    table: torch.Tensor | None,
    bucket: torch.Tensor | None,
    seed: torch.Tensor,
    causal: bool,
    scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel. q (Tq, Hq, D), k/v (Tk, Hkv, D), any strides; cu_q, cu_k (B + 1,) int32; table
    (num_buckets, Hq) with bucket (max_q + max_k - 1,) int32 (the buckets of relative positions
    1 - max_k .. max_q - 1) or None; seed (1,) int64 CPU. Returns o (Tq, Hq, D) and lse (Hq, Tq) fp32."""
    kernels = VARLEN_ATTENTION.module(backend)
    return tuple(kernels.varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, table, bucket, seed, causal,
                                              scale, dropout_p))


def _bwd_fake(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, table, bucket, seed, causal, scale, dropout_p,
              need_dtable, backend):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(tuple(table.shape) if need_dtable else (0,), dtype=torch.float32),
    )


@kernel_op("varlen_attention_bwd", _bwd_fake)
def _varlen_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    table: torch.Tensor | None,
    bucket: torch.Tensor | None,
    seed: torch.Tensor,
    causal: bool,
    scale: float,
    dropout_p: float,
    need_dtable: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernel. Arguments as the forward, plus do (Tq, Hq, D) and forward's o and lse. Returns dq, dk,
    dv (shapes and dtypes of q, k, v) and dtable (num_buckets, Hq) fp32 when need_dtable, else empty."""
    return tuple(
        VARLEN_ATTENTION.module(backend).varlen_attention_bwd(
            do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, table, bucket, seed, causal, scale, dropout_p, need_dtable
        )
    )


class _VarlenAttentionFunction(torch.autograd.Function):
    """The kernels' forward and backward (first-order gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, table, cu_q, cu_k, max_q, max_k, bucket, seed, causal, scale, dropout_p, backend):
        o, lse = _varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, table, bucket, seed, causal, scale, dropout_p, backend)
        ctx.save_for_backward(q, k, v, o, lse, table, cu_q, cu_k, bucket, seed)
        ctx.args = (max_q, max_k, causal, scale, dropout_p, backend)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, table, cu_q, cu_k, bucket, seed = ctx.saved_tensors
        max_q, max_k, causal, scale, dropout_p, backend = ctx.args
        need_dtable = table is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dtable = _varlen_bwd(
            do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, table, bucket, seed, causal, scale, dropout_p, need_dtable,
            backend,
        )
        dtable = dtable.to(table.dtype) if need_dtable else None
        return dq, dk, dv, dtable, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

FN = "varlen_attention"


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_pos):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"{FN}: {name} must be a floating-point 3-D tensor (T, H, D), got {_describe(t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{FN}: {name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{FN}: {name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(
            f"{FN}: k and v must have the same shape (Tk, Hkv, D), got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"{FN}: head dims differ: q has D={q.shape[2]}, k and v have D={k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{FN}: q heads Hq={q.shape[1]} must be a multiple of k/v heads Hkv={k.shape[1]}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise TypeError(f"{FN}: {name} must be an int32 (B + 1,) tensor of prefix sums, got {_describe(cu)}")
        if cu.device != q.device:
            raise ValueError(f"{FN}: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{FN}: cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got {cu_seqlens_q.numel()} "
            f"and {cu_seqlens_k.numel()}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{FN}: {name} must be a non-negative int, got {value!r}")
    if rel_pos is not None:
        _validate_rel_pos(rel_pos, q.shape[1], q.device, FN)


def _check_lengths(cu, total, max_seqlen, name):
    """On the host (free for CPU tensors): cu starts at 0, never decreases, ends at total, and no sequence is
    longer than max_seqlen."""
    starts = cu.tolist()
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    if starts[0] != 0 or starts[-1] != total or any(n < 0 for n in lengths):
        raise ValueError(
            f"{FN}: {name} must start at 0, never decrease and end at the token count {total}, got {starts}"
        )
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{FN}: a sequence of {max(lengths)} tokens is longer than max_seqlen={max_seqlen} ({name})")


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    causal=False,
    rel_pos=None,
    dropout_p=0.0,
    scale=None,
    return_lse=False,
):
    """Attention over packed sequences: each of the B sequences attends only within itself.

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D) with Hq a multiple of Hkv; fp32, fp16 or bf16 (fp64 runs on the
        reference backend); any strides. cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 prefix sums of the
        sequences' query and key lengths (from ``fastlm.unpad``), on q's device. max_seqlen_q, max_seqlen_k:
        ints at least the longest length (they size the work and fix the dropout offsets).
    causal, rel_pos, dropout_p, scale: as in ``fastlm.attention``, per sequence: key j is visible to query i
        of the same sequence iff j <= i + (Lk_b - Lq_b); T5 positions restart at each sequence.
    Returns (Tq, Hq, D) in q's dtype, and with ``return_lse`` also the (Tq, Hq) fp32 log-sum-exp (-inf for
    queries that see no key). Under torch.autocast, q, k, v are cast as ``fastlm.attention`` casts them.

    Bad cu_seqlens (not starting at 0, decreasing, not ending at T, a length above max_seqlen) are refused on
    CPU tensors; on a GPU checking them would be a host sync, so there they are the caller's contract
    (FASTLM_DEBUG_CHECKS=1 checks them too).
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_pos)
    _validate_options(causal, dropout_p, scale, FN)
    if _host_checks(q.device):
        _check_lengths(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
        _check_lengths(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k")
    options = {
        "causal": causal,
        "rel_pos": rel_pos,
        "dropout_p": float(dropout_p),
        "scale": _default_scale(q.shape[-1]) if scale is None else float(scale),
        "return_lse": return_lse,
    }
    lengths = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dtype = _autocast_dtype(q)
    if dtype is None:
        return _varlen_attention(q, k, v, *lengths, **options)
    with torch.autocast(q.device.type, enabled=False):
        return _varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), *lengths, **options)


def _varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, *, causal, rel_pos, dropout_p, scale, return_lse):
    """varlen_attention on validated arguments (scale a float): pick the backend and run it."""
    B, Hq = cu_q.numel() - 1, q.shape[1]
    others = () if rel_pos is None else (rel_pos.table.dtype,)
    backend = VARLEN_ATTENTION.select(FN, q.device, q.dtype, others, head_dim=q.shape[2])
    seed = torch.randint(0, 2**62, (1,)) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
    if backend == "reference":
        keep = None
        if dropout_p > 0.0:
            keep = dropout_keep_mask(int(seed.item()), (B, Hq, max_q, max_k), dropout_p, q.device)
        return varlen_attention_reference(
            q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, rel_pos=rel_pos, dropout_p=dropout_p,
            dropout_mask=keep, scale=scale, return_lse=return_lse,
        )
    table = bucket = None
    if rel_pos is not None:
        table = rel_pos.table
        bucket = rel_pos.diagonal_buckets(max_q, max_k).to(torch.int32)  # (max_q + max_k - 1,)
    o, lse = _VarlenAttentionFunction.apply(
        q, k, v, table, cu_q, cu_k, max_q, max_k, bucket, seed, causal, scale, dropout_p, backend
    )
    return (o, lse.t()) if return_lse else o  # lse (Hq, Tq) -> (Tq, Hq)
