"""Cross-entropy over a vocabulary, and the fused linear + cross-entropy of an LM head.

Per row i with logits x (V,), label y, smoothing ε and z-loss weight z:

    lse  = log Σ_j exp(x_j)
    loss = (1 - ε)(lse - x_y) + ε(lse - mean_j x_j) + z · lse²      (0 when y == ignore_index)
    dloss/dx_j = softmax(x)_j (1 + 2 z lse) - ε / V - (1 - ε)[j == y]

which is torch's label smoothing (ε times the mean over classes of -log p) plus PaLM's z-loss. The row
kernel computes the loss, the lse and — when a gradient is needed — the gradient in one go, so backward
only scales the stored gradient by grad_output. `mean` divides by the number of non-ignored labels,
counted on the device (no host sync); when every label is ignored the loss is 0 with zero gradients.

`linear_cross_entropy` never materialises the (N, V) logits: it gathers the labelled rows first (MLM
labels ~15% of them), then for chunks of those rows computes logits = h W^T (+ b) with torch's matmul,
runs the row kernel, and accumulates d hidden, d weight (fp32) and d bias in the forward pass.

The stack, in order: the PyTorch reference, the row-kernel entry point (Triton in
fastlm.kernels.cross_entropy, CUDA and CPU C++ in fastlm._C, emulated CUDA in fastlm._C_emu) registered
with torch.library, the autograd.Functions, and the public functions.
"""

import math
import os

import torch

from ._family import OpFamily, every_backend
from ._library import kernel_op
from ._library import rows as _rows

__all__ = [
    "DEBUG_CHECKS_ENV",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]

# Every backend has the row kernel, for fp32 / fp16 / bf16 logits.
CROSS_ENTROPY = OpFamily("cross_entropy", ("cross_entropy", "linear_cross_entropy"), every_backend())
REDUCTIONS = ("mean", "sum", "none")
# Bytes of one chunk's fp32-sized logits in linear_cross_entropy (the logits and their gradient each take
# about this much): large on a GPU so the GEMMs stay efficient, small on the CPU so memory stays low.
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}
# Set to "1" to check the labels' range and linear_cross_entropy's capacity on the host for tensors on
# any device (a host sync on a GPU): bad input then raises instead of giving a NaN loss. The labels of CPU
# tensors are always checked (it costs nothing there). Eager mode only: torch.compile skips the checks.
DEBUG_CHECKS_ENV = "FASTLM_DEBUG_CHECKS"


# --------------------------------------------------------------------------- reference
def cross_entropy_reference(logits, labels, *, ignore_index=-100, label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """Plain PyTorch cross-entropy, computed in fp32 (fp64 for fp64 input); the oracle every kernel is
    checked against. Same arguments as `cross_entropy`; returns the loss in fp32 (fp64)."""
    v = logits.shape[-1]
    x = logits.reshape(-1, v)  # (rows, V)
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = labels.reshape(-1)  # (rows,)
    valid = y != ignore_index
    x = torch.where(valid[:, None], x, 0.0)  # ignored rows are not read (as in the kernels): NaN there is inert
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, torch.where(valid, y, 0).long()[:, None]).squeeze(1)
    # Terms of weight 0 are left out: a -inf logit (smoothing) or a huge lse (z-loss) would make them 0 · inf.
    loss = (1 - label_smoothing) * (lse - target)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - x.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    if reduction == "sum":
        return loss.sum()
    return loss.view(labels.shape)


def linear_cross_entropy_reference(hidden, weight, labels, bias=None, *, capacity=None, ignore_index=-100, **options):
    """The reference of `linear_cross_entropy`: materialises logits = hidden @ weight.T + bias. More
    labelled rows than `capacity` give a NaN loss, as in the kernels."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)  # (rows, V)
    loss = cross_entropy_reference(logits, labels, ignore_index=ignore_index, **options)
    if capacity is None:
        return loss
    return loss + _over_capacity_nan((labels != ignore_index).sum(), capacity)


def _over_capacity_nan(count, capacity):
    """NaN (a 0-d fp32 tensor) when `count` (0-d) labelled rows exceed `capacity`, else 0; no host sync."""
    return torch.where(count > capacity, float("nan"), 0.0)


# --------------------------------------------------------------------------- kernel entry point
def _fwd_fake(logits, labels, scale, ignore_index, label_smoothing, z_loss, compute_grad, backend):
    rows, v = logits.shape
    return (
        logits.new_empty((rows,), dtype=torch.float32),
        logits.new_empty((rows,), dtype=torch.float32),
        logits.new_empty((rows, v) if compute_grad else (0,)),
    )


@kernel_op("cross_entropy_fwd", _fwd_fake)
def _ce_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row kernel on a (rows, V) view with unit stride along V; labels (rows,) contiguous int64; scale
    (rows,) fp32, the factor each row's gradient is multiplied by. Returns loss (rows,) fp32 (0 for ignored rows, NaN
    for labels outside [0, V)), lse (rows,) fp32 (0 for ignored rows) and, when compute_grad, the
    gradient of each row's loss times its scale, (rows, V) in logits' dtype (else an empty tensor)."""
    kernels = CROSS_ENTROPY.module(backend)
    return tuple(kernels.ce_fwd(logits, labels, scale, ignore_index, label_smoothing, z_loss, compute_grad))


# --------------------------------------------------------------------------- autograd
def _is_one(g):
    """Whether grad_output is the scalar 1 — checked only for CPU tensors in eager mode, where reading it
    costs nothing; the stored gradients are then returned as they are, without a scaled copy."""
    if torch.compiler.is_compiling() or g.device.type != "cpu" or g.numel() != 1:
        return False
    return g.item() == 1.0


def _refuse_double_backward(fn):
    """Raise when backward runs with create_graph=True: the kernels' gradient carries no graph, and
    returning it would silently drop the second-order terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastlm.{fn}: double backward (create_graph=True) is not supported by the kernel backends; "
            'run this op under fastlm.use_backend("reference") to differentiate its gradient'
        )


def _row_scale(count, rows, reduction, device):
    """Per-row gradient factor (rows,) fp32: 1 / (number of labelled rows) for mean, else 1."""
    ones = torch.ones(rows, dtype=torch.float32, device=device)
    return ones / count.clamp_min(1) if reduction == "mean" else ones


def _reduce(loss_rows, count, reduction):
    if reduction == "mean":
        return loss_rows.sum() / count.clamp_min(1)
    return loss_rows.sum()


def _flat_labels(labels):
    """labels (...) int64/int32 as the (rows,) int64 tensor of unit stride the kernels read (labels of any
    other layout, e.g. sliced or stride-0 expanded, are copied; they are small next to the logits).
    Unlike .contiguous(), this also copies a single label of stride ≠ 1."""
    y = labels.reshape(-1).long()  # (rows,)
    return y if y.stride(0) == 1 else y.clone(memory_format=torch.contiguous_format)


class _CrossEntropyFunction(torch.autograd.Function):
    """The kernels' gradient is computed in forward and not differentiable itself: backward with
    create_graph=True raises; the reference backend supports double backward."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, reduction, z_loss, backend, grad):
        v = logits.shape[-1]
        x = _rows(logits, v)  # (rows, V)
        y = _flat_labels(labels)  # (rows,)
        count = (y != ignore_index).sum()
        compute_grad = grad and ctx.needs_input_grad[0]
        scale = _row_scale(count, x.shape[0], reduction, x.device)
        loss, _, dlogits = _ce_fwd(x, y, scale, ignore_index, label_smoothing, z_loss, compute_grad, backend)
        ctx.save_for_backward(dlogits)
        ctx.shape, ctx.reduction = logits.shape, reduction
        return loss.view(labels.shape) if reduction == "none" else _reduce(loss, count, reduction)

    @staticmethod
    def backward(ctx, g):
        _refuse_double_backward("cross_entropy")
        (dlogits,) = ctx.saved_tensors
        if ctx.reduction == "none":
            dlogits = (dlogits * g.reshape(-1, 1)).to(dlogits.dtype)  # (rows, V)
        elif not _is_one(g):
            dlogits = dlogits * g.to(dlogits.dtype)
        return dlogits.view(ctx.shape), None, None, None, None, None, None, None


def _compact(y, valid, capacity):
    """Indices (M,) of the rows to run: the labelled rows, or with `capacity` the first `capacity` rows
    of a stable sort that puts labelled rows first (a fixed size, no host sync; the rows past the
    labelled ones are ignored rows, which cost matmul work but give 0)."""
    if capacity is None:
        return valid.nonzero().squeeze(1)
    order = torch.argsort((~valid).to(torch.int8), stable=True)
    return order[: min(capacity, y.numel())]


def _chunk_rows(v, device):
    return max(1, CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"] // (4 * v))


def _linear_ce_chunks(h, weight, bias, idx, yc, scale, options, need):
    """Loss of the rows `idx` of h and, for the inputs flagged in `need` = (hidden, weight, bias), the
    gradients of Σ scale_i · loss_i.

    h (rows, D); weight (V, D); bias (V,) or None; idx, yc, scale (M,): row indices, their labels
    (int64) and gradient factors (fp32). Returns loss (M,) fp32, d hidden (rows, D) in h's dtype
    (zero outside idx), d weight (V, D) and d bias (V,) in fp32; None for what is not needed."""
    ignore_index, label_smoothing, z_loss, backend = options
    rows, d = h.shape
    v = weight.shape[0]
    m = idx.numel()
    compute_grad = any(need)
    loss = torch.empty(m, dtype=torch.float32, device=h.device)
    dh = torch.zeros((rows, d), dtype=h.dtype, device=h.device) if need[0] else None
    dw = db = None  # fp32; the first chunk's product initialises them (no zero-filled (V, D) pass)
    step = _chunk_rows(v, h.device)
    for start in range(0, m, step):
        sel = idx[start : start + step]  # (c,)
        hc = h.index_select(0, sel)  # (c, D)
        logits = hc @ weight.t() if bias is None else torch.addmm(bias, hc, weight.t())  # (c, V)
        part = slice(start, start + sel.numel())
        loss[part], _, dlogits = _ce_fwd(
            logits, yc[part], scale[part], ignore_index, label_smoothing, z_loss, compute_grad, backend
        )
        del logits
        if need[0]:
            dh.index_copy_(0, sel, dlogits @ weight)  # (c, D)
        if need[1]:
            if dw is None:
                dw = (dlogits.t() @ hc).float()  # (V, D)
            elif dlogits.dtype == torch.float32:
                dw.addmm_(dlogits.t(), hc)
            else:
                dw += dlogits.t() @ hc  # fp32 accumulation across chunks
        if need[2]:
            db = dlogits.sum(0, dtype=torch.float32) if db is None else db.add_(dlogits.sum(0, dtype=torch.float32))
    if need[1] and dw is None:  # no labelled rows
        dw = torch.zeros((v, d), dtype=torch.float32, device=h.device)
    if need[2] and db is None:
        db = torch.zeros(v, dtype=torch.float32, device=h.device)
    return loss, dh, dw, db


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Gradients are computed in forward (or recomputed in backward for "none") and not differentiable
    themselves: backward with create_graph=True raises; the reference backend supports double backward."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, z_loss, capacity, backend, grad
    ):
        d = hidden.shape[-1]
        h = _rows(hidden, d)  # (rows, D)
        y = _flat_labels(labels)  # (rows,)
        valid = y != ignore_index
        count = valid.sum()
        idx = _compact(y, valid, capacity)  # (M,)
        yc = y.index_select(0, idx)  # (M,)
        options = (ignore_index, label_smoothing, z_loss, backend)
        # With reduction="none" the per-row factors are only known in backward, which recomputes.
        need = tuple(grad and reduction != "none" and n for n in ctx.needs_input_grad[:3])
        scale = _row_scale(count, idx.numel(), reduction, h.device)
        loss_c, dh, dw, db = _linear_ce_chunks(h, weight, bias, idx, yc, scale, options, need)
        if reduction == "none":
            loss = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device).index_copy_(0, idx, loss_c)
            loss = loss.view(labels.shape)
        else:
            loss = _reduce(loss_c, count, reduction)
        if capacity is not None:  # more labelled rows than capacity: NaN, found without a host sync
            loss = loss + _over_capacity_nan(count, capacity)
        ctx.save_for_backward(h, weight, bias, idx, yc, dh, dw, db)
        ctx.meta = (hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        ctx.options, ctx.reduction = options, reduction
        return loss

    @staticmethod
    def backward(ctx, g):
        _refuse_double_backward("linear_cross_entropy")
        h, weight, bias, idx, yc, dh, dw, db = ctx.saved_tensors
        shape, w_dtype, b_dtype = ctx.meta
        if ctx.reduction == "none":
            scale = g.reshape(-1).float().index_select(0, idx).contiguous()  # (M,)
            need = tuple(ctx.needs_input_grad[:3])
            _, dh, dw, db = _linear_ce_chunks(h, weight, bias, idx, yc, scale, ctx.options, need)
        elif not _is_one(g):
            dh, dw, db = (None if t is None else t * g.to(t.dtype) for t in (dh, dw, db))
        dh = None if dh is None else dh.view(shape)
        dw = None if dw is None else dw.to(w_dtype)
        db = None if db is None else db.to(b_dtype)
        return dh, dw, db, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- public functions
def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_options(fn, ignore_index, label_smoothing, reduction, z_loss):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"{fn}: ignore_index must fit in int64, got {ignore_index}")
    if not _is_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not _is_number(z_loss) or not 0 <= z_loss < math.inf:
        raise ValueError(f"{fn}: z_loss must be a finite non-negative number, got {z_loss!r}")


def _check_tensor(fn, name, t, *, floating):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_labels(fn, labels, rows_shape, ref, v, ignore_index):
    _check_tensor(fn, "labels", labels, floating=False)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: labels must be an int64 or int32 tensor of class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(rows_shape):
        raise ValueError(
            f"{fn}: labels must have shape {tuple(rows_shape)} (one label per row), got {tuple(labels.shape)}"
        )
    if labels.device != ref.device:
        raise ValueError(f"{fn}: labels are on {labels.device} but the inputs are on {ref.device}")
    # Checked on the CPU in eager mode (or anywhere with debug checks); else such rows get a NaN loss.
    if labels.numel() and _host_checks(labels.device):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            first = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(
                f"{fn}: labels must be in [0, {v}) or ignore_index={ignore_index}; "
                f"got {int(labels.reshape(-1)[first])} at flat position {first}"
            )


def _host_checks(device):
    """Whether to check the inputs' values on the host: in eager mode, for CPU tensors or when the
    environment sets FASTLM_DEBUG_CHECKS=1."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or os.environ.get(DEBUG_CHECKS_ENV) == "1"


def _check_capacity(fn, labels, ignore_index, capacity):
    """With debug checks on: raise when more labels than `capacity` are not ignore_index."""
    if capacity is None or torch.compiler.is_compiling() or os.environ.get(DEBUG_CHECKS_ENV) != "1":
        return
    count = int((labels != ignore_index).sum())
    if count > capacity:
        raise ValueError(f"{fn}: {count} labelled rows exceed capacity={capacity} (the loss would be NaN)")


def _autocast(*tensors):
    """Under torch.autocast on the tensors' device: the floating tensors (fp64 aside) cast to the
    autocast dtype, as F.linear would cast them; otherwise the tensors unchanged (None stays None)."""
    device = next(t.device.type for t in tensors if t is not None)
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.dtype != torch.float64 else t for t in tensors)


def _backend(fn, tensors, device):
    """The backend for op `fn` on `tensors`: the main input (logits or hidden) first, then the others or None."""
    others = tuple(t.dtype for t in tensors[1:] if t is not None)
    return CROSS_ENTROPY.select(fn, device, tensors[0].dtype, others)


def cross_entropy(logits, labels, *, ignore_index=-100, label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """Cross-entropy of logits against class labels, fused with its gradient.

    logits: (N, V) or (..., V) float32 / float16 / bfloat16 (float64 runs on the reference backend)
    labels: (N,) or (...), int64 or int32; rows labelled `ignore_index` cost no loss and get zero grad
    label_smoothing: ε in [0, 1], torch's definition; z_loss: weight of the lse² term (PaLM)
    reduction: "mean" (over non-ignored labels; 0 when there are none), "sum", or "none" (loss per row)
    Returns the loss in float32 (float64 for float64 logits): a scalar, or labels' shape for "none".
    Any layout of logits and labels is accepted. Labels outside [0, V) other than ignore_index raise a
    ValueError for CPU tensors (and on any device with FASTLM_DEBUG_CHECKS=1), else give a NaN loss.
    -inf logits give torch's loss (finite unless at the label, or with label_smoothing > 0: +inf) and
    finite gradients. NaN propagates, except from rows labelled ignore_index, which are never read (their
    gradient is 0 where torch's would be NaN). The gradient is computed in forward, only when grad mode
    is on and logits require grad; backward with create_graph=True (double backward) raises a
    RuntimeError except on the reference backend.
    """
    fn = "cross_entropy"
    _check_tensor(fn, "logits", logits, floating=True)
    if logits.dim() == 0:
        raise ValueError(f"{fn}: logits must have at least one dimension (the classes), got a 0-d tensor")
    _check_options(fn, ignore_index, label_smoothing, reduction, z_loss)
    v = logits.shape[-1]
    if v == 0:
        raise ValueError(f"{fn}: logits need at least one class, got shape {tuple(logits.shape)}")
    _check_labels(fn, labels, logits.shape[:-1], logits, v, ignore_index)
    backend = _backend(fn, (logits,), logits.device)
    options = {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "reduction": reduction}
    if backend == "reference":
        return cross_entropy_reference(logits, labels, z_loss=z_loss, **options)
    return _CrossEntropyFunction.apply(
        logits, labels, ignore_index, float(label_smoothing), reduction, float(z_loss), backend, torch.is_grad_enabled()
    )


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    bias=None,
    *,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
    capacity=None,
):
    """Cross-entropy of hidden @ weight.T + bias against labels, without materialising the logits.

    hidden: (N, D) or (..., D) float32 / float16 / bfloat16
    weight: (V, D), hidden's dtype (may be tied to the input embedding: its gradient adds up there)
    labels: (N,) or (...), int64 / int32; ignored rows cost no matmul work
    bias:   (V,) in hidden's dtype, or None (BERT's decoder bias)
    capacity: an upper bound on the number of labelled rows (BERT's max_predictions_per_seq × batch):
        the labelled rows are then gathered into a fixed-size buffer without a host sync (on a GPU);
        more labelled rows than `capacity` give a NaN loss in every backend (with FASTLM_DEBUG_CHECKS=1
        in the environment a ValueError instead, in eager mode, at the cost of a host sync). Without it the labelled
        rows are found with torch.nonzero (a host sync on a GPU).
    Under torch.autocast, hidden, weight and bias are first cast to the autocast dtype, as F.linear casts
    them (so they may be given in different dtypes there); the loss stays fp32.
    Other arguments as for `cross_entropy`. With reduction "mean" or "sum", d hidden, d weight (fp32
    accumulation) and d bias are computed in the forward pass (only when grad mode is on and they
    require grad) and backward only scales them; with "none" backward recomputes the chunks. Memory
    beyond the gradients is bounded by one chunk of rows × V. Backward with create_graph=True (double
    backward) needs the reference backend.
    """
    fn = "linear_cross_entropy"
    _check_tensor(fn, "hidden", hidden, floating=True)
    _check_tensor(fn, "weight", weight, floating=True)
    if bias is not None:
        _check_tensor(fn, "bias", bias, floating=True)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    _check_options(fn, ignore_index, label_smoothing, reduction, z_loss)
    if hidden.dim() == 0:
        raise ValueError(f"{fn}: hidden must have at least one dimension (the features), got a 0-d tensor")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] == 0:
        raise ValueError(
            f"{fn}: weight must have shape (V, {d}) with V ≥ 1 to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    v = weight.shape[0]
    for name, t, shape in (("weight", weight, None), ("bias", bias, (v,))):
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{fn}: {name} must have shape {shape} to match weight {tuple(weight.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != hidden.dtype:
            raise TypeError(f"{fn}: {name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but hidden is on {hidden.device}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
        raise ValueError(f"{fn}: capacity must be a non-negative int or None, got {capacity!r}")
    _check_labels(fn, labels, hidden.shape[:-1], hidden, v, ignore_index)
    _check_capacity(fn, labels, ignore_index, capacity)
    backend = _backend(fn, (hidden, weight, bias), hidden.device)
    if backend == "reference":
        return linear_cross_entropy_reference(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
            z_loss=z_loss,
            capacity=capacity,
        )
    options = (ignore_index, float(label_smoothing), reduction, float(z_loss), capacity, backend)
    return _LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, *options, torch.is_grad_enabled())
