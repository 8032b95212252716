import pytest
import torch

import fastlm
from fastlm.data import mlm_mask

V, MASK, SPECIALS = 1000, 4, (0, 2, 3)


def _ids(B=64, L=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return ids


def test_rates_80_10_10():
    ids = _ids()
    masked, labels = mlm_mask(
        ids, mask_token_id=MASK, vocab_size=V, special_ids=SPECIALS, generator=torch.Generator().manual_seed(1)
    )
    chosen = labels != -100
    rate = chosen.float().mean().item()
    assert 0.13 < rate < 0.17
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens untouched
    n = chosen.sum().item()
    frac_mask = (masked[chosen] == MASK).sum().item() / n
    frac_keep = (masked[chosen] == ids[chosen]).sum().item() / n
    assert 0.76 < frac_mask < 0.84
    assert 0.07 < frac_keep < 0.14  # 10% kept plus random draws of the same id
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # specials never chosen


def test_reproducible_from_generator():
    ids = _ids()
    a = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(3))
    b = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(3))
    c = mlm_mask(ids, mask_token_id=MASK, vocab_size=V, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_exact_count_per_sequence():
    ids = _ids(B=9, L=100)
    _, labels = mlm_mask(
        ids,
        mask_token_id=MASK,
        vocab_size=V,
        special_ids=SPECIALS,
        exact=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert ((labels != -100).sum(1) == 15).all()


def test_reexported_and_errors():
    assert fastlm.mlm_mask is mlm_mask
    with pytest.raises(ValueError, match="input_ids"):
        mlm_mask(torch.zeros(4), mask_token_id=MASK, vocab_size=V)
    with pytest.raises(ValueError, match="mlm_probability"):
        mlm_mask(_ids(), mask_token_id=MASK, vocab_size=V, mlm_probability=1.5)
    with pytest.raises(ValueError, match="mask_token_id"):
        mlm_mask(_ids(), mask_token_id=V, vocab_size=V)


def test_empty_batch():
    masked, labels = mlm_mask(torch.zeros(0, 8, dtype=torch.long), mask_token_id=MASK, vocab_size=V)
    assert masked.shape == labels.shape == (0, 8)
