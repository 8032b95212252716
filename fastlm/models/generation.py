"""The decoding loop shared by GPT and T5: greedy, temperature, top-k and top-p (nucleus) sampling.

The model supplies ``step(tokens)``: it appends the (B, 1) tokens to its KV cache and returns the
(B, V) logits of the next position. The loop picks tokens, stops a row at its EOS (later positions get
the pad id) and stops altogether when every row is done or ``max_new_tokens`` are out.
"""

import torch

__all__ = ["KVCache", "decode", "filter_logits", "next_tokens"]


class KVCache:
    """Per-layer key/value buffers of a decoder, (B, H, capacity, D) each, filled left to right.

    ``append(layer, k, v)`` writes the new (B, H, n, D) keys and values after those already held and
    returns views of everything held so far, (B, H, length, D), ready for fastlm.attention.
    """

    def __init__(self, capacity):
        self.capacity = capacity
        self.buffers = {}  # layer -> (k, v) buffers
        self.lengths = {}  # layer -> filled length

    def append(self, layer, k, v):
        B, H, n, D = k.shape
        if layer not in self.buffers:
            self.buffers[layer] = (k.new_empty(B, H, self.capacity, D), v.new_empty(B, H, self.capacity, D))
            self.lengths[layer] = 0
        start = self.lengths[layer]
        end = start + n
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions exceed its capacity {self.capacity}")
        buf_k, buf_v = self.buffers[layer]
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        self.lengths[layer] = end
        return buf_k[:, :, :end], buf_v[:, :, :end]  # (B, H, length, D) views

    def length(self, layer=0):
        """The number of positions held for ``layer`` (0 before the first append)."""
        return self.lengths.get(layer, 0)


def filter_logits(logits, *, temperature=1.0, top_k=None, top_p=None):
    """Sampling logits (B, V) in fp32: divided by temperature, then -inf outside the top_k largest, then
    -inf outside the smallest set of most likely tokens whose probability sums to at least top_p (the most
    likely token always stays). The order and rules of HF's temperature / top-k / top-p warpers."""
    if temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def next_tokens(logits, *, do_sample=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The next token of each row from logits (B, V): argmax, or, when ``do_sample``, a draw from
    ``filter_logits(logits, temperature, top_k, top_p)`` with ``generator``. Returns (B,) int64."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(step, first_logits, *, max_new_tokens, eos_token_id=None, pad_token_id=None, **sampling):
    """Run the decoding loop; returns the (B, n) new tokens, n <= max_new_tokens.

    step: callable (B, 1) int64 -> (B, V) logits of the following position (updates the model's cache).
    first_logits: (B, V) logits of the first new position (from the prompt's forward pass).
    eos_token_id: a row stops after emitting it; its later tokens are pad_token_id (default: EOS).
    sampling: do_sample, temperature, top_k, top_p, generator (see ``next_tokens``).
    """
    logits = first_logits
    B = logits.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    out = []
    for i in range(max_new_tokens):
        tokens = next_tokens(logits, **sampling)  # (B,)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(done, pad)
            done = done | (tokens == eos_token_id)
        out.append(tokens)
        if (eos_token_id is not None and bool(done.all())) or i == max_new_tokens - 1:
            break
        logits = step(tokens[:, None])  # (B, V)
    if not out:
        return first_logits.new_zeros((B, 0), dtype=torch.long)
    return torch.stack(out, dim=1)  # (B, n)
