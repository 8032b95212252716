"""Triton LayerNorm / RMSNorm kernels with a fused residual add, and their launchers.

Forward: each program normalises a (BLOCK_M, BLOCK_N) tile, BLOCK_N ≥ N (the whole row on chip);
narrow rows (the 128–1024 widths of BERT, GPT-2 and T5) take several rows per program so each program
moves a few thousand elements, wide rows one row per program. Backward: a fixed grid of programs,
each walking a contiguous range of rows, writes d x for its rows and one fp32 partial sum of
d weight / d bias; the partials are reduced once afterwards (deterministic, no locks).
"""

import torch
import triton
import triton.language as tl

from ..backends import empty
from .launch import on_device, tuned

ELEMENTS_PER_PROGRAM = 4096  # the default tile: rows per program such that a program holds this many elements


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd,
    M, N, stride_x, stride_r, stride_y, stride_s, stride_w, stride_b, eps,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    STORE_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        # s = x + residual rounded to s's dtype: the statistics, y and backward all see the stored s
        x += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x.to(S.dtype.element_ty).to(tl.float32)
        if STORE_S:
            tl.store(S + rows[:, None] * stride_s + cols[None, :], x.to(S.dtype.element_ty), mask=mask)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        tl.store(Mean + rows, mean, mask=row_ok)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_W:
        y *= tl.load(W + cols * stride_w, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + cols * stride_b, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, DS, S, W, Mean, Rstd, DX, DW_partial, DB_partial,
    M, N, stride_dy, stride_ds, stride_s, stride_dx, stride_w, rows_per_program,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = s * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
            wdy = dy * w[None, :]
        else:
            wdy = dy
        if HAS_B:
            db += tl.sum(dy, axis=0)
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_partial + pid * N + cols, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB_partial + pid * N + cols, db, mask=col_ok)


def _tile(n, device, backward):
    """(BLOCK_M, BLOCK_N, num_warps, programs_per_sm) for rows of width n: the tuned configuration of the
    shape class ``n<BLOCK_N>``, else about ELEMENTS_PER_PROGRAM elements per program and 4 backward
    programs per multiprocessor."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, ELEMENTS_PER_PROGRAM // block_n)
    default = {"BLOCK_M": block_m, "num_warps": min(16, max(1, block_m * block_n // 512)), "programs_per_sm": 4}
    config = tuned("norm_bwd" if backward else "norm_fwd", shape_class(n), device, default)
    return config["BLOCK_M"], block_n, config["num_warps"], config["programs_per_sm"]


def shape_class(n):
    """The tuning table's shape class of rows of width n."""
    return f"n{triton.next_power_of_2(n)}"


def _stride(vector):
    """The element stride of a (N,) weight or bias (0 when absent or expanded)."""
    return 0 if vector is None else vector.stride(0)


def norm_fwd(x, weight, bias, residual, eps, rms, store_residual):
    """Launch the forward kernel; see fastlm.ops.norms._norm_fwd for the contract."""
    rows, n = x.shape
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = empty((rows, n), dtype=x.dtype, device=x.device)
    s = empty((rows, n) if store_residual else (0,), dtype=s_dtype, device=x.device)
    mean = empty((0,) if rms else (rows,), dtype=torch.float32, device=x.device)
    rstd = empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, s, mean, rstd
    block_m, block_n, num_warps, _ = _tile(n, x.device, backward=False)
    r = x if residual is None else residual
    with on_device(x):
        _norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x, r, weight, bias, y, s, mean, rstd,
            rows, n, x.stride(0), r.stride(0), y.stride(0), s.stride(0) if store_residual else 0,
            _stride(weight), _stride(bias), eps,
            RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None,
            STORE_S=store_residual, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return y, s, mean, rstd


def _backward_programs(device, rows, block_m, programs_per_sm):
    if device.type == "cuda":
        target = programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(target, triton.cdiv(rows, block_m)))


def norm_bwd(dy, ds, s, weight, has_bias, mean, rstd, rms):
    """Launch the backward kernel; see fastlm.ops.norms._norm_bwd for the contract."""
    rows, n = s.shape
    dx = empty((rows, n), dtype=s.dtype, device=s.device)
    block_m, block_n, num_warps, programs_per_sm = _tile(n, s.device, backward=True)
    programs = _backward_programs(s.device, rows, block_m, programs_per_sm)
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m
    dw_partial = torch.zeros((programs, n) if weight is not None else (0,), dtype=torch.float32, device=s.device)
    db_partial = torch.zeros((programs, n) if has_bias else (0,), dtype=torch.float32, device=s.device)
    if rows > 0:
        with on_device(s):
            _norm_bwd_kernel[(programs,)](
                dy, ds, s, weight, mean, rstd, dx, dw_partial, db_partial,
                rows, n, dy.stride(0), 0 if ds is None else ds.stride(0), s.stride(0), dx.stride(0),
                _stride(weight), rows_per_program,
                RMS=rms, HAS_W=weight is not None, HAS_B=has_bias, HAS_DS=ds is not None,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )  # fmt: skip
    dw = dw_partial.sum(0) if weight is not None else dw_partial
    db = db_partial.sum(0) if has_bias else db_partial
    return dx, dw, db
