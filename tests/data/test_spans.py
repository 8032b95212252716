import torch

from fastlm.data import span_corrupt, span_corruption_lengths

SENTINELS = list(range(1000, 900, -1))
EOS = 1


def test_span_corruption_roundtrip():
    L = 100
    tokens = torch.arange(10, 10 + 4 * L).view(4, L)
    inputs, labels = span_corrupt(
        tokens, sentinel_ids=SENTINELS, eos_id=EOS, generator=torch.Generator().manual_seed(0)
    )
    num_noise, num_spans, li, lt = span_corruption_lengths(L)
    assert (num_noise, num_spans) == (15, 5)
    assert inputs.shape == (4, li) and labels.shape == (4, lt)
    for row, src, tgt in zip(tokens, inputs, labels, strict=True):
        assert src[-1] == EOS and tgt[-1] == EOS and tgt[-2] == SENTINELS[num_spans]
        # Rebuild the original: each sentinel in the input is replaced by the span after it in the target.
        spans, cur = {}, None
        for t in tgt[:-1].tolist():
            if t in SENTINELS:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [t for s in src[:-1].tolist() for t in (spans[s] if s in SENTINELS else [s])]
        assert rebuilt == row.tolist()
        assert sum(len(v) for v in spans.values()) == num_noise


def test_span_corruption_reproducible():
    tokens = torch.arange(64).view(2, 32) + 10
    a = span_corrupt(tokens, sentinel_ids=SENTINELS, eos_id=EOS, generator=torch.Generator().manual_seed(5))
    b = span_corrupt(tokens, sentinel_ids=SENTINELS, eos_id=EOS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
