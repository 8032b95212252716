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

import torch

from ._family import OpFamily, every_backend
from ._library import kernel_op
from ._library import rows as _rows

__all__ = ["cross_entropy", "linear_cross_entropy", "cross_entropy_reference", "linear_cross_entropy_reference"]

# Every backend has the row kernel, for fp32 / fp16 / bf16 logits.
CROSS_ENTROPY = OpFamily("cross_entropy", ("cross_entropy", "linear_cross_entropy"), every_backend())
REDUCTIONS = ("mean", "sum", "none")
# Bytes of one chunk's fp32-sized logits in linear_cross_entropy (the logits and their gradient each take
# about this much): large on a GPU so the GEMMs stay efficient, small on the CPU so memory stays low.
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 64 * 2**20}


# --------------------------------------------------------------------------- reference
def cross_entropy_reference(logits, labels, *, ignore_index=-100, label_smoothing=0.0, reduction="mean", z_loss=0.0):
    """Plain PyTorch cross-entropy, computed in fp32 (fp64 for fp64 input); the oracle every kernel is
    checked against. Same arguments as `cross_entropy`; returns the loss in fp32 (fp64)."""
    v = logits.shape[-1]
    x = logits.reshape(-1, v)  # (rows, V)
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = labels.reshape(-1)  # (rows,)
    valid = y != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(1, torch.where(valid, y, 0).long()[:, None]).squeeze(1)
    loss = (1 - label_smoothing) * (lse - target) + label_smoothing * (lse - x.mean(-1)) + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    if reduction == "sum":
        return loss.sum()
    return loss.view(labels.shape)


def linear_cross_entropy_reference(hidden, weight, labels, bias=None, **options):
    """The reference of `linear_cross_entropy`: materialises logits = hidden @ weight.T + bias."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)  # (rows, V)
    return cross_entropy_reference(logits, labels, **options)


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
    """Row kernel on a (rows, V) view with unit stride along V; labels (rows,) int64; scale (rows,) fp32,
    the factor each row's gradient is multiplied by. Returns loss (rows,) fp32 (0 for ignored rows, NaN
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


def _row_scale(count, rows, reduction, device):
    """Per-row gradient factor (rows,) fp32: 1 / (number of labelled rows) for mean, else 1."""
    ones = torch.ones(rows, dtype=torch.float32, device=device)
    return ones / count.clamp_min(1) if reduction == "mean" else ones


def _reduce(loss_rows, count, reduction):
    if reduction == "mean":
        return loss_rows.sum() / count.clamp_min(1)
    return loss_rows.sum()


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, reduction, z_loss, backend):
        v = logits.shape[-1]
        x = _rows(logits, v)  # (rows, V)
        y = labels.reshape(-1).long()  # (rows,)
        count = (y != ignore_index).sum()
        compute_grad = ctx.needs_input_grad[0]
        scale = _row_scale(count, x.shape[0], reduction, x.device)
        loss, _, dlogits = _ce_fwd(x, y, scale, ignore_index, label_smoothing, z_loss, compute_grad, backend)
        ctx.save_for_backward(dlogits)
        ctx.shape, ctx.reduction = logits.shape, reduction
        return loss.view(labels.shape) if reduction == "none" else _reduce(loss, count, reduction)

    @staticmethod
    def backward(ctx, g):
        (dlogits,) = ctx.saved_tensors
        if ctx.reduction == "none":
            dlogits = (dlogits * g.reshape(-1, 1)).to(dlogits.dtype)  # (rows, V)
        elif not _is_one(g):
            dlogits = dlogits * g.to(dlogits.dtype)
        return dlogits.view(ctx.shape), None, None, None, None, None, None


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
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, z_loss, capacity, backend):
        d = hidden.shape[-1]
        h = _rows(hidden, d)  # (rows, D)
        y = labels.reshape(-1).long()  # (rows,)
        valid = y != ignore_index
        count = valid.sum()
        idx = _compact(y, valid, capacity)  # (M,)
        yc = y.index_select(0, idx)  # (M,)
        options = (ignore_index, label_smoothing, z_loss, backend)
        # With reduction="none" the per-row factors are only known in backward, which recomputes.
        need = tuple(ctx.needs_input_grad[:3]) if reduction != "none" else (False, False, False)
        scale = _row_scale(count, idx.numel(), reduction, h.device)
        loss_c, dh, dw, db = _linear_ce_chunks(h, weight, bias, idx, yc, scale, options, need)
        if reduction == "none":
            loss = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device).index_copy_(0, idx, loss_c)
            loss = loss.view(labels.shape)
        else:
            loss = _reduce(loss_c, count, reduction)
        if capacity is not None:  # more labelled rows than capacity: NaN, found without a host sync
            loss = loss + torch.where(count > idx.numel(), float("nan"), 0.0)
        ctx.save_for_backward(h, weight, bias, idx, yc, dh, dw, db)
        ctx.meta = (hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        ctx.options, ctx.reduction = options, reduction
        return loss

    @staticmethod
    def backward(ctx, g):
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
        return dh, dw, db, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- public functions
def _check_options(fn, ignore_index, label_smoothing, reduction, z_loss):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(z_loss, (int, float)) or z_loss < 0:
        raise ValueError(f"{fn}: z_loss must be a non-negative number, got {z_loss!r}")


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
    # Checked on the CPU in eager mode; elsewhere the kernels give such rows a NaN loss.
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            first = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(
                f"{fn}: labels must be in [0, {v}) or ignore_index={ignore_index}; "
                f"got {int(labels.reshape(-1)[first])} at flat position {first}"
            )


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
        logits, labels, ignore_index, float(label_smoothing), reduction, float(z_loss), backend
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
        more labelled rows than `capacity` give a NaN loss. Without it the labelled rows are found with
        torch.nonzero (a host sync on a GPU).
    Other arguments as for `cross_entropy`. With reduction "mean" or "sum", d hidden, d weight (fp32
    accumulation) and d bias are computed in the forward pass and backward only scales them; with "none"
    backward recomputes the chunks. Memory beyond the gradients is bounded by one chunk of rows × V.
    """
    fn = "linear_cross_entropy"
    _check_tensor(fn, "hidden", hidden, floating=True)
    _check_tensor(fn, "weight", weight, floating=True)
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
        _check_tensor(fn, name, t, floating=True)
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
        )
    return _LinearCrossEntropyFunction.apply(
        hidden, weight, bias, labels, ignore_index, float(label_smoothing), reduction, float(z_loss), capacity, backend
    )
