"""fastlm.nn.MultiHeadAttention: fused QKV projection + fastlm.attention + output projection."""

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.attention import RelativePositionBias, attention


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention over batch-first (B, L, E) inputs.

    The parameters are those of ``torch.nn.MultiheadAttention`` (``in_proj_weight`` (3E, E) holding the
    stacked q, k, v projections, ``in_proj_bias`` (3E,), ``out_proj``), so its state_dict loads into this
    module when ``num_kv_heads == num_heads``. With ``num_kv_heads < num_heads`` (GQA/MQA) the k and v
    rows of ``in_proj_weight`` shrink to ``num_kv_heads * head_dim`` each.

    The call is fastlm's, not torch's: ``forward(x, memory=None, *, key_keep_mask=None, attn_bias=None)``
    returns the output alone, and its mask says which keys to KEEP (True = attend), as
    ``fastlm.attention(key_padding_mask=...)`` does. torch.nn.MultiheadAttention's ``key_padding_mask``
    (and so fastlm.patch's drop-in FusedMultiheadAttention's) says which keys to IGNORE (True = ignore):
    pass ``key_keep_mask=~key_padding_mask`` when porting.

    embed_dim, num_heads: E and H (E % H == 0); num_kv_heads: Hkv (default H; H % Hkv == 0).
    dropout_p: attention-probability dropout, active in training mode only (the name fastlm.attention
        and F.scaled_dot_product_attention use; ``dropout=`` is still accepted, and ``.dropout`` reads
        and sets the same value, as on torch's module).
    bias: projections with biases (T5: False). scale: q.k scale, default 1/sqrt(head_dim) (T5: 1.0).
    causal: mask future keys (decoder self-attention).
    rel_pos_buckets: when > 0, owns T5's ``relative_attention_bias`` (nn.Embedding(rel_pos_buckets, H)),
        bidirectional unless causal, with distances capped at ``rel_pos_max_distance``.
    """

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, dropout_p=0.0, bias=True, scale=None,
                 causal=False, rel_pos_buckets=0, rel_pos_max_distance=128, device=None, dtype=None, **old_names):
        super().__init__()
        dropout_p = _renamed(old_names, "dropout", "dropout_p", dropout_p, 0.0)
        if old_names:
            raise TypeError(f"MultiHeadAttention: unexpected keyword argument(s) {', '.join(sorted(old_names))}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: embed_dim={embed_dim} is not a multiple of "
                             f"num_heads={num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"MultiHeadAttention: num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout_p, self.scale, self.causal = dropout_p, scale, causal
        kv_dim = num_kv_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.relative_attention_bias = (nn.Embedding(rel_pos_buckets, num_heads, **factory)
                                        if rel_pos_buckets > 0 else None)
        self.rel_pos_max_distance = rel_pos_max_distance
        self.reset_parameters()

    @property
    def dropout(self):
        """The attention dropout rate under torch.nn.MultiheadAttention's attribute name (= dropout_p)."""
        return self.dropout_p

    @dropout.setter
    def dropout(self, value):
        self.dropout_p = value

    def reset_parameters(self):
        """torch.nn.MultiheadAttention's initialisation (out_proj keeps nn.Linear's own)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, memory=None, *, key_keep_mask=None, attn_bias=None, **old_names):
        """x: (B, Lq, E); memory: (B, Lk, E) for cross-attention (default: x, self-attention); float32 /
        float16 / bfloat16 like the module's parameters.

        key_keep_mask: (B, Lk) bool, True = ATTEND to that key (fastlm's convention; torch's
            key_padding_mask is its negation). ``key_padding_mask=`` is its former name, still accepted
            with this same True = attend meaning.
        attn_bias: float, added to the scores, broadcastable to (B, H, Lq, Lk).
        Returns (B, Lq, E) in x's dtype.
        """
        key_keep_mask = _renamed(old_names, "key_padding_mask", "key_keep_mask", key_keep_mask, None)
        if old_names:
            raise TypeError(f"MultiHeadAttention.forward: unexpected keyword argument(s) "
                            f"{', '.join(sorted(old_names))}")
        B, Lq, E = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if memory is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, (H + 2 Hkv) D)
            q, kv = qkv.split([H * D, 2 * Hkv * D], dim=-1)
        else:
            w_q, w_kv = self.in_proj_weight.split([H * D, 2 * Hkv * D])
            b_q = b_kv = None
            if self.in_proj_bias is not None:
                b_q, b_kv = self.in_proj_bias.split([H * D, 2 * Hkv * D])
            q = F.linear(x, w_q, b_q)  # (B, Lq, H D)
            kv = F.linear(memory, w_kv, b_kv)  # (B, Lk, 2 Hkv D)
        q = q.unflatten(-1, (H, D)).transpose(1, 2)  # (B, Lq, H, D) -> (B, H, Lq, D), a view
        k, v = kv.unflatten(-1, (2, Hkv, D)).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, Hkv, Lk, D), views
        rel_pos = None
        if self.relative_attention_bias is not None:
            rel_pos = RelativePositionBias(self.relative_attention_bias.weight, bidirectional=not self.causal,
                                           max_distance=self.rel_pos_max_distance)
        out = attention(q, k, v, causal=self.causal, key_padding_mask=key_keep_mask, attn_bias=attn_bias,
                        rel_pos=rel_pos, dropout_p=self.dropout_p if self.training else 0.0, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, Lq, E)  # (B, H, Lq, D) -> (B, Lq, H, D) -> (B, Lq, E)
        return self.out_proj(out)


def _renamed(old_names, old, new, value, default):
    """`value` of the argument `new`, or the one passed under its former name `old` (popped from
    `old_names`, with a DeprecationWarning); passing both is an error."""
    if old not in old_names:
        return value
    if (value is not None) if default is None else (value != default):
        raise TypeError(f"MultiHeadAttention: pass {new}= only ({old}= is its former name)")
    warnings.warn(f"MultiHeadAttention: {old}= is now called {new}= (same meaning)", DeprecationWarning,
                  stacklevel=3)
    return old_names.pop(old)
