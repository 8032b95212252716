import pytest
import torch

from fastlm.data import document_sequences, nsp_pairs, pack_blocks


def test_pack_blocks():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    blocks = pack_blocks(docs, 4, eos_id=0)
    assert blocks.tolist() == [[5, 6, 7, 0], [8, 9, 0, 10], [11, 12, 13, 0]]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_blocks([[1]], 4, eos_id=0)


def test_pack_blocks_document_starts_and_their_sequences():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    blocks, starts = pack_blocks(docs, 4, eos_id=0, document_starts=True)
    assert blocks.tolist() == [[5, 6, 7, 0], [8, 9, 0, 10], [11, 12, 13, 0]]
    assert starts.tolist() == [[True, False, False, False], [True, False, False, True], [True, False, False, False]]
    position_ids, cu_seqlens, max_seqlen = document_sequences(starts)
    assert position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 4, 7, 8, 12] and max_seqlen == 4


def test_nsp_pairs():
    docs = [list(range(100 * d, 100 * d + 90)) for d in range(1, 9)]
    ids, types, labels = nsp_pairs(docs, 16, cls_id=2, sep_id=3, generator=torch.Generator().manual_seed(0))
    assert ids.shape == types.shape == (len(labels), 16)
    assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
    assert ((ids == 3).sum(1) == 2).all()
    assert 0.25 < labels.float().mean() < 0.75
    for row, ty, lab in zip(ids, types, labels, strict=True):
        sep = int((row == 3).nonzero()[0])
        assert (ty[: sep + 1] == 0).all() and (ty[sep + 1 :] == 1).all()
        a, b = row[1:sep].tolist(), row[sep + 1 : -1].tolist()
        contiguous = b[0] == a[-1] + 1
        assert contiguous == (lab == 0)  # true next segments continue A; random ones come from another document
