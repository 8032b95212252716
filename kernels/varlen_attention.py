"""Triton kernels for attention over packed sequences ("varlen") and their launchers.

The tokens of B sequences lie one after the other: q (Tq, Hq, D), k and v (Tk, Hkv, D), sequence b's
rows are cu_seqlens[b] to cu_seqlens[b + 1]. The kernels are those of kernels/attention.py with VARLEN: each
program reads its sequence's first rows and lengths (Lq, Lk) from cu_seqlens (``_sequence``) and uses them for
the bounds, the causal alignment and the relative positions. The grids are those of the longest sequence
times B: one program per (max_seqlen_q tile, B * Hq) for the forward and dQ, per (max_seqlen_k tile,
B * Hkv) for dK/dV; programs past their sequence's length return at once. Two conventions differ from padded attention:

* The bucket array is shared by every sequence: ``bucket`` (max_q + max_k - 1,) int32 holds the buckets
  of the relative positions 1 - max_k .. max_q - 1, so sequence b reads diagonal ``j - i + Lq - 1`` at
  index ``(j - i + Lq - 1) + (max_k - Lk)`` (each program moves the pointer by ``max_k - Lk``).
* Dropout offsets are those of the right-padded (B, Hq, max_q, max_k) batch:
  ``((b * Hq + h) * max_q + i) * max_k + j``.

The LSE (and the backward's Delta) are (Hq, Tq) fp32. Every sum has a fixed order (the table gradient as
one partial per dK/dV program and query head, reduced on the host): the kernels are deterministic.
"""

import torch
import triton

from ..backends import empty
from .attention import (
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _bwd_preprocess_kernel,
    _fwd_kernel,
    _options,
    _score_terms,
    _seed,
)
from .launch import on_device


def _packed_strides(t):
    """The strides of packed t (T, H, D) as the (B, H, L, D) strides of attention's kernels: batch 0 (each
    program moves to its sequence's first row itself), head, row, head dim."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


def _check_cu_seqlens(op, cu, rows, longest, name):
    """On the host (CPU tensors, the interpreter): cu starts at 0, ends at `rows` and gives every sequence a
    length in [0, longest], checked before any row is read (the message of the C++ kernels' glue)."""
    starts = cu.tolist()
    if starts[0] != 0 or starts[-1] != rows:
        raise RuntimeError(
            f"{op}: {name} must start at 0 and end at the token count {rows}, got {starts[0]} and {starts[-1]}"
        )
    for b, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        if not 0 <= end - start <= longest:
            raise RuntimeError(
                f"{op}: {name} gives sequence {b} a length of {end - start} (it must lie in [0, max_seqlen={longest}])"
            )


def _checked_cu(op, q, k, cu_q, cu_k, max_q, max_k):
    """cu_q, cu_k contiguous, checked on the host where that is free (CPU tensors)."""
    if q.device.type == "cpu":
        _check_cu_seqlens(op, cu_q, q.shape[0], max_q, "cu_seqlens_q")
        _check_cu_seqlens(op, cu_k, k.shape[0], max_k, "cu_seqlens_k")
    return cu_q.contiguous(), cu_k.contiguous()


def varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, table, bucket, seed,
                         causal, scale, dropout_p):
    """Launch the forward kernel.

    q (Tq, Hq, D), k/v (Tk, Hkv, D) any strides; cu_seqlens_q, cu_seqlens_k (B + 1,) int32; table
    (num_buckets, Hq) with bucket (max_seqlen_q + max_seqlen_k - 1,) int32, or None; seed (1,) int64.
    Returns o (Tq, Hq, D) in q's dtype and lse (Hq, Tq) fp32 (natural log, -inf for rows that see no key).
    """
    cu_q, cu_k = _checked_cu("varlen_attention_fwd", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_q.numel() - 1
    o = empty((Tq, Hq, D), dtype=q.dtype, device=q.device)  # (Tq, Hq, D)
    lse = empty((Hq, Tq), dtype=torch.float32, device=q.device)  # (Hq, Tq)
    if lse.numel() == 0 or k.shape[0] == 0:  # no query, or no key at all: zeros
        return o.zero_(), lse.fill_(float("-inf"))
    opt, launch = _options(q, causal, None, None, table, dropout_p, backward=False)
    terms = _score_terms(q, None, None, table, bucket)
    with on_device(q):
        _fwd_kernel[(triton.cdiv(max_seqlen_q, opt.BLOCK_M), B * Hq)](
            q, k, v, o, lse, cu_q, cu_k, *map(_packed_strides, (q, k, v, o)), terms,
            Hq, max_seqlen_q, max_seqlen_k, Tq, Hq // Hkv, scale, dropout_p, _seed(seed, dropout_p), OPT=opt,
            VARLEN=True, **launch,
        )
    return o, lse


def _delta(o, do, opt):
    """Delta = rowsum(dO * O), (Hq, Tq) fp32: attention's preprocess kernel on the packed rows seen as one
    (1, Hq, Tq, D) sequence."""
    Tq, Hq, _ = o.shape
    delta = empty((Hq, Tq), dtype=torch.float32, device=o.device)  # (Hq, Tq)
    _bwd_preprocess_kernel[(triton.cdiv(Tq, opt.BLOCK_M), Hq)](
        o, do, delta, _packed_strides(o), _packed_strides(do), Hq, Tq, OPT=opt,
    )
    return delta


def varlen_attention_bwd(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, table, bucket,
                         seed, causal, scale, dropout_p, need_dtable):
    """Launch the backward kernels.

    Arguments as varlen_attention_fwd, plus do (Tq, Hq, D) and forward's o and lse (Hq, Tq). Returns dq, dk,
    dv (shapes and dtypes of q, k, v) and dtable (num_buckets, Hq) fp32 when need_dtable, else an empty
    (0,) tensor.
    """
    cu_q, cu_k = _checked_cu("varlen_attention_bwd", q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[:2]
    B = cu_q.numel() - 1
    dq = empty((Tq, Hq, D), dtype=q.dtype, device=q.device)  # (Tq, Hq, D)
    dk = empty((Tk, Hkv, D), dtype=k.dtype, device=k.device)  # (Tk, Hkv, D)
    dv = empty((Tk, Hkv, D), dtype=v.dtype, device=v.device)  # (Tk, Hkv, D)
    num_buckets = table.shape[0] if need_dtable else 0
    if dq.numel() == 0 or dk.numel() == 0:
        dtable = torch.zeros((num_buckets, Hq) if need_dtable else (0,), dtype=torch.float32, device=q.device)
        return dq.zero_(), dk.zero_(), dv.zero_(), dtable
    opt, launch = _options(q, causal, None, None, table, dropout_p, backward=True)
    terms = _score_terms(q, None, None, table, bucket)
    seed = _seed(seed, dropout_p)
    n_kblocks = triton.cdiv(max_seqlen_k, opt.BLOCK_N)
    # one partial per dK/dV program and query head; programs past their sequence write none: zeros
    dtable = torch.zeros((B, Hq, n_kblocks, num_buckets) if need_dtable else (0,), dtype=torch.float32,
                         device=q.device)  # (B, Hq, nK, NB)
    strides = tuple(map(_packed_strides, (q, k, v, do)))
    lengths = (max_seqlen_q, max_seqlen_k, Tq)
    dummy = q.new_empty(1)
    with on_device(q):
        delta = _delta(o, do, opt)
        _bwd_dkdv_kernel[(n_kblocks, B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, dummy, dtable if need_dtable else dummy, cu_q, cu_k,
            *strides, _packed_strides(dk), _packed_strides(dv), terms,
            Hq, Hkv, *lengths, Hq // Hkv, num_buckets, scale, dropout_p, seed, OPT=opt,
            WRITE_DBIAS=False, WRITE_DTABLE=need_dtable, BLOCK_NB=max(16, triton.next_power_of_2(num_buckets)),
            VARLEN=True, **launch,
        )
        _bwd_dq_kernel[(triton.cdiv(max_seqlen_q, opt.BLOCK_M), B * Hq)](
            q, k, v, do, lse, delta, dq, cu_q, cu_k, *strides, _packed_strides(dq), terms,
            Hq, *lengths, Hq // Hkv, scale, dropout_p, seed, OPT=opt, VARLEN=True, **launch,
        )
    if need_dtable:
        dtable = dtable.sum(dim=(0, 2)).t().contiguous()  # (B, Hq, nK, NB) -> (NB, Hq)
    return dq, dk, dv, dtable
