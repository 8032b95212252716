"""T5's span corruption: drop 15% of the tokens in spans of mean length 3, each span replaced by a sentinel in
the input; the target lists the dropped spans, each after its sentinel, and ends with a final sentinel."""

import torch

__all__ = ["span_corruption_lengths", "span_corrupt"]


def span_corruption_lengths(length, noise_density=0.15, mean_span_length=3.0):
    """(num_noise, num_spans, input_length, target_length) for a raw sequence of ``length`` tokens; the input and
    target lengths count the trailing EOS (and the target its final sentinel). Fixed per length, so batches need
    no padding."""
    if length < 2:
        raise ValueError(f"span corruption needs sequences of at least 2 tokens, got length={length}")
    num_noise = min(max(1, round(length * noise_density)), length - 1)
    num_spans = max(1, min(round(num_noise / mean_span_length), num_noise, length - num_noise))
    return num_noise, num_spans, length - num_noise + num_spans + 1, num_noise + num_spans + 2


def _segments(n, k, generator):
    """Random split of n items into k non-empty runs: lengths (k,)."""
    cuts = torch.randperm(n - 1, generator=generator)[: k - 1] + 1
    edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([n])])
    return edges.diff()


def span_corrupt(tokens, *, sentinel_ids, eos_id, noise_density=0.15, mean_span_length=3.0, generator=None):
    """Span-corrupt each row of ``tokens`` (B, L) int64 (CPU); returns (input_ids (B, Li), labels (B, Lt)).

    Spans alternate kept / dropped starting with kept; span j is replaced by ``sentinel_ids[j]`` in the input,
    and the target is sentinel_0 span_0 sentinel_1 span_1 ... sentinel_n, then ``eos_id``. Lengths come from
    ``span_corruption_lengths``.
    """
    if tokens.dim() != 2:
        raise ValueError(f"span_corrupt: tokens must be (B, L), got {tuple(tokens.shape)}")
    B, L = tokens.shape
    num_noise, num_spans, _, _ = span_corruption_lengths(L, noise_density, mean_span_length)
    if num_spans + 1 > len(sentinel_ids):
        raise ValueError(f"span_corrupt: {num_spans + 1} sentinels needed, the tokenizer has {len(sentinel_ids)}")
    inputs, targets = [], []
    for row in tokens:
        noise = _segments(num_noise, num_spans, generator)
        keep = _segments(L - num_noise, num_spans, generator)
        src, tgt, pos = [], [], 0
        for j in range(num_spans):
            src.append(row[pos : pos + keep[j]])
            pos += int(keep[j])
            src.append(torch.tensor([sentinel_ids[j]]))
            tgt.append(torch.tensor([sentinel_ids[j]]))
            tgt.append(row[pos : pos + noise[j]])
            pos += int(noise[j])
        src.append(torch.tensor([eos_id]))
        tgt.append(torch.tensor([sentinel_ids[num_spans], eos_id]))
        inputs.append(torch.cat(src))
        targets.append(torch.cat(tgt))
    return torch.stack(inputs), torch.stack(targets)
