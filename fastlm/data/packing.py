"""Fixed-length training examples cut from a tokenized corpus: GPT's packed blocks and BERT's NSP pairs."""

import torch

__all__ = ["document_sequences", "nsp_pairs", "pack_blocks"]


def _stream(docs, sep_id=None):
    """Concatenate token lists (with ``sep_id`` after each when given): ids (N,) and document index (N,)."""
    ids, doc = [], []
    for i, d in enumerate(docs):
        d = list(d) + ([sep_id] if sep_id is not None else [])
        ids.extend(d)
        doc.extend([i] * len(d))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(doc, dtype=torch.long)


def pack_blocks(docs, block_size, eos_id, *, document_starts=False):
    """GPT's packing: documents (lists of ids) joined by ``eos_id`` and cut into (N, block_size) int64 blocks;
    the tail shorter than a block is dropped. ValueError when the corpus holds no full block.

    With ``document_starts``, returns (blocks, starts): starts (N, block_size) bool is True at the first
    token of each document piece in a block (a block's first token, and the token after each eos_id)."""
    ids, doc = _stream(docs, eos_id)
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"the data has {ids.numel()} tokens, fewer than one block of {block_size}")
    blocks = ids[: n * block_size].view(n, block_size)  # (N * block_size,) -> (N, block_size)
    if not document_starts:
        return blocks
    doc = doc[: n * block_size].view(n, block_size)  # (N, block_size): the document of each token
    starts = torch.ones_like(blocks, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return blocks, starts


def document_sequences(starts):
    """Position ids and the packed sequences of blocks whose documents attend only within themselves.

    starts: (B, L) bool, True where a document piece begins (``pack_blocks``'s; True at every row's first
    token). Returns position_ids (B, L) int64, restarting at 0 at each start, cu_seqlens (S + 1,) int32 over
    the B * L tokens in row order, and max_seqlen (an int)."""
    B, L = starts.shape
    index = torch.arange(L, device=starts.device).expand(B, L)  # (B, L)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, L): the piece's start
    flat_starts = starts.flatten().nonzero().flatten()  # (S,)
    ends = torch.cat([flat_starts, flat_starts.new_tensor([B * L])])  # (S + 1,)
    return index - first, ends.to(torch.int32), int((ends[1:] - ends[:-1]).max()) if B * L else 0


def nsp_pairs(docs, seq_len, *, cls_id, sep_id, generator=None):
    """BERT's next-sentence examples of exactly ``seq_len`` tokens: [CLS] A [SEP] B [SEP].

    The corpus is cut into chunks of seq_len - 3 tokens; each chunk is split at a random point into A and its
    true continuation B (label 0), or, for half the chunks, B is replaced by as many tokens from a random place
    in another document (label 1, "random next"). Returns input_ids (N, L), token_type_ids (N, L) with 1 on B
    and its [SEP], next_sentence_label (N,), all int64.
    """
    budget = seq_len - 3
    if budget < 2:
        raise ValueError(f"seq_len must be at least 5 for NSP pairs, got {seq_len}")
    ids, doc = _stream(docs)
    n = ids.numel() // budget
    if n < 2:
        raise ValueError(f"the data has {ids.numel()} tokens, too few for two NSP examples of {seq_len}")
    chunks = ids[: n * budget].view(n, budget)
    chunk_doc = doc[: n * budget].view(n, budget)[:, 0]
    split = torch.randint(1, budget, (n,), generator=generator)
    is_random = torch.rand(n, generator=generator) < 0.5
    starts = torch.randint(0, ids.numel() - budget, (n,), generator=generator)
    input_ids = torch.empty(n, seq_len, dtype=torch.long)
    token_type_ids = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        a = int(split[i])
        first, second = chunks[i, :a], chunks[i, a:]
        start = int(starts[i])
        if is_random[i] and int(doc[start]) != int(chunk_doc[i]):
            second = ids[start : start + budget - a]
            labels[i] = 1
        input_ids[i] = torch.cat(
            [torch.tensor([cls_id]), first, torch.tensor([sep_id]), second, torch.tensor([sep_id])]
        )
        token_type_ids[i, a + 2 :] = 1
    return input_ids, token_type_ids, labels
