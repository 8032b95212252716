"""Swap fastlm's fused layers into models people already have, in place and per instance.

    fastlm.patch(model, norms=True, attention=True, loss=True, verbose=False) -> model
    fastlm.unpatch(model) -> model

Nothing global is modified: modules are replaced inside this model only (sharing the same Parameters,
so state_dict keys and optimiser state are unchanged), Hugging Face models are switched to the
"fastlm" attention implementation through their own `set_attn_implementation`, and losses are
rerouted with hooks on this instance. The paths are generic, by role rather than by model:

- norms: every torch.nn.LayerNorm over the last dimension, and RMSNorm-like modules (a `weight` and a
  `variance_epsilon` or `eps`, named *RMSNorm or T5LayerNorm) become fastlm.nn.LayerNorm / RMSNorm.
- attention: Hugging Face models whose attention goes through transformers' AttentionInterface use
  fastlm.attention (key padding from the 2-D mask, causality from `module.is_causal`, GQA as is,
  T5's relative-position bias computed inside the kernel from the stack's table, its buckets once per
  stack rather than per layer, and T5's dense (1, H, Lq, Lk) bias never built); torch.nn.
  MultiheadAttention (alone or inside nn.TransformerEncoderLayer) becomes FusedMultiheadAttention.
  A call the fused kernel cannot serve (attention weights asked for, output_attentions=True, an
  attention argument it doesn't implement) runs the original code instead, with a one-time warning:
  a patched model never gives a silently different answer.
- loss: masked-LM heads (BERT), causal-LM heads (GPT-2, Llama-family: anything with an `lm_head`
  named *ForCausalLM / *LMHeadModel) and seq2seq LM heads (T5) compute their loss with
  fastlm.linear_cross_entropy on the hidden states and the (tied) head weight, so the logits of all
  rows are never materialised while training. The logits are still returned in eval mode, or when
  the call passes `return_logits=True`. Models whose config transforms the logits before the loss
  (final_logit_softcapping, logits_scaling, logit_scale) keep their own loss.
"""

import functools
import sys
import warnings
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from . import nn as fnn
from .models._common import runs_varlen_kernel
from .models.t5 import CachedRelativePositionBias
from .ops.attention import attention
from .ops.varlen_attention import varlen_attention

__all__ = ["FusedMultiheadAttention", "patch", "unpatch"]

IMPLEMENTATION = "fastlm"
_STATE = "_fastlm_patch"  # instance attribute holding what patch() changed, for unpatch()
# T5 self-attention module -> (the stack's first attention, the stack's bucket cache)
_rel_pos_owner = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- norms
def _is_rms_norm(module):
    name = type(module).__name__
    has_eps = hasattr(module, "variance_epsilon") or hasattr(module, "eps")
    plain_weight = isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 1
    # Gemma-style norms scale by (1 + weight): a different formula, left alone.
    return (name.endswith("RMSNorm") or name == "T5LayerNorm") and "Gemma" not in name and has_eps and plain_weight


def _fused_norm(module):
    """The fastlm.nn replacement for `module` sharing its Parameters, or None when it doesn't apply."""
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        new = fnn.LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=False)
        new.elementwise_affine = module.elementwise_affine
        new.weight, new.bias = module.weight, module.bias
        return new
    if isinstance(module, nn.RMSNorm) and len(module.normalized_shape) == 1:
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
        new = fnn.RMSNorm(module.normalized_shape, eps=eps, elementwise_affine=False)
        new.elementwise_affine = module.elementwise_affine
        new.weight = module.weight
        return new
    if _is_rms_norm(module):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        new = fnn.RMSNorm(module.weight.shape[0], eps=eps, elementwise_affine=False)
        new.weight = module.weight
        return new
    return None


# --------------------------------------------------------------------------- fallbacks
_WARNED = set()  # fallback reasons already warned about in this process


def _warn_once(reason, message):
    """Warn the first time `reason` comes up in this process: a call fastlm hands back to the original code."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(message, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------- torch.nn.MultiheadAttention
class FusedMultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose forward runs fastlm.attention. fastlm.patch turns a module into
    one in place (its class is switched; it keeps its Parameters and state), unpatch switches it back.

    A drop-in: the arguments and their conventions are torch's, which differ from fastlm's own.
    In particular ``key_padding_mask`` here is torch's (True = IGNORE that key, or a float mask added to
    the scores), the opposite of ``fastlm.attention(key_padding_mask=...)`` and of
    ``fastlm.nn.MultiHeadAttention(key_keep_mask=...)``, where True = attend. Every option of the
    original module gives the original's answer: batch_first either way, unbatched input, kdim/vdim,
    bias=False, add_bias_kv, add_zero_attn, bool or float masks of every accepted shape, is_causal.
    Dropout draws its mask from fastlm's generator (same rate, not the same mask as torch's).
    Calls the kernel cannot serve — need_weights=True (torch's default: the fused kernel never forms
    the attention weights) and nested-tensor inputs — run torch's own forward, with a one-time warning.
    """

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        """torch.nn.MultiheadAttention.forward, with its shapes and conventions (E = embed_dim,
        H = num_heads, B batch, L query length, S key length; float tensors of the module's dtype):

        query (B, L, E) if batch_first else (L, B, E), or unbatched (L, E); key (.., S, kdim) and
        value (.., S, vdim) laid out alike.
        key_padding_mask: (B, S) or unbatched (S,); bool with True = IGNORE that key (torch's
            convention, the opposite of fastlm.attention's), or float, added to the scores.
        need_weights: torch's default True needs the attention weights, which the fused kernel never
            forms: such calls run torch's forward (one-time warning). Pass False for the fused path.
        attn_mask: (L, S) or (B*H, L, S); bool with True = NOT allowed to attend, or float, added.
        is_causal: torch's hint that attn_mask is the causal mask (it needs attn_mask); without a
            key_padding_mask torch then applies a top-left causal mask instead, and so does this.
        Returns (output shaped like query, None) on the fused path.
        """
        if need_weights or query.is_nested:
            reason = "need_weights=True" if need_weights else "nested-tensor inputs"
            _warn_once(
                ("FusedMultiheadAttention", reason),
                f"FusedMultiheadAttention: {reason} is not served by the fused kernel (it never forms the "
                "attention weights); these calls run torch.nn.MultiheadAttention's own forward. Pass "
                "need_weights=False to use fastlm.attention.",
            )
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "FusedMultiheadAttention: is_causal=True needs attn_mask (as in torch.nn.MultiheadAttention, "
                "is_causal is a hint that attn_mask is the causal mask)"
            )
        unbatched = query.dim() == 2
        q, k, v = self._heads(query, key, value)  # (B, H, L, D), (B, H, S + extra, D) twice
        S = key.shape[-2] if unbatched or self.batch_first else key.shape[0]
        causal, keep, bias, dead = _fused_masks(attn_mask, key_padding_mask, is_causal, q, (S, k.shape[2]), unbatched)
        dropout = self.dropout if self.training else 0.0
        out = attention(q, k, v, causal=causal, key_padding_mask=keep, attn_bias=bias, dropout_p=dropout)
        if dead is not None:
            out = out.masked_fill(dead, 0.0)  # torch gives zeros where a query may attend to no key
        B, H, L, D = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, H * D))  # (B, H, L, D) -> (B, L, E)
        if unbatched:
            return out[0], None
        return (out if self.batch_first else out.transpose(0, 1)), None  # (B, L, E) -> (L, B, E)

    def _heads(self, query, key, value):
        """Project query/key/value (as forward takes them) to per-head (B, H, L or S, D) tensors, with the
        add_bias_kv and add_zero_attn keys appended as torch does."""
        if query.dim() == 2:
            query, key, value = query[None], key[None], value[None]  # (L, E) -> (1, L, E)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (L, B, E) -> (B, L, E)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)  # (B, L|S, E)
        B = q.shape[0]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, -1)], dim=1)  # (B, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(B, 1, -1)], dim=1)  # (B, S + 1, E)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, L|S, D)
        if self.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(B, self.num_heads, 1, t.shape[-1])], dim=2) for t in (k, v))
        return q, k, v


def _fused_masks(attn_mask, key_padding_mask, is_causal, q, keys, unbatched):
    """torch's masks as fastlm.attention's (causal, keep, bias, dead) (see _mask_bias), for per-head
    queries q (B, H, L, D) and keys = (S, Sk): the S keys the masks cover and the Sk >= S that the
    add_bias_kv / add_zero_attn keys make."""
    S, Sk = keys
    _check_masks(attn_mask, key_padding_mask, q.shape[:3], S, unbatched)
    if unbatched and key_padding_mask is not None:
        key_padding_mask = key_padding_mask[None]  # (S,) -> (1, S)
    attn_mask, key_padding_mask = _pad_keys(attn_mask, Sk - S), _pad_keys(key_padding_mask, Sk - S)
    causal = False
    if is_causal and key_padding_mask is None:
        # torch drops attn_mask here and applies a top-left causal mask over all Sk keys
        attn_mask, causal = _top_left_causal(q.shape[2], Sk, q.device)
    return (causal, *_mask_bias(attn_mask, key_padding_mask, q.shape[:2], q.dtype))


def _check_masks(attn_mask, key_padding_mask, batch_heads_queries, S, unbatched):
    """torch.nn.MultiheadAttention's rules for its masks, with errors naming the argument."""
    B, H, L = batch_heads_queries
    shapes = {
        "key_padding_mask": [(S,)] if unbatched else [(B, S)],
        "attn_mask": [(L, S), (H, L, S)] if unbatched else [(L, S), (B * H, L, S)],
    }
    for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if mask is None:
            continue
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"FusedMultiheadAttention: {name} must be bool or floating-point, got {mask.dtype}")
        if tuple(mask.shape) not in shapes[name]:
            expected = " or ".join(map(str, shapes[name]))
            raise ValueError(f"FusedMultiheadAttention: {name} must have shape {expected}, got {tuple(mask.shape)}")


def _pad_keys(mask, extra):
    """A torch-convention mask (.., S) with `extra` appended keys that every query may attend (.., S + extra)."""
    return mask if mask is None or extra == 0 else F.pad(mask, (0, extra))


def _top_left_causal(Lq, Lk, device):
    """(attn_mask, causal) for torch's top-left causal pattern: fastlm's causal flag when it is the same
    pattern (Lq == Lk; fastlm aligns bottom-right), else an explicit (Lq, Lk) bool mask, True = masked."""
    if Lq == Lk:
        return None, True
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).triu(1), False


def _mask_bias(attn_mask, key_padding_mask, batch_heads, dtype):
    """torch's masks as fastlm.attention arguments: (keep, bias, dead).

    attn_mask (L, S) or (B*H, L, S) and key_padding_mask (B, S): bool with True = masked, or float
    added to the scores. keep: (B, S) bool, True = attend, when a bool key_padding_mask is the only
    mask; otherwise bias: the summed additive mask, broadcastable to (B, H, L, S), with -inf replaced
    by the dtype's lowest finite value, and dead: where a query sees no key (torch returns zeros).
    """
    if attn_mask is None and key_padding_mask is None:
        return None, None, None
    if attn_mask is None and key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask, None, None
    B, H = batch_heads
    bias = 0.0
    if attn_mask is not None:
        bias = _additive(attn_mask, dtype, float("-inf"))
        bias = bias.view(B, H, *bias.shape[1:]) if bias.dim() == 3 else bias  # (B*H, L, S) -> (B, H, L, S)
    if key_padding_mask is not None:
        bias = bias + _additive(key_padding_mask, dtype, float("-inf"))[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)  # (.., L, 1)
    return None, bias.clamp_min(torch.finfo(dtype).min), dead  # dead is not tested on the host: no sync


def _additive(mask, dtype, fill=None):
    """A boolean mask (True = masked out, torch's convention) as 0 / `fill` (default: the dtype's lowest
    finite value), or an additive float mask as it is, in `dtype`."""
    if mask.dtype == torch.bool:
        fill = torch.finfo(dtype).min if fill is None else fill
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, fill)
    return mask.to(dtype)


# --------------------------------------------------------------------------- Hugging Face attention
def hf_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers AttentionMaskInterface entry for "fastlm".

    For plain causal or bidirectional masks it returns just the (B, kv_length) bool key-padding mask
    (None without padding): causality is taken from the attention module. Anything else (sliding
    windows, packed sequences, custom mask functions) falls back to the dense 4-D boolean mask.
    """
    from transformers import masking_utils as mu

    if mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function):
        if attention_mask is None:
            return None
        padding = attention_mask[:, kv_offset : kv_offset + kv_length].bool()  # (B, kv_length)
        return None if bool(padding.all()) else padding
    # transformers passes its own allow_is_causal_skip; the dense mask must never be skipped (None would make
    # hf_attention fall back to the module's plain causality, losing the window or custom pattern).
    kwargs.pop("allow_is_causal_skip", None)
    return mu.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        **kwargs,
    )


# Keyword arguments of transformers' attention interface that fastlm may ignore: they don't change the
# attention, or the mask from hf_mask already holds what they describe (sliding_window, packed
# sequences), as for transformers' own sdpa path. Any other non-None argument runs the model's eager
# attention.
_HF_IGNORED = frozenset(
    {
        "cache_position",
        "cu_seq_lens_k",
        "cu_seq_lens_q",
        "encoder_hidden_states",
        "layer_idx",
        "max_length_k",
        "max_length_q",
        "output_attentions",
        "output_hidden_states",
        "past_key_value",
        "past_key_values",
        "position_ids",
        "return_dict",
        "sliding_window",
        "token_type_ids",
        "use_cache",
    }
)


def hf_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, is_causal=None, **kwargs
):
    """transformers AttentionInterface entry for "fastlm": query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D)
    as the model computed them (after RoPE, before any GQA repeat); attention_mask from hf_mask (a (B, Lk)
    bool key-padding mask, True = attend, or a dense 4-D mask) or None; returns ((B, Lq, Hq, D), None).
    dropout draws fastlm's own mask (the model's rate, not the same mask as transformers' eager path).

    Calls that need what the fused kernel doesn't give — the attention weights (output_attentions=True)
    or an argument it doesn't implement (attention sinks, logit soft-capping, ...) — run the model's own
    eager attention instead, with a one-time warning, and return its weights.

    Padding-free batches (transformers' DataCollatorWithFlattening with return_flash_attn_kwargs=True: one
    row of packed sequences, with cu_seq_lens_q / cu_seq_lens_k / max_length_q / max_length_k) run
    fastlm.varlen_attention, each sequence attending only within itself, where it has kernels (else the
    dense mask transformers built for the packed row is used).
    """
    causal = module_causal = _hf_causal(module, is_causal)
    reason = _hf_unsupported(kwargs)
    if reason is not None:
        kwargs.update(scaling=scaling, dropout=dropout)
        if position_bias is not None:
            kwargs["position_bias"] = _dense_position_bias(position_bias)
        return _hf_eager(module, query, key, value, _eager_mask(attention_mask, causal, query, key), reason, kwargs)
    padding = bias = rel_pos = None
    if attention_mask is not None and attention_mask.dim() == 2:
        padding = attention_mask  # (B, Lk) bool from hf_mask
    elif attention_mask is not None:
        causal = False  # a dense mask (from hf_mask's fallback or the caller) already holds the pattern
        bias = _additive(~attention_mask if attention_mask.dtype == torch.bool else attention_mask, query.dtype)
    owner, cache = _rel_pos_owner.get(module, (None, None))
    if owner is not None:
        rel_pos = CachedRelativePositionBias(
            owner.relative_attention_bias.weight,
            bidirectional=not owner.is_decoder,
            max_distance=owner.relative_attention_max_distance,
            cache=cache,
        )
    elif position_bias is not None and not getattr(module, "_fastlm_zero_position_bias", False):
        bias = position_bias if bias is None else bias + position_bias
    packed = _packed_sequences(query, kwargs) if rel_pos is None and position_bias is None else None
    if packed is not None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, T, D) -> (T, H, D)
        out = varlen_attention(q, k, v, *packed, causal=module_causal, dropout_p=dropout, scale=scaling)  # (T, Hq, D)
        return out[None], None  # (T, Hq, D) -> (1, T, Hq, D)
    out = attention(
        query,
        key,
        value,
        causal=causal,
        key_padding_mask=padding,
        attn_bias=bias,
        rel_pos=rel_pos,
        dropout_p=dropout,
        scale=scaling,
    )
    return out.transpose(1, 2), None  # (B, Hq, Lq, D) -> (B, Lq, Hq, D)


def _packed_sequences(query, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a padding-free call (one row of packed
    sequences with transformers' flash-attention keyword arguments) when fastlm.varlen_attention has a
    kernel for it; else None. A sliding window keeps the dense path."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1 or kwargs.get("sliding_window") is not None:
        return None
    if not runs_varlen_kernel(query, query.shape[-1]):
        return None
    longest = (int(kwargs["max_length_q"]), int(kwargs["max_length_k"]))
    return cu_q.to(device=query.device, dtype=torch.int32), cu_k.to(device=query.device, dtype=torch.int32), *longest


def _hf_causal(module, is_causal):
    """Whether the attention is causal: the call's is_causal when given (as transformers' sdpa path
    does), else the module's `is_causal` unless its config says otherwise."""
    if is_causal is not None:
        return bool(is_causal)
    return bool(getattr(module, "is_causal", False)) and getattr(getattr(module, "config", None), "is_causal", True)


def _hf_unsupported(kwargs):
    """Why this attention call cannot run on the fused kernel, or None when it can."""
    if kwargs.get("output_attentions") or _attention_weights_recorded():
        return "output_attentions=True"
    others = sorted(name for name, value in kwargs.items() if value is not None and name not in _HF_IGNORED)
    return f"attention argument(s) {', '.join(others)}" if others else None


def _attention_weights_recorded():
    """Whether the running transformers forward records attention weights (output_attentions=True on a
    model whose attention modules are hooked rather than told)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and any(name.endswith("attentions") for name in collected)


def _hf_eager(module, query, key, value, mask, reason, kwargs):
    """The model's own eager attention (its modeling file's eager_attention_forward) for this call."""
    source = type(module).__module__
    eager = getattr(sys.modules.get(source), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"fastlm attention: {reason} is not served by the fused kernel and {source} has no "
            "eager_attention_forward to fall back to; call fastlm.unpatch(model) for such calls"
        )
    _warn_once(
        ("hf_attention", reason, source),
        f"fastlm attention: {reason} is not served by the fused kernel; these calls run {source}'s "
        "eager attention",
    )
    return eager(module, query, key, value, mask, **kwargs)


def _eager_mask(attention_mask, causal, query, key):
    """hf_mask's output as the additive float mask eager attention adds to its scores: (B or 1, 1, Lq, Lk)
    in query's dtype, the dtype's lowest value where a key is hidden; None when nothing is hidden."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return _additive(~attention_mask, query.dtype) if attention_mask.dtype == torch.bool else attention_mask
    if attention_mask is None and not causal:
        return None
    Lq, Lk = query.shape[2], key.shape[2]
    keep = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=query.device)
    if causal:
        keep = keep.tril(Lk - Lq)  # key j visible to query i iff j <= i + (Lk - Lq), as fastlm.attention
    if attention_mask is not None:
        keep = keep & attention_mask[:, None, None, :].bool()  # (B, Lk) -> (B, 1, Lq, Lk)
    return _additive(~keep, query.dtype)


def _register_hf():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, hf_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, hf_mask)


def _mark_t5_relative_bias(model):
    """Point every T5 self-attention at its stack's table (layer 0's) and bucket cache, make layer 0's
    compute_bias lazy (see _lazy_compute_bias), and mark cross-attention, whose position_bias is all zeros,
    so hf_attention uses rel_pos in the kernel and skips the dense bias."""
    marked = []
    for stack in model.modules():
        blocks = getattr(stack, "block", None)
        if not isinstance(blocks, nn.ModuleList) or not blocks:
            continue
        first = getattr(blocks[0].layer[0], "SelfAttention", None)
        if first is None or not getattr(first, "has_relative_attention_bias", False):
            continue
        _lazy_compute_bias(first)
        cache = {}
        for block in blocks:
            _rel_pos_owner[block.layer[0].SelfAttention] = first, cache
            marked.append(block.layer[0].SelfAttention)
            if len(block.layer) > 2 and hasattr(block.layer[1], "EncDecAttention"):
                block.layer[1].EncDecAttention._fastlm_zero_position_bias = True
                marked.append(block.layer[1].EncDecAttention)
    return marked


def _lazy_compute_bias(module):
    """Replace T5Attention.compute_bias on this instance. HF's layer 0 computes the dense (1, H, Lq, Lk)
    position bias of its stack (buckets of every (query, key) pair, then a table lookup) for all layers;
    hf_attention never reads it (the kernel takes the table), so while the model runs fastlm attention it
    gets a zero-strided placeholder of that shape instead, which knows how to build the real bias should
    a call fall back to eager attention (_dense_position_bias). unpatch removes the override."""
    original = module.compute_bias

    def compute_bias(query_length, key_length, *args, **kwargs):
        if module.config._attn_implementation != IMPLEMENTATION:
            return original(query_length, key_length, *args, **kwargs)
        table = module.relative_attention_bias.weight  # (num_buckets, H)
        placeholder = table.new_zeros(()).expand(1, table.shape[1], query_length, key_length)  # no memory
        placeholder._fastlm_dense = functools.partial(original, query_length, key_length, *args, **kwargs)
        return placeholder

    module.compute_bias = compute_bias


def _dense_position_bias(position_bias):
    """The position bias eager attention adds: HF's dense bias in place of _lazy_compute_bias's placeholder."""
    dense = getattr(position_bias, "_fastlm_dense", None)
    return position_bias if dense is None else dense()


# --------------------------------------------------------------------------- losses
def _capture_head(head, state):
    """Replace `head.forward` on this instance: record the head's input for the fused loss and, while a
    fused loss is pending and the logits were not asked for, return an empty (..., 0) tensor instead of
    computing them. No module is added, so parameter names and the state_dict are unchanged."""
    original = head.forward

    def forward(hidden, *args, **kwargs):
        state["hidden"] = hidden
        if state.get("labels") is not None and not state["want_logits"]:
            return hidden.new_empty((*hidden.shape[:-1], 0))
        return original(hidden, *args, **kwargs)

    head.forward = forward


def _loss_role(model):
    """(role, head attribute path) of the model's LM head, or None."""
    name = type(model).__name__
    if name in ("BertForMaskedLM", "BertForPreTraining") and hasattr(model, "cls"):
        return "masked", "cls.predictions"
    if name.endswith("ForConditionalGeneration") and hasattr(model, "lm_head") and hasattr(model, "_shift_right"):
        return "seq2seq", "lm_head"
    if (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")) and isinstance(
        getattr(model, "lm_head", None), nn.Linear
    ):
        return "causal", "lm_head"
    return None


# Config fields of causal LMs that transform the head's logits before the loss (soft-capping, scaling):
# the fused loss would skip them, so such models keep their own loss.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0}


def _logit_transform(model):
    """The name of the config field by which `model` changes its logits before the loss, or None."""
    config = getattr(model, "config", None)
    for name, identity in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != identity:
            return name
    return None


def _fused_loss(model, role, head, hidden, labels, num_items_in_batch):
    from .ops import linear_cross_entropy

    reduction = "mean" if num_items_in_batch is None else "sum"
    if role == "masked":
        keep = labels.reshape(-1) != -100
        rows = hidden.reshape(-1, hidden.shape[-1])[keep]  # (N, D): only labelled positions
        rows = head.transform(rows)
        loss = linear_cross_entropy(
            rows, head.decoder.weight, labels.reshape(-1)[keep], head.decoder.bias, reduction=reduction
        )
    else:
        if role == "causal":
            hidden, labels = hidden[:, :-1], labels[:, 1:]  # predict token t + 1 from position t
        rows = hidden.reshape(-1, hidden.shape[-1])  # (B*L, D)
        loss = linear_cross_entropy(rows, head.weight, labels.reshape(-1), head.bias, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _patch_loss(model, role, path):
    head = model.get_submodule(path)
    state = {"labels": None, "want_logits": True, "hidden": None}
    _capture_head(head, state)

    def before(module, args, kwargs):
        labels = kwargs.pop("labels", None)
        want_logits = kwargs.pop("return_logits", None)
        state["num_items_in_batch"] = kwargs.pop("num_items_in_batch", None)
        state["labels"], state["hidden"] = labels, None
        state["want_logits"] = (not module.training) if want_logits is None else bool(want_logits)
        if (
            labels is not None
            and role == "seq2seq"
            and kwargs.get("decoder_input_ids") is None
            and kwargs.get("decoder_inputs_embeds") is None
        ):
            kwargs["decoder_input_ids"] = module._shift_right(labels)
        return args, kwargs

    def after(module, args, kwargs, output):
        labels, state["labels"] = state["labels"], None
        if labels is None:
            return output
        loss = _fused_loss(module, role, head, state["hidden"], labels, state["num_items_in_batch"])
        next_sentence = kwargs.get("next_sentence_label")
        if next_sentence is not None and getattr(output, "seq_relationship_logits", None) is not None:
            loss = loss + F.cross_entropy(output.seq_relationship_logits.view(-1, 2), next_sentence.view(-1))
        state["hidden"] = None
        output["loss"] = loss
        output.move_to_end("loss", last=False)
        return output

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    return head, handles


# --------------------------------------------------------------------------- patch / unpatch
def _swap(model, replace, record):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replace(child)
            if new is not None:
                setattr(parent, name, new)
                record.append((parent, name, child, new))


def patch(model, *, norms=True, attention=True, loss=True, verbose=False):
    """Swap fastlm's fused layers into `model` in place; returns `model`.

    norms / attention / loss choose which kinds of layer to swap (see the module docstring). Patching
    twice is a no-op; parts fastlm doesn't know are left as they are, with a warning naming what was
    and wasn't swapped; verbose=True prints every swap. Undo with fastlm.unpatch(model).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE, None) is not None:
        return model
    state = {"swaps": [], "classes": [], "hooks": [], "heads": [], "attn_implementation": None, "marked": []}
    swapped, skipped = [], []
    if norms:
        _swap(model, _fused_norm, state["swaps"])
    if attention:
        for module in model.modules():
            if type(module) is nn.MultiheadAttention:
                module.__class__ = FusedMultiheadAttention
                state["classes"].append(module)
                swapped.append(f"{_path(model, module)}: MultiheadAttention -> fastlm FusedMultiheadAttention")
        config = getattr(model, "config", None)
        if config is not None and hasattr(model, "set_attn_implementation"):
            _register_hf()
            state["attn_implementation"] = config._attn_implementation
            try:
                model.set_attn_implementation(IMPLEMENTATION)
                state["subconfigs"] = _set_stack_configs(model, IMPLEMENTATION)
                swapped.append(f"attention implementation '{state['attn_implementation']}' -> '{IMPLEMENTATION}'")
                state["marked"] = _mark_t5_relative_bias(model)
            except (ValueError, NotImplementedError) as err:
                state["attn_implementation"] = None
                skipped.append(f"attention ({err})")
    if loss:
        role = _loss_role(model)
        transform = _logit_transform(model)
        if role is not None and transform is not None:
            skipped.append(f"loss of {type(model).__name__} (its config's {transform} changes the logits)")
        elif role is not None:
            head, handles = _patch_loss(model, *role)
            state["heads"].append(head)
            state["hooks"].extend(handles)
            swapped.append(f"{role[0]}-LM loss on {role[1]} -> fastlm.linear_cross_entropy")
        elif hasattr(model, "lm_head") or hasattr(model, "cls"):
            skipped.append(f"loss of {type(model).__name__} (no known LM-head layout)")
    for parent, name, old, new in state["swaps"]:
        swapped.append(f"{_path(model, parent, name)}: {type(old).__name__} -> fastlm {type(new).__name__}")
    skipped += _unknown_layers(model)
    if verbose:
        for line in swapped:
            print(f"fastlm.patch: {line}")
    if skipped:
        warnings.warn(
            f"fastlm.patch({type(model).__name__}): swapped {len(swapped)} part(s); left as they are: "
            + "; ".join(skipped),
            stacklevel=2,
        )
    model.__dict__[_STATE] = state
    return model


def unpatch(model):
    """Restore what fastlm.patch swapped in `model` (the same module objects as before); returns `model`."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for handle in state["hooks"]:
        handle.remove()
    for head in state["heads"]:
        head.__dict__.pop("forward", None)
    for parent, name, old, _ in reversed(state["swaps"]):
        setattr(parent, name, old)
    for module in state["classes"]:
        module.__class__ = nn.MultiheadAttention
    for module in state["marked"]:
        _rel_pos_owner.pop(module, None)
        module.__dict__.pop("_fastlm_zero_position_bias", None)
        module.__dict__.pop("compute_bias", None)
    if state["attn_implementation"] is not None:
        model.set_attn_implementation(state["attn_implementation"])
    for config, implementation in state.get("subconfigs", ()):
        config._attn_implementation = implementation
    return model


def _set_stack_configs(model, implementation):
    """Give `implementation` to the configs of submodules that hold a copy of the model's config (T5's
    encoder and decoder stacks), which set_attn_implementation leaves as they were in transformers 5.17
    (the patched T5 then ran eager attention); returns [(config, its former implementation)] for unpatch."""
    changed = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or config is model.config or type(config) is not type(model.config):
            continue
        if config._attn_implementation != implementation and all(config is not c for c, _ in changed):
            changed.append((config, config._attn_implementation))
            config._attn_implementation = implementation
    return changed


def _path(model, module, name=None):
    """Dotted path of `module` (or of its child `name`) inside `model`."""
    for path, candidate in model.named_modules():
        if candidate is module:
            full = f"{path}.{name}" if name and path else (name or path)
            return full or type(model).__name__
    return name or type(module).__name__


_KNOWN_LEAVES = (
    nn.Linear,
    nn.Embedding,
    nn.Dropout,
    nn.Identity,
    nn.modules.activation.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.SiLU,
    nn.Conv1d,
)


def _unknown_layers(model):
    """Norm- or attention-like layers that fastlm did not swap (by class name), for the warning."""
    unknown = set()
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, (fnn.LayerNorm, fnn.RMSNorm, FusedMultiheadAttention, *_KNOWN_LEAVES)):
            continue
        if ("Norm" in name and not list(module.children())) and not name.startswith("Fused"):
            unknown.add(name)
    return sorted(unknown)
