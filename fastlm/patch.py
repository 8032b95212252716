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
  T5's relative-position bias computed inside the kernel from the stack's table); torch.nn.
  MultiheadAttention (alone or inside nn.TransformerEncoderLayer) becomes FusedMultiheadAttention.
- loss: masked-LM heads (BERT), causal-LM heads (GPT-2, Llama-family: anything with an `lm_head`
  named *ForCausalLM / *LMHeadModel) and seq2seq LM heads (T5) compute their loss with
  fastlm.linear_cross_entropy on the hidden states and the (tied) head weight, so the logits of all
  rows are never materialised while training. The logits are still returned in eval mode, or when
  the call passes `return_logits=True`.
"""

import warnings
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from . import nn as fnn
from .ops.attention import RelativePositionBias, attention

__all__ = ["FusedMultiheadAttention", "patch", "unpatch"]

IMPLEMENTATION = "fastlm"
_STATE = "_fastlm_patch"  # instance attribute holding what patch() changed, for unpatch()
_rel_pos_owner = weakref.WeakKeyDictionary()  # T5 self-attention module -> the stack's first attention


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


# --------------------------------------------------------------------------- torch.nn.MultiheadAttention
class FusedMultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose forward runs fastlm.attention. fastlm.patch turns a module into
    one in place (its class is switched; it keeps its Parameters and state), unpatch switches it back.
    Attention weights are never returned (the second output is None), as with need_weights=False."""

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
        """Arguments as torch.nn.MultiheadAttention.forward; returns (output, None)."""
        if not self.batch_first and query.dim() == 3:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (L, B, E) -> (B, L, E)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]  # (1, L, E)
        E, H = self.embed_dim, self.num_heads
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        B, Lq, Lk = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, w_q, b_q).view(B, Lq, H, E // H).transpose(1, 2)  # (B, H, Lq, D)
        k = F.linear(key, w_k, b_k).view(B, Lk, H, E // H).transpose(1, 2)  # (B, H, Lk, D)
        v = F.linear(value, w_v, b_v).view(B, Lk, H, E // H).transpose(1, 2)  # (B, H, Lk, D)
        if self.bias_k is not None:
            raise NotImplementedError("FusedMultiheadAttention: add_bias_kv is not supported")
        padding = None if key_padding_mask is None else _keep_mask(key_padding_mask)
        bias = None
        if attn_mask is not None:
            bias = _additive(attn_mask, q.dtype)
            bias = bias.view(B, H, Lq, Lk) if bias.dim() == 3 else bias  # (B*H, Lq, Lk) -> (B, H, Lq, Lk)
        dropout = self.dropout if self.training else 0.0
        out = attention(
            q, k, v, causal=is_causal and attn_mask is None, key_padding_mask=padding, attn_bias=bias, dropout_p=dropout
        )
        out = out.transpose(1, 2).reshape(B, Lq, E)  # (B, H, Lq, D) -> (B, Lq, E)
        out = self.out_proj(out)
        if unbatched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)  # (B, L, E) -> (L, B, E)
        return out, None


def _keep_mask(key_padding_mask):
    """torch's key_padding_mask (True or -inf = ignore) as fastlm's (True = attend)."""
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask
    return key_padding_mask == 0


def _additive(mask, dtype):
    """A boolean mask (True = masked out, torch's convention) or an additive float mask as a float bias."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, torch.finfo(dtype).min)
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


def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """transformers AttentionInterface entry for "fastlm": query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D)
    as the model computed them (after RoPE, before any GQA repeat); returns ((B, Lq, Hq, D), None)."""
    causal = bool(getattr(module, "is_causal", False)) and getattr(getattr(module, "config", None), "is_causal", True)
    padding = bias = rel_pos = None
    if attention_mask is not None and attention_mask.dim() == 2:
        padding = attention_mask  # (B, Lk) bool from hf_mask
    elif attention_mask is not None:
        causal = False  # a dense mask (from hf_mask's fallback or the caller) already holds the pattern
        bias = _additive(~attention_mask if attention_mask.dtype == torch.bool else attention_mask, query.dtype)
    owner = _rel_pos_owner.get(module)
    if owner is not None:
        rel_pos = RelativePositionBias(
            owner.relative_attention_bias.weight,
            bidirectional=not owner.is_decoder,
            max_distance=owner.relative_attention_max_distance,
        )
    elif position_bias is not None and not getattr(module, "_fastlm_zero_position_bias", False):
        bias = position_bias if bias is None else bias + position_bias
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


def _register_hf():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, hf_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, hf_mask)


def _mark_t5_relative_bias(model):
    """Point every T5 self-attention at its stack's table (layer 0's), and mark cross-attention, whose
    position_bias is all zeros, so hf_attention uses rel_pos in the kernel and skips the dense bias."""
    marked = []
    for stack in model.modules():
        blocks = getattr(stack, "block", None)
        if not isinstance(blocks, nn.ModuleList) or not blocks:
            continue
        first = getattr(blocks[0].layer[0], "SelfAttention", None)
        if first is None or not getattr(first, "has_relative_attention_bias", False):
            continue
        for block in blocks:
            _rel_pos_owner[block.layer[0].SelfAttention] = first
            marked.append(block.layer[0].SelfAttention)
            if len(block.layer) > 2 and hasattr(block.layer[1], "EncDecAttention"):
                block.layer[1].EncDecAttention._fastlm_zero_position_bias = True
                marked.append(block.layer[1].EncDecAttention)
    return marked


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
                swapped.append(f"attention implementation '{state['attn_implementation']}' -> '{IMPLEMENTATION}'")
                state["marked"] = _mark_t5_relative_bias(model)
            except (ValueError, NotImplementedError) as err:
                state["attn_implementation"] = None
                skipped.append(f"attention ({err})")
    if loss:
        role = _loss_role(model)
        if role is not None:
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
    if state["attn_implementation"] is not None:
        model.set_attn_implementation(state["attn_implementation"])
    return model


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
