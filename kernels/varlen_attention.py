"""Triton kernels for attention over packed sequences ("varlen") and their launchers.

The tokens of B sequences lie one after the other: q (Tq, Hq, D), k and v (Tk, Hkv, D), sequence b's
rows are cu_seqlens[b] to cu_seqlens[b + 1]. The kernels are those of kernels/attention.py run on each
sequence: the same tiles and jit helpers, with the sequence's own lengths (Lq, Lk) for the causal
alignment and the relative positions. The grids are those of the longest sequence times B: one program
per (max_seqlen_q tile, B * Hq) for the forward and dQ, per (max_seqlen_k tile, B * Hkv) for dK/dV;
programs past their sequence's length return at once. Two conventions differ from padded attention:

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
import triton.language as tl

from ..backends import empty
from .attention import (
    ScoreTerms,
    _bwd_preprocess_kernel,
    _dtable_tile,
    _fwd_tiles,
    _head,
    _key_end,
    _options,
    _probs_and_ds,
    _program,
    _query_tile,
    _row_stats,
    _score_terms,
    _seed,
    _tile,
    _tile_t,
)
from .launch import on_device


@triton.jit
def _sequence(CU_Q, CU_K, b):
    """Sequence b's first query and key rows (int64) and its lengths Lq, Lk."""
    q0 = tl.load(CU_Q + b)
    k0 = tl.load(CU_K + b)
    return q0.to(tl.int64), k0.to(tl.int64), tl.load(CU_Q + b + 1) - q0, tl.load(CU_K + b + 1) - k0


@triton.jit
def _at_sequence(terms, max_k, Lk):
    """`terms` with the shared bucket array moved by max_k - Lk: indexed by the sequence's diagonal."""
    return ScoreTerms(terms.bias, terms.bias_strides, terms.mask, terms.mask_strides, terms.kv_len, terms.table,
                      terms.table_strides, terms.bucket + (max_k - Lk))


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, CU_Q, CU_K, sq, sk, sv, so, terms, Hq, Tq, max_q, max_k, GROUP, sm_scale,
                dropout_p, seed, OPT: tl.constexpr):
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    BLOCK_D: tl.constexpr = OPT.BLOCK_D
    q0, k0, Lq, Lk = _sequence(CU_Q, CU_K, tl.program_id(1) // Hq)
    if tl.program_id(0) * BLOCK_M >= Lq:
        return
    b, h, start_m, offs_m, offs_d, d_ok, md_ok, q, K_H, V_H = _query_tile(
        Q + q0 * sq[2], sq, K + k0 * sk[2], sk, V + k0 * sv[2], sv, Hq, Lq, GROUP, OPT)
    terms = _at_sequence(terms, max_k, Lk)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = _key_end(terms, b, start_m, Lq, Lk, OPT)
    mid = 0
    if OPT.CAUSAL:  # key tiles before `mid` are visible to every row of the Q tile: no causal mask there
        mid = tl.minimum(tl.maximum(start_m + Lk - Lq + 1, 0) // BLOCK_N * BLOCK_N, hi)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, 0, mid, K_H, sk, V_H, sv, terms, b, h, Hq, offs_m, offs_d, d_ok,
                                   start_m, Lq, Lk, sm_scale, dropout_p, seed, max_q, max_k, OPT, False)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, mid, hi, K_H, sk, V_H, sv, terms, b, h, Hq, offs_m, offs_d, d_ok,
                               start_m, Lq, Lk, sm_scale, dropout_p, seed, max_q, max_k, OPT, OPT.CAUSAL)

    empty = l_i == 0.0  # no visible key: zeros, LSE -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if OPT.DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(_tile(_head(Out + q0 * so[2], so, b, h), so, offs_m, offs_d), out.to(Out.dtype.element_ty), mask=md_ok)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + h.to(tl.int64) * Tq + q0 + offs_m, lse, mask=offs_m < Lq)  # (Hq, Tq)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DTABLE, CU_Q, CU_K, sq, sk, sv, sdo, sdk, sdv, terms,
                     Hq, Hkv, Tq, max_q, max_k, GROUP, NUM_BUCKETS, sm_scale, dropout_p, seed, OPT: tl.constexpr,
                     WRITE_DTABLE: tl.constexpr, BLOCK_NB: tl.constexpr):
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    BLOCK_D: tl.constexpr = OPT.BLOCK_D
    q0, k0, Lq, Lk = _sequence(CU_Q, CU_K, tl.program_id(1) // Hkv)
    if tl.program_id(0) * BLOCK_N >= Lk:
        return
    b, hk, start_n, offs_n, offs_d, d_ok = _program(Hkv, OPT, BLOCK_N)
    nd_ok = (offs_n[:, None] < Lk) & d_ok[None, :]
    k = tl.load(_tile(_head(K + k0 * sk[2], sk, b, hk), sk, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BN, BD)
    v = tl.load(_tile(_head(V + k0 * sv[2], sv, b, hk), sv, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BN, BD)
    terms = _at_sequence(terms, max_k, Lk)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = 0
    if OPT.CAUSAL:  # first query that sees key start_n
        lo = (tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        row_h = h.to(tl.int64) * Tq + q0  # the sequence's first row of head h in LSE and DELTA (Hq, Tq)
        Q_H = _head(Q + q0 * sq[2], sq, b, h)
        DO_H = _head(DO + q0 * sdo[2], sdo, b, h)
        dtable = tl.zeros((BLOCK_NB,), tl.float32)
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(_tile(Q_H, sq, offs_m, offs_d), mask=md_ok, other=0.0)  # (BM, BD)
            do = tl.load(_tile(DO_H, sdo, offs_m, offs_d), mask=md_ok, other=0.0)  # (BM, BD)
            lse2, delta = _row_stats(LSE, DELTA, row_h, offs_m, m_ok)
            qk = tl.dot(q, tl.trans(k), input_precision=OPT.PRECISION)  # (BLOCK_M, BLOCK_N)
            p_drop, ds = _probs_and_ds(qk, do, tl.trans(v), lse2, delta, terms, b, h, Hq, offs_m, offs_n, start_m,
                                       start_n, Lq, Lk, sm_scale, dropout_p, seed, max_q, max_k, OPT)
            dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=OPT.PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=OPT.PRECISION)
            if WRITE_DTABLE:
                dtable += _dtable_tile(ds, terms.bucket, start_m, start_n, Lq, Lk, OPT, BLOCK_NB)
        if WRITE_DTABLE:
            offs_nb = tl.arange(0, BLOCK_NB)
            row = ((b * Hq + h).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * NUM_BUCKETS
            tl.store(DTABLE + row + offs_nb, dtable, mask=offs_nb < NUM_BUCKETS)

    dk = dk * sm_scale
    tl.store(_tile(_head(DK + k0 * sdk[2], sdk, b, hk), sdk, offs_n, offs_d), dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(_tile(_head(DV + k0 * sdv[2], sdv, b, hk), sdv, offs_n, offs_d), dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, sq, sk, sv, sdo, sdq, terms, Hq, Tq, max_q, max_k,
                   GROUP, sm_scale, dropout_p, seed, OPT: tl.constexpr):
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    BLOCK_D: tl.constexpr = OPT.BLOCK_D
    q0, k0, Lq, Lk = _sequence(CU_Q, CU_K, tl.program_id(1) // Hq)
    if tl.program_id(0) * BLOCK_M >= Lq:
        return
    b, h, start_m, offs_m, offs_d, d_ok, md_ok, q, K_H, V_H = _query_tile(
        Q + q0 * sq[2], sq, K + k0 * sk[2], sk, V + k0 * sv[2], sv, Hq, Lq, GROUP, OPT)
    m_ok = offs_m < Lq
    do = tl.load(_tile(_head(DO + q0 * sdo[2], sdo, b, h), sdo, offs_m, offs_d), mask=md_ok, other=0.0)  # (BM, BD)
    lse2, delta = _row_stats(LSE, DELTA, h.to(tl.int64) * Tq + q0, offs_m, m_ok)  # (Hq, Tq)
    terms = _at_sequence(terms, max_k, Lk)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = _key_end(terms, b, start_m, Lq, Lk, OPT)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nd_ok = (offs_n[None, :] < Lk) & d_ok[:, None]
        kt = tl.load(_tile_t(K_H, sk, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(_tile_t(V_H, sv, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kt, input_precision=OPT.PRECISION)  # (BLOCK_M, BLOCK_N)
        _, ds = _probs_and_ds(qk, do, vt, lse2, delta, terms, b, h, Hq, offs_m, offs_n, start_m, start_n,
                              Lq, Lk, sm_scale, dropout_p, seed, max_q, max_k, OPT)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=OPT.PRECISION)
    dq = dq * sm_scale
    tl.store(_tile(_head(DQ + q0 * sdq[2], sdq, b, h), sdq, offs_m, offs_d), dq.to(DQ.dtype.element_ty), mask=md_ok)


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
            Hq, Tq, max_seqlen_q, max_seqlen_k, Hq // Hkv, scale, dropout_p, _seed(seed, dropout_p), OPT=opt,
            **launch,
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
    lengths = (Tq, max_seqlen_q, max_seqlen_k)
    with on_device(q):
        delta = _delta(o, do, opt)
        _bwd_dkdv_kernel[(n_kblocks, B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, dtable if need_dtable else q.new_empty(1), cu_q, cu_k,
            *strides, _packed_strides(dk), _packed_strides(dv), terms,
            Hq, Hkv, *lengths, Hq // Hkv, num_buckets, scale, dropout_p, seed, OPT=opt,
            WRITE_DTABLE=need_dtable, BLOCK_NB=max(16, triton.next_power_of_2(num_buckets)), **launch,
        )
        _bwd_dq_kernel[(triton.cdiv(max_seqlen_q, opt.BLOCK_M), B * Hq)](
            q, k, v, do, lse, delta, dq, cu_q, cu_k, *strides, _packed_strides(dq), terms,
            Hq, *lengths, Hq // Hkv, scale, dropout_p, seed, OPT=opt, **launch,
        )
    if need_dtable:
        dtable = dtable.sum(dim=(0, 2)).t().contiguous()  # (B, Hq, nK, NB) -> (NB, Hq)
    return dq, dk, dv, dtable
