"""Triton kernels for fused attention and their launchers.

Flash-style: a tile of Q stays on chip while tiles of K and V stream through; the softmax is online,
in fp32, in base 2 (``exp2``); the log-sum-exp (LSE, natural log) of every row is saved for the
backward pass, which recomputes the probabilities tile by tile. Backward is three kernels: a
``Delta = rowsum(dO * O)`` preprocess, a dK/dV kernel (one program per K tile and KV head, looping over
the Q tiles of every query head of its group, so GQA needs no atomics) and a dQ kernel (one program per
Q tile). Every accumulation is fp32 and every sum has a fixed order: the kernels are deterministic.
Work that cannot contribute is skipped: key tiles above the causal diagonal, and key tiles after the
last kept key of a sequence (BERT's right padding); forward masks causally only the tiles that cross
the diagonal.

Conventions every backend of ``fastlm.attention`` reproduces (the reference in fastlm/ops/attention.py
is the executable statement of them):

* Scores: ``s[b, h, i, j] = scale * q[b, h, i] . k[b, h // G, j] + attn_bias[b, h, i, j]
  + table[bucket[j - i + Lq - 1], h]`` with ``G = Hq // Hkv``; masked scores are ``-inf``.
* Causal: key ``j`` is visible to query ``i`` iff ``j <= i + (Lk - Lq)`` (top-left aligned when
  Lq == Lk, bottom-right aligned otherwise, the KV-cache convention). Queries that see no key (causal
  with Lq > Lk, or every key padded out) give zeros, zero gradients and an LSE of ``-inf``.
* Relative position: query ``i`` sits at position ``i + (Lk - Lq)``, so its relative position to key
  ``j`` is ``j - i - (Lk - Lq)`` (Hugging Face T5 with ``past_seen_tokens = Lk - Lq``). The host maps
  each of the ``Lq + Lk - 1`` diagonals to its T5 bucket once (``bucket``, int32, indexed by
  ``j - i + Lq - 1``); the kernels read ``table[bucket, h]`` per diagonal and never materialise the
  (Hq, Lq, Lk) bias. The table gradient is summed per diagonal inside a tile (a skewed copy of the dS
  tile made with ``tl.gather``), then per bucket, in registers; each dK/dV program writes one partial
  per query head, reduced on the host: no atomics.
* Dropout on the probabilities with probability ``p``: element ``(b, h, i, j)`` is kept iff
  ``tl.rand(seed, offset) >= p`` with the int64 ``offset = ((b * Hq + h) * Lq + i) * Lk + j``; kept
  probabilities are scaled by ``1 / (1 - p)``. ``tl.rand`` is Philox4x32 with 10 rounds, counter
  ``(lo32(offset), hi32(offset), 0, 0)``, key ``(lo32(seed), hi32(seed))``; its first output word ``x``,
  read as int32, becomes ``float32(x < 0 ? ~x : x) * 4.6566127342e-10``. The backward pass regenerates
  the same mask from the same seed.
"""

import collections

import torch
import triton
import triton.language as tl

from ..backends import empty
from .launch import on_device, tuned

# The compile-time options of every kernel, passed as one constexpr argument (OPT).
Options = collections.namedtuple(
    "Options",
    "HEAD_DIM BLOCK_D BLOCK_M BLOCK_N CAUSAL HAS_MASK HAS_BIAS HAS_RELPOS REL_W DROPOUT PRECISION",
)
# The optional inputs of the scores, passed as one runtime argument (terms): each tensor (a dummy when
# absent) with its strides. A new score term is a field here, a flag in Options and a few lines in _scores.
ScoreTerms = collections.namedtuple(
    "ScoreTerms",
    "bias bias_strides mask mask_strides kv_len table table_strides bucket",
)


@triton.jit
def _head(base, strides, b, h):
    """`base` moved to head (b, h) of a (B, H, L, D) tensor with `strides` (64-bit offsets)."""
    return base + b.to(tl.int64) * strides[0] + h.to(tl.int64) * strides[1]


@triton.jit
def _tile(head, strides, offs_r, offs_c):
    """Pointers to the (rows, cols) tile of one head (from _head): head + r * strides[2] + c * strides[3]."""
    return head + offs_r[:, None] * strides[2] + offs_c[None, :] * strides[3]


@triton.jit
def _tile_t(head, strides, offs_r, offs_c):
    """Pointers to the transposed (cols, rows) tile of one head (from _head)."""
    return head + offs_r[None, :] * strides[2] + offs_c[:, None] * strides[3]


@triton.jit
def _terms_at(terms, b, h, Lk, Lk_b):
    """`terms` with the bias moved to head (b, h), the key padding mask to sequence b, and the bucket array
    by Lk - Lk_b (varlen: the shared buckets of the longest lengths, read at the sequence's diagonals)."""
    return ScoreTerms(_head(terms.bias, terms.bias_strides, b, h), terms.bias_strides,
                      terms.mask + b.to(tl.int64) * terms.mask_strides[0], terms.mask_strides,
                      terms.kv_len, terms.table, terms.table_strides, terms.bucket + (Lk - Lk_b))


@triton.jit
def _sequence(CU_Q, CU_K, b, Lq, Lk, VARLEN: tl.constexpr):
    """Batch entry b's first query and key rows (int64) and its lengths: row 0 and the tensors' Lq, Lk, or
    with VARLEN sequence b of the packed rows (kernels/varlen_attention.py), from cu_seqlens."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        return q0.to(tl.int64), k0.to(tl.int64), tl.load(CU_Q + b + 1) - q0, tl.load(CU_K + b + 1) - k0
    else:
        return b.to(tl.int64) * 0, b.to(tl.int64) * 0, Lq, Lk


@triton.jit
def _stats_row(b, h, Hq, Lq, Tq, q0, VARLEN: tl.constexpr):
    """The row of query 0 of (b, h) in the LSE and Delta: (B * Hq, Lq), or varlen's (Hq, Tq)."""
    if VARLEN:
        return h.to(tl.int64) * Tq + q0
    else:
        return (b * Hq + h).to(tl.int64) * Lq


@triton.jit
def _program(H, OPT: tl.constexpr, BLOCK: tl.constexpr):
    """Where this program works, on a grid (row tiles of BLOCK, B * H): its batch b, head h, first row,
    row offsets (BLOCK,), head-dim offsets (BLOCK_D,) and their in-bounds mask."""
    BLOCK_D: tl.constexpr = OPT.BLOCK_D
    pid_bh = tl.program_id(1)
    start = tl.program_id(0) * BLOCK
    offs_d = tl.arange(0, BLOCK_D)
    return pid_bh // H, pid_bh % H, start, start + tl.arange(0, BLOCK), offs_d, offs_d < OPT.HEAD_DIM


@triton.jit
def _query_tile(Q, sq, K, sk, V, sv, Hq, Lq, GROUP, OPT: tl.constexpr):
    """The prologue of a program over a Q tile (forward, dQ): _program's coordinates, the (BLOCK_M,
    BLOCK_D) in-bounds mask and Q tile, and K and V moved to the tile's KV head."""
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    b, h, start_m, offs_m, offs_d, d_ok = _program(Hq, OPT, BLOCK_M)
    K_H = _head(K, sk, b, h // GROUP)
    V_H = _head(V, sv, b, h // GROUP)
    md_ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    q = tl.load(_tile(_head(Q, sq, b, h), sq, offs_m, offs_d), mask=md_ok, other=0.0)  # (BM, BD)
    return b, h, start_m, offs_m, offs_d, d_ok, md_ok, q, K_H, V_H


@triton.jit
def _scores(qk, terms, h, offs_m, offs_n, start_m, start_n, Lq, Lk, sm_scale, OPT: tl.constexpr,
            CAUSAL: tl.constexpr):
    """Scores of one (BLOCK_M, BLOCK_N) tile of query head h in base 2 (natural scores times log2(e)),
    -inf where masked; `terms` are at the tile's head (_terms_at). `CAUSAL` is OPT.CAUSAL, or False for
    tiles that lie wholly below the diagonal."""
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    REL_W: tl.constexpr = OPT.REL_W
    LOG2E: tl.constexpr = 1.4426950408889634
    inb = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    s = qk * (sm_scale * LOG2E)
    if OPT.HAS_BIAS:
        bias = tl.load(_tile(terms.bias, terms.bias_strides, offs_m, offs_n), mask=inb, other=0.0)
        s += bias.to(tl.float32) * LOG2E
    if OPT.HAS_RELPOS:
        # the tile's diagonals j - i + Lq - 1 are d0 + t, t in [0, BLOCK_M + BLOCK_N - 1)
        d0 = start_n - start_m - (BLOCK_M - 1) + Lq - 1
        offs_t = d0 + tl.arange(0, REL_W)
        t_ok = (offs_t >= 0) & (offs_t < Lq + Lk - 1)
        bucket = tl.load(terms.bucket + offs_t, mask=t_ok, other=0)
        sth, stb = terms.table_strides
        rel = tl.load(terms.table + h * sth + bucket * stb, mask=t_ok, other=0.0).to(tl.float32) * LOG2E  # (REL_W,)
        rel_tile = tl.broadcast_to(rel[None, :], (BLOCK_M, REL_W))
        diag = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None] + (BLOCK_M - 1)
        s += tl.gather(rel_tile, diag, 1)  # (BLOCK_M, BLOCK_N)
    valid = inb
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
    if OPT.HAS_MASK:
        keep = tl.load(terms.mask + offs_n * terms.mask_strides[1], mask=offs_n < Lk, other=0)
        valid = valid & (keep != 0)[None, :]
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _key_end(terms, b, start_m, Lq, Lk, OPT: tl.constexpr):
    """End of the keys a Q tile can see: causal cuts at the diagonal, padding after the last kept key."""
    hi = Lk
    if OPT.CAUSAL:
        hi = tl.minimum(hi, tl.maximum(start_m + OPT.BLOCK_M + Lk - Lq, 0))
    if OPT.HAS_MASK:
        hi = tl.minimum(hi, tl.load(terms.kv_len + b))
    return hi


@triton.jit
def _dropout_keep(seed, b, h, Hq, Lq, Lk, offs_m, offs_n, dropout_p):
    """Keep-mask of one tile: tl.rand at offset ((b * Hq + h) * Lq + i) * Lk + j (int64)."""
    row = (b * Hq + h).to(tl.int64) * Lq + offs_m.to(tl.int64)
    offset = row[:, None] * Lk + offs_n.to(tl.int64)[None, :]
    return tl.rand(seed, offset) >= dropout_p


@triton.jit
def _row_stats(LSE, DELTA, row_bh, offs_m, m_ok):
    """Forward's LSE in base 2 (+inf for rows that saw no key, so their probabilities are 0) and Delta."""
    lse = tl.load(LSE + row_bh + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return lse2, tl.load(DELTA + row_bh + offs_m, mask=m_ok, other=0.0)


@triton.jit
def _probs_and_ds(qk, do, vt, lse2, delta, terms, b, h, Hq, offs_m, offs_n, start_m, start_n, Lq, Lk, sm_scale,
                  dropout_p, seed, drop_lq, drop_lk, OPT: tl.constexpr):
    """Backward of one tile from qk = Q · Kᵀ (BLOCK_M, BLOCK_N) fp32, dO (BLOCK_M, BLOCK_D) and Vᵀ
    (BLOCK_D, BLOCK_N): the dropped-out probabilities P·keep/(1-p) (what multiplied V) and
    dS = P ∘ (dP·keep/(1-p) − Delta) with dP = dO · Vᵀ, both (BLOCK_M, BLOCK_N) fp32. The dropout offsets
    use the lengths drop_lq, drop_lk (Lq, Lk here; the padded maxima for varlen)."""
    s = _scores(qk, terms, h, offs_m, offs_n, start_m, start_n, Lq, Lk, sm_scale, OPT, OPT.CAUSAL)
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, vt, input_precision=OPT.PRECISION)  # after P: fewer tiles live at once
    p_drop = p
    if OPT.DROPOUT:
        keep = _dropout_keep(seed, b, h, Hq, drop_lq, drop_lk, offs_m, offs_n, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        p_drop = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    return p_drop, p * (dp - delta[:, None])


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, lo, hi, K_H, sk, V_H, sv, terms, b, h, Hq, offs_m, offs_d, d_ok, start_m,
               Lq, Lk, sm_scale, dropout_p, seed, drop_lq, drop_lk, OPT: tl.constexpr, CAUSAL: tl.constexpr):
    """Online softmax of the Q tile over the key tiles [lo, hi): returns the updated (acc, m_i, l_i). The
    dropout offsets use the lengths drop_lq, drop_lk (Lq, Lk here; the padded maxima for varlen)."""
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kt = tl.load(_tile_t(K_H, sk, offs_n, offs_d), mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BD, BN)
        qk = tl.dot(q, kt, input_precision=OPT.PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        s = _scores(qk, terms, h, offs_m, offs_n, start_m, start_n, Lq, Lk, sm_scale, OPT, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if OPT.DROPOUT:
            p = tl.where(_dropout_keep(seed, b, h, Hq, drop_lq, drop_lk, offs_m, offs_n, dropout_p), p, 0.0)
        v = tl.load(_tile(V_H, sv, offs_n, offs_d), mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=OPT.PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, CU_Q, CU_K, sq, sk, sv, so, terms, Hq, Lq, Lk, Tq, GROUP, sm_scale, dropout_p,
                seed, OPT: tl.constexpr, VARLEN: tl.constexpr):
    """Lq, Lk: the tensors' lengths, or varlen's longest (the dropout offsets and the bucket array follow them);
    each program's own are its batch entry's (_sequence)."""
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    BLOCK_D: tl.constexpr = OPT.BLOCK_D
    q0, k0, Lq_b, Lk_b = _sequence(CU_Q, CU_K, tl.program_id(1) // Hq, Lq, Lk, VARLEN)
    if tl.program_id(0) * BLOCK_M >= Lq_b:  # varlen: past a shorter sequence's queries
        return
    b, h, start_m, offs_m, offs_d, d_ok, md_ok, q, K_H, V_H = _query_tile(
        Q + q0 * sq[2], sq, K + k0 * sk[2], sk, V + k0 * sv[2], sv, Hq, Lq_b, GROUP, OPT)
    terms = _terms_at(terms, b, h, Lk, Lk_b)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = _key_end(terms, b, start_m, Lq_b, Lk_b, OPT)
    mid = 0
    if OPT.CAUSAL:  # key tiles before `mid` are visible to every row of the Q tile: no causal mask there
        mid = tl.minimum(tl.maximum(start_m + Lk_b - Lq_b + 1, 0) // BLOCK_N * BLOCK_N, hi)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, 0, mid, K_H, sk, V_H, sv, terms, b, h, Hq, offs_m, offs_d, d_ok,
                                   start_m, Lq_b, Lk_b, sm_scale, dropout_p, seed, Lq, Lk, OPT, False)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, mid, hi, K_H, sk, V_H, sv, terms, b, h, Hq, offs_m, offs_d, d_ok,
                               start_m, Lq_b, Lk_b, sm_scale, dropout_p, seed, Lq, Lk, OPT, OPT.CAUSAL)

    empty = l_i == 0.0  # no visible key: zeros, LSE -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if OPT.DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(_tile(_head(Out + q0 * so[2], so, b, h), so, offs_m, offs_d), out.to(Out.dtype.element_ty), mask=md_ok)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + _stats_row(b, h, Hq, Lq, Tq, q0, VARLEN) + offs_m, lse, mask=offs_m < Lq_b)


@triton.jit
def _bwd_preprocess_kernel(Out, DO, DELTA, so, sdo, Hq, Lq, OPT: tl.constexpr):
    b, h, _, offs_m, offs_d, d_ok = _program(Hq, OPT, OPT.BLOCK_M)
    ok = (offs_m[:, None] < Lq) & d_ok[None, :]
    o = tl.load(_tile(_head(Out, so, b, h), so, offs_m, offs_d), mask=ok, other=0.0)
    do = tl.load(_tile(_head(DO, sdo, b, h), sdo, offs_m, offs_d), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tl.program_id(1).to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)  # row b * Hq + h


@triton.jit
def _dtable_tile(ds, BUCKET, start_m, start_n, Lq, Lk, OPT: tl.constexpr, BLOCK_NB: tl.constexpr):
    """The table gradient of one (BLOCK_M, BLOCK_N) dS tile for its query head: dS summed per diagonal
    j - i + Lq - 1 (a skewed copy of the tile), then per bucket (BUCKET indexed by diagonal): (BLOCK_NB,)."""
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    REL_W: tl.constexpr = OPT.REL_W
    # skew: row i of ds shifted right by (BLOCK_M - 1 - i), so column t holds diagonal t
    t = tl.arange(0, REL_W)[None, :]
    src = t - (BLOCK_M - 1) + tl.arange(0, BLOCK_M)[:, None]  # (BLOCK_M, REL_W)
    src_ok = (src >= 0) & (src < BLOCK_N)
    skewed = tl.gather(ds, tl.where(src_ok, src, 0), 1)
    diag_sum = tl.sum(tl.where(src_ok, skewed, 0.0), 0)  # (REL_W,)
    offs_t = start_n - start_m - (BLOCK_M - 1) + Lq - 1 + tl.arange(0, REL_W)
    t_ok = (offs_t >= 0) & (offs_t < Lq + Lk - 1)
    bucket = tl.load(BUCKET + offs_t, mask=t_ok, other=-1)
    onehot = bucket[:, None] == tl.arange(0, BLOCK_NB)[None, :]  # (REL_W, BLOCK_NB)
    return tl.sum(tl.where(onehot, diag_sum[:, None], 0.0), 0)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DBIAS, DTABLE, CU_Q, CU_K, sq, sk, sv, sdo, sdk, sdv, terms,
                     Hq, Hkv, Lq, Lk, Tq, GROUP, NUM_BUCKETS, sm_scale, dropout_p, seed, OPT: tl.constexpr,
                     WRITE_DBIAS: tl.constexpr, WRITE_DTABLE: tl.constexpr, BLOCK_NB: tl.constexpr,
                     VARLEN: tl.constexpr):
    """Lq, Lk, VARLEN: as _fwd_kernel's."""
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    BLOCK_D: tl.constexpr = OPT.BLOCK_D
    q0, k0, Lq_b, Lk_b = _sequence(CU_Q, CU_K, tl.program_id(1) // Hkv, Lq, Lk, VARLEN)
    if tl.program_id(0) * BLOCK_N >= Lk_b:  # varlen: past a shorter sequence's keys
        return
    b, hk, start_n, offs_n, offs_d, d_ok = _program(Hkv, OPT, BLOCK_N)
    nd_ok = (offs_n[:, None] < Lk_b) & d_ok[None, :]
    K_H = _head(K + k0 * sk[2], sk, b, hk)
    V_H = _head(V + k0 * sv[2], sv, b, hk)
    k = tl.load(_tile(K_H, sk, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BN, BD)
    v = tl.load(_tile(V_H, sv, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BN, BD)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = 0
    if OPT.CAUSAL:  # first query that sees key start_n
        lo = (tl.maximum(start_n - (Lk_b - Lq_b), 0) // BLOCK_M) * BLOCK_M
    hi = Lq_b
    if OPT.HAS_MASK:  # no query sees a tile after the last kept key: dK = dV = 0
        hi = tl.where(start_n < tl.load(terms.kv_len + b), Lq_b, lo)
    for g in range(GROUP):
        h = hk * GROUP + g
        row_bh = _stats_row(b, h, Hq, Lq, Tq, q0, VARLEN)
        Q_H = _head(Q + q0 * sq[2], sq, b, h)
        DO_H = _head(DO + q0 * sdo[2], sdo, b, h)
        terms_h = _terms_at(terms, b, h, Lk, Lk_b)
        dtable = tl.zeros((BLOCK_NB,), tl.float32)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq_b
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(_tile(Q_H, sq, offs_m, offs_d), mask=md_ok, other=0.0)  # (BM, BD)
            do = tl.load(_tile(DO_H, sdo, offs_m, offs_d), mask=md_ok, other=0.0)  # (BM, BD)
            lse2, delta = _row_stats(LSE, DELTA, row_bh, offs_m, m_ok)
            qk = tl.dot(q, tl.trans(k), input_precision=OPT.PRECISION)  # (BLOCK_M, BLOCK_N)
            p_drop, ds = _probs_and_ds(qk, do, tl.trans(v), lse2, delta, terms_h, b, h, Hq, offs_m, offs_n,
                                       start_m, start_n, Lq_b, Lk_b, sm_scale, dropout_p, seed, Lq, Lk, OPT)
            dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=OPT.PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=OPT.PRECISION)
            if WRITE_DBIAS:
                tl.store(DBIAS + (row_bh + offs_m[:, None]) * Lk + offs_n[None, :], ds,
                         mask=m_ok[:, None] & (offs_n[None, :] < Lk))
            if WRITE_DTABLE:
                dtable += _dtable_tile(ds, terms_h.bucket, start_m, start_n, Lq_b, Lk_b, OPT, BLOCK_NB)
        if WRITE_DTABLE:
            offs_nb = tl.arange(0, BLOCK_NB)
            row = ((b * Hq + h).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * NUM_BUCKETS
            tl.store(DTABLE + row + offs_nb, dtable, mask=offs_nb < NUM_BUCKETS)

    dk = dk * sm_scale
    tl.store(_tile(_head(DK + k0 * sdk[2], sdk, b, hk), sdk, offs_n, offs_d), dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(_tile(_head(DV + k0 * sdv[2], sdv, b, hk), sdv, offs_n, offs_d), dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, sq, sk, sv, sdo, sdq, terms, Hq, Lq, Lk, Tq, GROUP,
                   sm_scale, dropout_p, seed, OPT: tl.constexpr, VARLEN: tl.constexpr):
    """Lq, Lk, VARLEN: as _fwd_kernel's."""
    BLOCK_M: tl.constexpr = OPT.BLOCK_M
    BLOCK_N: tl.constexpr = OPT.BLOCK_N
    BLOCK_D: tl.constexpr = OPT.BLOCK_D
    q0, k0, Lq_b, Lk_b = _sequence(CU_Q, CU_K, tl.program_id(1) // Hq, Lq, Lk, VARLEN)
    if tl.program_id(0) * BLOCK_M >= Lq_b:  # varlen: past a shorter sequence's queries
        return
    b, h, start_m, offs_m, offs_d, d_ok, md_ok, q, K_H, V_H = _query_tile(
        Q + q0 * sq[2], sq, K + k0 * sk[2], sk, V + k0 * sv[2], sv, Hq, Lq_b, GROUP, OPT)
    m_ok = offs_m < Lq_b
    do = tl.load(_tile(_head(DO + q0 * sdo[2], sdo, b, h), sdo, offs_m, offs_d), mask=md_ok, other=0.0)  # (BM, BD)
    lse2, delta = _row_stats(LSE, DELTA, _stats_row(b, h, Hq, Lq, Tq, q0, VARLEN), offs_m, m_ok)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = _key_end(terms, b, start_m, Lq_b, Lk_b, OPT)
    terms = _terms_at(terms, b, h, Lk, Lk_b)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nd_ok = (offs_n[None, :] < Lk_b) & d_ok[:, None]
        kt = tl.load(_tile_t(K_H, sk, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BLOCK_D, BLOCK_N)
        vt = tl.load(_tile_t(V_H, sv, offs_n, offs_d), mask=nd_ok, other=0.0)  # (BLOCK_D, BLOCK_N)
        qk = tl.dot(q, kt, input_precision=OPT.PRECISION)  # (BLOCK_M, BLOCK_N)
        _, ds = _probs_and_ds(qk, do, vt, lse2, delta, terms, b, h, Hq, offs_m, offs_n, start_m, start_n,
                              Lq_b, Lk_b, sm_scale, dropout_p, seed, Lq, Lk, OPT)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=OPT.PRECISION)
    dq = dq * sm_scale
    tl.store(_tile(_head(DQ + q0 * sdq[2], sdq, b, h), sdq, offs_m, offs_d), dq.to(DQ.dtype.element_ty), mask=md_ok)


def _config(q, backward, has_score_bias):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for q's head dim and dtype: the tuned configuration of
    its shape class on a GPU, else fixed tiles per head dim (small ones under the CPU interpreter), chosen
    so that sm_90 builds spill little or nothing: an additive or T5 bias keeps forward's BLOCK_M at 64
    (the bias tile, or the skewed (BLOCK_M, BLOCK_M + BLOCK_N) T5 tile, must fit in registers next to
    the accumulator)."""
    head_dim = q.shape[-1]
    if q.device.type == "cpu":
        default = (16, 16, 1, 1)
    elif head_dim > 128:
        default = (32, 32, 8, 1) if backward else (64, 32, 8, 2)
    elif backward:
        default = (64, 64, 8, 2)
    else:
        default = ((64 if has_score_bias else 128), 64, 8, (3 if head_dim <= 64 else 2))
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    family = "attention_bwd" if backward else "attention_fwd"
    config = tuned(family, shape_class(q, has_score_bias), q.device, dict(zip(names, default, strict=True)))
    return tuple(config[name] for name in names)


def shape_class(q, has_score_bias):
    """The tuning table's shape class of attention on q (B, H, L, D): the padded head dim, whether an
    additive or T5 bias is added to the scores, and the bits of q's dtype (tuned for 16-bit dtypes)."""
    return f"d{_block_d(q.shape[-1])}{'-bias' if has_score_bias else ''}-{8 * q.element_size()}bit"


def _block_d(head_dim):
    """The head dim padded to the power of two (at least 16) the kernels' tiles hold."""
    return max(16, triton.next_power_of_2(head_dim))


def _options(q, causal, bias, mask, table, dropout_p, backward):
    """The kernels' compile-time Options and launch options ({"num_warps", "num_stages"}) for these inputs."""
    D = q.shape[-1]
    block_m, block_n, num_warps, num_stages = _config(q, backward, bias is not None or table is not None)
    options = Options(
        HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, HAS_RELPOS=table is not None,
        REL_W=triton.next_power_of_2(block_m + block_n - 1), DROPOUT=dropout_p > 0.0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return options, {"num_warps": num_warps, "num_stages": num_stages}


def _score_terms(q, bias, mask, table, bucket):
    """The ScoreTerms of these inputs; a dummy tensor with zero strides stands in for absent ones. With a
    mask, kv_len (B,) int32 is one past the last kept key of each sequence: tiles after it are skipped."""
    dummy = q.new_empty(1)
    kv_len = dummy
    if mask is not None:
        positions = torch.arange(1, mask.shape[1] + 1, dtype=torch.int32, device=mask.device)  # (Lk,)
        kv_len = torch.where(mask, positions, 0).amax(dim=1)  # (B,)
    return ScoreTerms(
        bias=dummy if bias is None else bias,
        bias_strides=(0, 0, 0, 0) if bias is None else bias.stride(),
        mask=dummy if mask is None else mask.view(torch.uint8),
        mask_strides=(0, 0) if mask is None else mask.stride(),
        kv_len=kv_len,
        table=dummy if table is None else table,
        table_strides=(0, 0) if table is None else (table.stride(1), table.stride(0)),
        bucket=dummy if bucket is None else bucket,
    )


def _seed(seed, dropout_p):
    """The dropout seed as the int the kernels take (0 without dropout: no host sync then)."""
    return int(seed.item()) if dropout_p > 0.0 else 0


def attention_fwd(q, k, v, bias, mask, table, bucket, seed, causal, scale, dropout_p):
    """Launch the forward kernel.

    q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) any strides; bias (B, Hq, Lq, Lk) (zero strides allowed) or
    None; mask (B, Lk) bool or None; table (num_buckets, Hq) with bucket (Lq + Lk - 1,) int32, or None;
    seed (1,) int64. Returns o (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq) fp32 (natural log).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    o = empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)  # (B, Hq, Lq, D)
    lse = empty((B, Hq, Lq), dtype=torch.float32, device=q.device)  # (B, Hq, Lq)
    if lse.numel() == 0 or Lk == 0:  # no query, or no key at all: zeros
        return o.zero_(), lse.fill_(float("-inf"))
    opt, launch = _options(q, causal, bias, mask, table, dropout_p, backward=False)
    terms = _score_terms(q, bias, mask, table, bucket)
    with on_device(q):
        _fwd_kernel[(triton.cdiv(Lq, opt.BLOCK_M), B * Hq)](
            q, k, v, o, lse, terms.kv_len, terms.kv_len, q.stride(), k.stride(), v.stride(), o.stride(), terms,
            Hq, Lq, Lk, 0, Hq // Hkv, scale, dropout_p, _seed(seed, dropout_p), OPT=opt, VARLEN=False, **launch,
        )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, bias, mask, table, bucket, seed, causal, scale, dropout_p, need_dbias,
                  need_dtable):
    """Launch the backward kernels.

    Arguments as attention_fwd, plus do (B, Hq, Lq, D) and forward's o and lse. Returns dq, dk, dv
    (shapes and dtypes of q, k, v); dbias (B, Hq, Lq, Lk) fp32, the gradient of the expanded bias (the
    caller reduces it over broadcast dims), when need_dbias; dtable (num_buckets, Hq) fp32 when
    need_dtable; empty (0,) tensors otherwise.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq = empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)  # (B, Hq, Lq, D)
    dk = empty((B, Hkv, Lk, D), dtype=k.dtype, device=k.device)  # (B, Hkv, Lk, D)
    dv = empty((B, Hkv, Lk, D), dtype=v.dtype, device=v.device)  # (B, Hkv, Lk, D)
    # causal programs skip the tiles above the diagonal: their zeros are written here
    dbias = torch.zeros((B, Hq, Lq, Lk) if need_dbias else (0,), dtype=torch.float32, device=q.device)
    num_buckets = table.shape[0] if need_dtable else 0
    if dq.numel() == 0 or dk.numel() == 0:
        dtable = torch.zeros((num_buckets, Hq) if need_dtable else (0,), dtype=torch.float32, device=q.device)
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias, dtable
    opt, launch = _options(q, causal, bias, mask, table, dropout_p, backward=True)
    terms = _score_terms(q, bias, mask, table, bucket)
    seed = _seed(seed, dropout_p)
    delta = empty((B, Hq, Lq), dtype=torch.float32, device=q.device)  # (B, Hq, Lq)
    n_kblocks = triton.cdiv(Lk, opt.BLOCK_N)
    dtable = empty((B, Hq, n_kblocks, num_buckets) if need_dtable else (0,), dtype=torch.float32,
                   device=q.device)  # (B, Hq, nK, NB): one partial per dK/dV program and query head
    dummy = q.new_empty(1)
    strides = (q.stride(), k.stride(), v.stride(), do.stride())
    with on_device(q):
        _bwd_preprocess_kernel[(triton.cdiv(Lq, opt.BLOCK_M), B * Hq)](
            o, do, delta, o.stride(), do.stride(), Hq, Lq, OPT=opt,
        )
        _bwd_dkdv_kernel[(n_kblocks, B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, dbias if need_dbias else dummy, dtable if need_dtable else dummy,
            dummy, dummy, *strides, dk.stride(), dv.stride(), terms,
            Hq, Hkv, Lq, Lk, 0, Hq // Hkv, num_buckets, scale, dropout_p, seed, OPT=opt,
            WRITE_DBIAS=need_dbias, WRITE_DTABLE=need_dtable,
            BLOCK_NB=max(16, triton.next_power_of_2(num_buckets)), VARLEN=False, **launch,
        )
        _bwd_dq_kernel[(triton.cdiv(Lq, opt.BLOCK_M), B * Hq)](
            q, k, v, do, lse, delta, dq, dummy, dummy, *strides, dq.stride(), terms,
            Hq, Lq, Lk, 0, Hq // Hkv, scale, dropout_p, seed, OPT=opt, VARLEN=False, **launch,
        )
    if need_dtable:
        dtable = dtable.sum(dim=(0, 2)).t().contiguous()  # (B, Hq, nK, NB) -> (NB, Hq)
    return dq, dk, dv, dbias, dtable
