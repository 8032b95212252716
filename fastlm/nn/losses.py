"""CrossEntropyLoss and LinearCrossEntropyLoss modules, built on fastlm's fused cross-entropy."""

import torch
from torch import nn

from ..ops.cross_entropy import cross_entropy, linear_cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss with class-index targets (no class weights), plus z_loss.

    forward(logits, labels): logits (N, V) or (..., V) — or torch's (N, V, d1, ...) layout, whose class
    dimension is moved last — and labels (N,) / (...), int64 or int32. The loss is float32.
    """

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss

    def forward(self, logits, labels):
        """logits: (N, V), (..., V), or torch's (N, V, d1, ...) when labels are (N, d1, ...); float32 /
        float16 / bfloat16 (float64 runs on the reference backend). labels: (N,) or (...), int64 or
        int32, class indices or ignore_index. Returns the float32 loss (float64 for float64 logits): a
        scalar, or labels' shape with reduction="none".
        """
        if (
            isinstance(logits, torch.Tensor)
            and logits.dim() > 2
            and logits.shape[:1] + logits.shape[2:] == labels.shape
        ):
            logits = logits.movedim(1, -1)  # torch's (N, V, d1, ...) -> (N, d1, ..., V)
        return cross_entropy(
            logits,
            labels,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            z_loss=self.z_loss,
        )

    def extra_repr(self):
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}"
        )


class LinearCrossEntropyLoss(nn.Module):
    """The loss of an LM head, hidden @ weight.T + bias, without materialising the logits.

    The module owns no parameters: forward(hidden, weight, labels, bias=None) takes the head's weight
    (V, D) — e.g. the decoder weight tied to the input embedding — and its bias (V,). hidden (..., D),
    labels (...). `capacity` bounds the number of labelled rows (see fastlm.linear_cross_entropy).
    """

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, capacity=None):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.capacity = capacity

    def forward(self, hidden, weight, labels, bias=None):
        """hidden: (..., D) float32 / float16 / bfloat16; weight: (V, D) and bias: (V,) or None, the LM
        head's, in hidden's dtype; labels: (...) int64 or int32, class indices or ignore_index. Returns
        the float32 loss: a scalar, or labels' shape with reduction="none".
        """
        return linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            z_loss=self.z_loss,
            capacity=self.capacity,
        )

    def extra_repr(self):
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, capacity={self.capacity}"
        )
