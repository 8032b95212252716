"""BERT's masked-language-model corruption: 15% of the tokens, 80% of them [MASK], 10% random, 10% kept."""

import torch

__all__ = ["mlm_mask"]


def mlm_mask(
    input_ids,
    *,
    mask_token_id,
    vocab_size,
    special_ids=(),
    mlm_probability=0.15,
    generator=None,
    exact=False,
):
    """Corrupt ``input_ids`` (B, L) int64 for MLM on their own device; returns (masked_input_ids, labels).

    Each non-special token is chosen with probability ``mlm_probability`` (``exact=True``: exactly
    max(1, round(mlm_probability * L)) tokens per sequence, so that the number of labelled rows is B times that
    without a host sync; a sequence with fewer non-special tokens than that gets all of them). A chosen token
    becomes ``mask_token_id`` with probability 0.8, a uniform random id in [0, vocab_size) with 0.1, and stays
    with 0.1. labels (B, L) hold the original id at chosen positions and -100 elsewhere. ``generator`` (on the
    ids' device) makes the draw reproducible.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"mlm_mask: input_ids must be an integer tensor (B, L), got {shape}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_mask: mlm_probability must be in (0, 1), got {mlm_probability}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mlm_mask: mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})")
    if generator is not None and generator.device.type != input_ids.device.type:
        raise ValueError(f"mlm_mask: generator is on {generator.device}, input_ids on {input_ids.device}")
    B, L = input_ids.shape
    device = input_ids.device
    special = torch.zeros_like(input_ids, dtype=torch.bool)  # (B, L)
    for sid in special_ids:
        special |= input_ids == sid
    scores = torch.rand((B, L), generator=generator, device=device)  # (B, L) in [0, 1)
    if exact:
        k = min(L, max(1, round(mlm_probability * L)))
        chosen_idx = scores.masked_fill(special, -1.0).topk(k, dim=1).indices  # (B, k)
        chosen = torch.zeros_like(special).scatter_(1, chosen_idx, True) & ~special
    else:
        chosen = (scores < mlm_probability) & ~special
    labels = input_ids.masked_fill(~chosen, -100)
    action = torch.rand((B, L), generator=generator, device=device)  # 80% mask, 10% random, 10% keep
    random_ids = torch.randint(vocab_size, (B, L), generator=generator, device=device, dtype=input_ids.dtype)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels
