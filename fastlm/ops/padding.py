"""Packing a padded batch's real tokens into one row of tokens (``unpad``) and back (``pad``), so that the
layers between attention calls compute only on real tokens.

``cu_seqlens`` (B + 1,) int32 holds the prefix sums of the sequences' token counts: sequence b's tokens are
rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` of the packed tensor, in their order in the batch.
"""

import torch

__all__ = ["pad", "unpad"]


def _check_mask(hidden, attention_mask):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"unpad: hidden must be a tensor (B, L, ...), got {_describe(hidden)}")
    mask = attention_mask
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"unpad: attention_mask must be a bool or integer (B, L) tensor, 1/True = real token (an additive "
            f"float mask is not one), got {_describe(attention_mask)}"
        )
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"unpad: attention_mask must have hidden's first two dims (B, L) = {tuple(hidden.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != hidden.device:
        raise ValueError(f"unpad: attention_mask is on {attention_mask.device} but hidden is on {hidden.device}")
    # reading the values back is free on the CPU; on a GPU it would be a host sync, so there 0/1 is the
    # caller's contract
    if attention_mask.device.type == "cpu" and attention_mask.dtype != torch.bool:
        bad = (attention_mask != 0) & (attention_mask != 1)
        if bad.any():
            raise ValueError(
                f"unpad: attention_mask must hold 0 (padding) and 1 (real token), got the value "
                f"{attention_mask[bad][0].item()}"
            )


def _describe(t):
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def unpad(hidden, attention_mask, max_seqlen=None):
    """The real tokens of a padded batch, packed: the inverse of ``pad``. Differentiable in hidden.

    hidden: (B, L, ...) any dtype. attention_mask: (B, L) bool or integer 0/1, True/1 = real token (padding
    may sit anywhere: right, left or in between). max_seqlen: the longest sequence's token count when the
    caller knows it (then only the token count is read back).

    Returns (packed, indices, cu_seqlens, max_seqlen): packed (T, ...) the T real tokens in batch order;
    indices (T,) int64, their rows in hidden.flatten(0, 1); cu_seqlens (B + 1,) int32, the prefix sums of
    the sequences' token counts; max_seqlen, a Python int. On a GPU, the token count and max_seqlen are read
    back in one host sync (the packed shape depends on them).
    """
    _check_mask(hidden, attention_mask)
    B, L = attention_mask.shape
    real = attention_mask.bool()  # (B, L)
    seqlens = real.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    if max_seqlen is None:
        counts = torch.stack([seqlens.sum(), seqlens.max() if B > 0 else seqlens.sum()])
        total, max_seqlen = counts.tolist()  # the one host sync
    else:
        total = int(cu_seqlens[-1])
        if attention_mask.device.type == "cpu" and B > 0 and max_seqlen < seqlens.max():
            raise ValueError(f"unpad: max_seqlen={max_seqlen} is less than the longest sequence ({seqlens.max()})")
    indices = torch.nonzero_static(real.flatten(), size=total).flatten()  # (T,) rows in batch order
    packed = hidden.flatten(0, 1).index_select(0, indices)  # (B, L, ...) -> (B * L, ...) -> (T, ...)
    return packed, indices, cu_seqlens, int(max_seqlen)


def pad(packed, indices, batch, seqlen):
    """Tokens scattered back into a zero-padded batch: the inverse of ``unpad``. Differentiable in packed.

    packed: (T, ...) any dtype; indices: (T,) int64 rows of the (batch * seqlen) flattened batch (``unpad``'s);
    batch, seqlen: the padded batch's B and L. Returns (batch, seqlen, ...) with zeros at padding.
    """
    if not isinstance(packed, torch.Tensor) or packed.dim() < 1:
        raise ValueError(f"pad: packed must be a tensor (T, ...), got {_describe(packed)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.shape != packed.shape[:1]:
        raise ValueError(
            f"pad: indices must be an int64 (T,) = ({packed.shape[0]},) tensor, got {_describe(indices)}"
        )
    for name, value in (("batch", batch), ("seqlen", seqlen)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"pad: {name} must be a non-negative int, got {value!r}")
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))  # (B * L, ...)
    return out.index_copy(0, indices, packed).unflatten(0, (batch, seqlen))  # (B * L, ...) -> (B, L, ...)
