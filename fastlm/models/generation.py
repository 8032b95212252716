"""The decoding loop shared by GPT and T5: greedy, temperature, top-k and top-p (nucleus) sampling.

``GenerationMixin.generate`` checks the arguments, asks the model to start decoding (the prompt's forward
pass) and runs ``decode``. The model supplies ``step(tokens)``: it appends the (B, 1) tokens to its KV
cache and returns the (B, V) logits of the next position. The loop picks tokens, stops a row at its EOS
(later positions get the pad id) and stops altogether when every row is done or ``max_new_tokens`` are out.
"""

import torch

__all__ = ["GenerationMixin", "KVCache", "check_sampling", "decode", "filter_logits", "next_tokens"]


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


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_sampling(temperature, top_k, top_p):
    """Raise unless temperature > 0, top_k is None or an int >= 0 (0 = no top-k) and top_p is None or
    in (0, 1] (1 = no top-p)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"generate: temperature must be a number > 0 when sampling, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise ValueError(f"generate: top_k must be None or an int >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be None or in (0, 1] (1 = off), got {top_p!r}")


def _check_token_id(name, value, vocab_size):
    if value is not None and (not _is_int(value) or not 0 <= value < vocab_size):
        raise ValueError(f"generate: {name} must be None or a token id in [0, {vocab_size}), got {value!r}")


def filter_logits(logits, *, temperature=1.0, top_k=None, top_p=None):
    """Sampling logits (B, V) in fp32: divided by temperature, then -inf outside the top_k largest, then
    -inf outside the smallest set of most likely tokens whose probability sums to at least top_p (the most
    likely token always stays). The order and rules of HF's temperature / top-k / top-p warpers."""
    check_sampling(temperature, top_k, top_p)
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


class GenerationMixin:
    """``generate`` for a model with ``config.vocab_size`` that implements

    ``_start_decoding(input_ids, attention_mask, max_new_tokens) -> (prefix (B, P), first_logits (B, V),
    step)``: the prompt's forward pass into a fresh KV cache, the tokens that begin the output, and the
    ``step`` of ``decode``; and ``_special_ids(eos_token_id, pad_token_id) -> (eos, pad)``: the ids to use
    when generate's arguments are left at their defaults ("default" for EOS, None for pad).
    """

    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens=20,
        do_sample=False,
        temperature=1.0,
        top_k=None,
        top_p=None,
        eos_token_id="default",
        pad_token_id=None,
        generator=None,
    ):
        """Continue each prompt with a KV cache; returns (B, P + n) int64 tokens, the prefix of the model
        (GPT: the prompt; T5: decoder_start_token_id) then n <= max_new_tokens new tokens.

        input_ids (B, L) int, L >= 1; attention_mask (B, L) of 1 = token / 0 = padding. max_new_tokens: an
        int >= 0 (0 returns the prefix). Greedy by default; do_sample draws from the logits filtered by
        temperature (> 0), top_k (int >= 0, 0 = off) and top_p (in (0, 1]) with ``generator``. A row stops
        at eos_token_id and is then filled with pad_token_id (defaults: see the model's generate notes).
        """
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if do_sample:
            check_sampling(temperature, top_k, top_p)
        eos_token_id, pad_token_id = self._special_ids(eos_token_id, pad_token_id)
        _check_token_id("eos_token_id", eos_token_id, self.config.vocab_size)
        _check_token_id("pad_token_id", pad_token_id, self.config.vocab_size)
        prefix, first, step = self._start_decoding(input_ids, attention_mask, max_new_tokens)
        new = decode(
            step,
            first,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        return torch.cat([prefix, new], dim=1)  # (B, P + n)
