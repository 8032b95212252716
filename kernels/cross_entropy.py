"""Triton cross-entropy row kernel and its launcher.

One program per row. Non-ignored rows stream the row in BLOCK-wide tiles once with an online softmax
(running max and rescaled Σ exp, plus Σ x for label smoothing) in fp32; when a gradient is requested a
second sweep writes scale · (softmax (1 + 2 z lse) - ε / V - (1 - ε) onehot). -inf logits are
handled as torch does (the ε term is left out at ε = 0). Ignored rows write zeros
without reading their logits. The label's logit is a single masked load, so a label outside [0, V)
never reads out of bounds: that row gets a NaN loss and a NaN gradient.
"""

import torch
import triton
import triton.language as tl

from ..backends import empty
from .launch import on_device, tuned

MAX_BLOCK = 4096  # the default tile width (columns per step of a row)


@triton.jit
def _ce_fwd_kernel(
    X, Labels, Scale, Loss, Lse, DX,
    V, stride_x, stride_dx, ignore_index, smoothing, z_loss,
    HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    label = tl.load(Labels + row)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    if label == ignore_index:
        tl.store(Loss + row, 0.0)
        tl.store(Lse + row, 0.0)
        if HAS_GRAD:
            for start in range(0, V, BLOCK):
                c = start + cols
                tl.store(dx_row + c, tl.zeros((BLOCK,), dtype=DX.dtype.element_ty), mask=c < V)
    else:
        in_range = (label >= 0) & (label < V)
        m = -float("inf")
        s = 0.0
        sum_x = 0.0
        for start in range(0, V, BLOCK):
            c = start + cols
            mask = c < V
            x = tl.load(x_row + c, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # a tile of -inf adds 0, not exp(NaN)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(x_row + label, mask=in_range, other=float("nan")).to(tl.float32)
        # The smoothing term is skipped at ε = 0, where a -inf logit would make it 0 · inf = NaN.
        smooth = tl.where(smoothing > 0, smoothing * (lse - sum_x / V), 0.0)
        loss = (1.0 - smoothing) * (lse - target) + smooth + z_loss * lse * lse
        tl.store(Loss + row, loss)
        tl.store(Lse + row, lse)
        if HAS_GRAD:
            scale = tl.load(Scale + row)
            a = scale * (1.0 + 2.0 * z_loss * lse)
            b = scale * smoothing / V
            hit = scale * (1.0 - smoothing)
            for start in range(0, V, BLOCK):
                c = start + cols
                mask = c < V
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * a - b - tl.where(c == label, hit, 0.0)
                g = tl.where(in_range, g, float("nan"))
                tl.store(dx_row + c, g.to(DX.dtype.element_ty), mask=mask)


def ce_fwd(logits, labels, scale, ignore_index, label_smoothing, z_loss, compute_grad):
    """Launch the row kernel; see fastlm.ops.cross_entropy._ce_fwd for the contract."""
    rows, v = logits.shape
    loss = empty((rows,), dtype=torch.float32, device=logits.device)
    lse = empty((rows,), dtype=torch.float32, device=logits.device)
    dlogits = empty((rows, v) if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    if rows == 0:
        return loss, lse, dlogits
    block = min(MAX_BLOCK, triton.next_power_of_2(v))
    default = {"BLOCK": block, "num_warps": min(16, max(1, block // 256))}
    config = tuned("ce_fwd", shape_class(v), logits.device, default)
    with on_device(logits):
        _ce_fwd_kernel[(rows,)](
            logits, labels, scale, loss, lse, dlogits,
            v, logits.stride(0), dlogits.stride(0) if compute_grad else 0, ignore_index, label_smoothing, z_loss,
            HAS_GRAD=compute_grad, BLOCK=config["BLOCK"], num_warps=config["num_warps"],
        )  # fmt: skip
    return loss, lse, dlogits


def shape_class(v):
    """The tuning table's shape class of rows of v logits."""
    return f"v{triton.next_power_of_2(v)}"
