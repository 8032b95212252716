"""LayerNorm and RMSNorm over the last dimension, with an optional fused residual add.

    s = x + residual          (when residual is given; s is what the next block's residual is)
    y = norm(s) * weight + bias

s is added in fp32 and rounded to its dtype (the promotion of x's and residual's, as `x + residual`
in PyTorch), and the statistics, y and every gradient are computed from that rounded s: the s
returned with return_residual=True is exactly the tensor that was normalised.

The stack, in order: the PyTorch reference, the kernel entry points (one per backend: Triton in
fastlm.kernels.norms, CUDA and CPU C++ in fastlm._C, emulated CUDA in fastlm._C_emu) registered with
torch.library, the autograd.Function, and the public functions. Statistics are computed and saved in
fp32 whatever the input dtype; backward recomputes x̂ from the saved input and statistics. A backward
that is itself differentiated (create_graph=True, e.g. a gradient penalty) runs the reference formula
under autograd instead of the kernel.
"""

import math
import numbers

import torch

from ._family import OpFamily, every_backend
from ._library import kernel_op
from ._library import rows as _rows

__all__ = ["layer_norm", "rms_norm", "norm_reference"]

# Every backend has the norm kernels, for fp32 / fp16 / bf16 tensors.
NORMS = OpFamily("norms", ("layer_norm", "rms_norm"), every_backend())


# --------------------------------------------------------------------------- reference
def norm_reference(x, weight=None, bias=None, eps=1e-5, residual=None, *, rms=False, return_residual=False):
    """Plain PyTorch LayerNorm (rms=False) or RMSNorm (rms=True), computed in fp32 (fp64 for fp64
    input); the oracle every kernel is checked against. Same arguments as `layer_norm`."""
    s = x if residual is None else x + residual
    h = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
    if rms:
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        centred = h - h.mean(-1, keepdim=True)
        y = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(h.dtype)
    if bias is not None:
        y = y + bias.to(h.dtype)
    y = y.to(x.dtype)
    return (y, s) if return_residual else y


# --------------------------------------------------------------------------- kernel entry points
def _fwd_fake(x, weight, bias, residual, eps, rms, store_residual, backend):
    rows, n = x.shape
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return (
        x.new_empty((rows, n)),
        x.new_empty((rows, n) if store_residual else (0,), dtype=s_dtype),
        x.new_empty((0,) if rms else (rows,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
    )


@kernel_op("norm_fwd", _fwd_fake)
def _norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
    store_residual: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward kernel on (rows, N) views with unit stride along N. Returns y (rows, N) in x's dtype;
    s = x + residual (rows, N) when store_residual, else an empty tensor; mean (rows,) fp32 (empty
    for RMSNorm) and rstd (rows,) fp32."""
    return tuple(NORMS.module(backend).norm_fwd(x, weight, bias, residual, eps, rms, store_residual))


def _bwd_fake(dy, ds, s, weight, has_bias, mean, rstd, rms, backend):
    n = s.shape[1]
    weight_grad_shape = (n,) if weight is not None else (0,)
    return (
        s.new_empty(s.shape),
        s.new_empty(weight_grad_shape, dtype=torch.float32),
        s.new_empty((n,) if has_bias else (0,), dtype=torch.float32),
    )


@kernel_op("norm_bwd", _bwd_fake)
def _norm_bwd(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor | None,
    has_bias: bool,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernel. dy (rows, N); ds (rows, N) or None, the gradient flowing into s from its own
    use downstream; s (rows, N), the normalised input. Returns ds_total (rows, N) in s's dtype (the
    gradient of x and of residual), dweight and dbias (N,) fp32, or empty tensors when absent."""
    return tuple(NORMS.module(backend).norm_bwd(dy, ds, s, weight, has_bias, mean, rstd, rms))


# --------------------------------------------------------------------------- autograd
def _differentiable_backward(s, weight, dy, eps, rms):
    """The gradients (d s, d weight) of norm(s) * weight (+ bias) for upstream dy, written out in torch ops
    (fp32) so that autograd can differentiate them again (create_graph=True). s and dy (..., N); d weight
    (N,) is None when weight is. Not torch.autograd.grad of the reference: with s a saved output of
    _NormFunction, that would run this backward again to reach the weight through s."""
    with torch.enable_grad():
        h = s.float()
        if not rms:
            h = h - h.mean(-1, keepdim=True)
        rstd = torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        x_hat = h * rstd
        g = dy.float() if weight is None else dy.float() * weight.float()  # dL/dx̂
        ds = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        if not rms:
            ds = ds - ds.mean(-1, keepdim=True)
        dw = None if weight is None else (dy.float() * x_hat).reshape(-1, s.shape[-1]).sum(0)  # (N,)
    return ds, dw


def _kernel_backward(ctx, s, weight, mean, rstd, dy, ds, has_bias):
    """(d s (..., N), d weight, d bias) from the backward kernel of ctx's backend."""
    n = s.shape[-1]
    ds = None if ds is None else _rows(ds, n)  # (rows, n)
    dx, dw, db = _norm_bwd(_rows(dy, n), ds, _rows(s, n), weight, has_bias, mean, rstd, ctx.rms, ctx.backend)
    return dx.view(s.shape), dw, db  # (..., n)


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, rms, return_residual, backend):
        n = x.shape[-1]
        x2 = _rows(x, n)  # (rows, n)
        r2 = None if residual is None else _rows(residual, n)  # (rows, n)
        store = residual is not None and (return_residual or any(ctx.needs_input_grad[:4]))
        y, s, mean, rstd = _norm_fwd(x2, weight, bias, r2, eps, rms, store, backend)
        y = y.view(x.shape)  # (..., n)
        s = s.view(x.shape) if store else s  # (..., n), or empty when not stored
        # The normalised input is saved as x itself or as the output s, so that a differentiated
        # backward (create_graph=True) reaches x and residual through autograd.
        ctx.save_for_backward(x if residual is None else s, weight, mean, rstd)
        ctx.meta = (
            x.dtype,
            None if residual is None else residual.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.eps, ctx.rms, ctx.backend = eps, rms, backend
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, mean, rstd = ctx.saved_tensors
        x_dtype, residual_dtype, bias_dtype = ctx.meta
        n = s.shape[-1]
        ds = None if ds is None or ds.numel() == 0 else ds
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate
            dx, dw = _differentiable_backward(s, weight, dy, ctx.eps, ctx.rms)
            dx = dx if ds is None else dx + ds
            db = dy.reshape(-1, n).sum(0) if bias_dtype is not None else None  # (n,)
        else:
            dx, dw, db = _kernel_backward(ctx, s, weight, mean, rstd, dy, ds, bias_dtype is not None)
        dw = None if weight is None else dw.to(weight.dtype)
        db = None if bias_dtype is None else db.to(bias_dtype)
        dres = None if residual_dtype is None else dx.to(residual_dtype)
        return dx.to(x_dtype), dw, db, dres, None, None, None, None


# --------------------------------------------------------------------------- public functions
def _check(fn, x, weight, bias, residual, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dimension (the one normalised), got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got dtype {x.dtype}")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{fn}: x's last dimension (the one normalised) must be ≥ 1, got shape {tuple(x.shape)}")
    for name, t, shape in (("weight", weight, (n,)), ("bias", bias, (n,)), ("residual", residual, x.shape)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{fn}: {name} must have shape {tuple(shape)} to match x {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}; put them on one device")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 <= eps < math.inf):
        raise ValueError(f"{fn}: eps must be a finite non-negative number, got {eps!r}")


def _norm(fn, x, weight, bias, eps, residual, return_residual, rms):
    _check(fn, x, weight, bias, residual, eps)
    others = tuple(t.dtype for t in (weight, bias, residual) if t is not None)
    backend = NORMS.select(fn, x.device, x.dtype, others)
    if backend == "reference":
        return norm_reference(x, weight, bias, eps, residual, rms=rms, return_residual=return_residual)
    y, s = _NormFunction.apply(x, weight, bias, residual, float(eps), rms, return_residual, backend)
    if not return_residual:
        return y
    return y, (x if residual is None else s)


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None, *, return_residual=False):
    """LayerNorm over the last dimension, with an optional fused residual add.

    x:        (..., N) float32 / float16 / bfloat16 (float64 runs on the reference backend)
    weight:   (N,) or None, any float dtype; bias: (N,) or None
    residual: (..., N) like x, or None; then s = x + residual, rounded to its dtype (the promotion of
              both), is normalised
    eps:      a finite number ≥ 0, added to the variance
    return_residual: also return s (x itself when residual is None), for the next block's residual
    Returns y (..., N) in x's dtype, or (y, s). Mean and 1/std are computed and saved in fp32. Any
    layout works (strided or expanded tensors, parameters included). Differentiable twice: a backward
    with create_graph=True runs the reference formula under autograd.
    """
    return _norm("layer_norm", x, weight, bias, eps, residual, return_residual, rms=False)


def rms_norm(x, weight=None, eps=1e-6, residual=None, *, return_residual=False):
    """RMSNorm over the last dimension (T5LayerNorm / LlamaRMSNorm), with an optional fused residual add.

    y = s / sqrt(mean(s²) + eps) * weight, with s = x + residual when residual is given.
    Shapes and dtypes as for `layer_norm` (no bias). Returns y, or (y, s) with return_residual.
    """
    return _norm("rms_norm", x, weight, None, eps, residual, return_residual, rms=True)
