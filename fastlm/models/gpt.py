"""GPT-2 on fastlm's kernels: pre-LN decoder with causal fused attention and fused residual + LayerNorm,
a tied LM head trained through fastlm.linear_cross_entropy, and generate() with a KV cache.

Parameter names are Hugging Face's (``transformer.h.0.attn.c_attn.weight``, ...). HF stores GPT-2's
projections as Conv1D weights (in, out); here they are nn.Linear (out, in), transposed on load and save.
Shapes: B batch, L sequence, E hidden, H heads, D head dim, V vocabulary.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..data.packing import document_sequences
from ..nn import LayerNorm
from ..ops.attention import attention
from ..ops.varlen_attention import varlen_attention
from ._common import (
    HFConfig,
    PackedSequences,
    activation,
    attention_mask_bool,
    check_ids,
    check_length,
    check_same_shape,
    init_normal,
    key_padding_mask,
    scaled_std,
)
from .generation import GenerationMixin, KVCache
from .hub import PretrainedMixin

__all__ = ["GPTConfig", "GPTLMHeadModel", "GPTModel", "GPTOutput"]

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPTConfig(HFConfig):
    """GPT-2's hyper-parameters, named as in HF's GPT2Config."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # default 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    model_type: ClassVar[str] = "gpt2"
    PRESETS: ClassVar[dict] = {
        "gpt2": {},
        "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
        "gpt2-tiny": {"n_embd": 128, "n_layer": 2, "n_head": 2, "n_positions": 256},
    }

    def _check_values(self):
        self._check_heads("n_embd", "n_head")
        self._check_activation("activation_function")

    @classmethod
    def _check_hf(cls, config):
        unsupported = {
            "scale_attn_weights": False,
            "scale_attn_by_inverse_layer_idx": True,
            "add_cross_attention": True,
            "tie_word_embeddings": False,
        }
        for key, value in unsupported.items():
            if key in config and config[key] == value:
                raise ValueError(f"GPTConfig: {key}={value} is not supported")


@dataclass
class GPTOutput:
    """loss: scalar next-token loss (with labels); logits: (B, L, V) (without labels); last_hidden_state:
    (B, L, E)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class GPTAttention(nn.Module):
    """Causal self-attention: fused QKV projection, fastlm.attention, output projection."""

    def __init__(self, config):
        super().__init__()
        E = config.n_embd
        self.n_head = config.n_head
        self.c_attn = nn.Linear(E, 3 * E)
        self.c_proj = nn.Linear(E, E)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, mask, cache=None, layer=0):
        """x (B, L, E) with mask the (B, Lk) key padding mask or None; or packed tokens x (T, E) with mask
        their PackedSequences (documents attending only within themselves)."""
        H = self.n_head
        dropout_p = self.attn_pdrop if self.training else 0.0
        if isinstance(mask, PackedSequences):
            T, E = x.shape
            q, k, v = self.c_attn(x).view(T, 3, H, E // H).unbind(1)  # (T, 3E) -> (T, 3, H, D) -> 3 x (T, H, D)
            cu, longest = mask.cu_seqlens, mask.max_seqlen
            out = varlen_attention(q, k, v, cu, cu, longest, longest, causal=True, dropout_p=dropout_p)
            return self.resid_dropout(self.c_proj(out.reshape(T, E)))  # (T, H, D) -> (T, E)
        B, L, E = x.shape
        q, k, v = self.c_attn(x).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, H, Lk, D), the past and these L positions
        out = attention(q, k, v, causal=True, key_padding_mask=mask, dropout_p=dropout_p)  # (B, H, L, D)
        out = out.transpose(1, 2).reshape(B, L, E)  # (B, H, L, D) -> (B, L, H, D) -> (B, L, E)
        return self.resid_dropout(self.c_proj(out))


class GPTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.act = activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPTBlock(nn.Module):
    """Pre-LN block, written with the fused add + LayerNorm: it takes the previous sub-layer's output x
    and the residual stream before it, and returns its MLP output and the updated stream."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTMLP(config)

    def forward(self, x, residual, mask, cache=None, layer=0):
        h, residual = self.ln_1(x, residual=residual, return_residual=True)  # residual += x; h = LN(residual)
        h, residual = self.ln_2(self.attn(h, mask, cache, layer), residual=residual, return_residual=True)
        return self.mlp(h), residual


class GPTModel(nn.Module):
    """The GPT-2 body: token + learned position embeddings, blocks, final LayerNorm.

    forward(input_ids (B, L), attention_mask (B, Lk) 1 = token / 0 = padding over past + new keys,
    position_ids (B, L) or None (past length + arange), cache: a KVCache or None, sequences: a
    PackedSequences over the B * L tokens (row order) whose sequences attend only within themselves, e.g.
    documents packed into blocks (``fastlm.data.document_sequences``; needs their position_ids)) -> (B, L, E).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, sequences=None):
        check_ids(input_ids, self.config.vocab_size)
        B, L = input_ids.shape
        if sequences is not None:
            return self._packed(input_ids, position_ids, sequences, attention_mask, cache)
        past = cache.length() if cache is not None else 0
        if position_ids is None:
            check_length(past + L, self.config.n_positions)
            position_ids = torch.arange(past, past + L, device=input_ids.device)[None, :]  # (1, L)
        else:
            self._check_positions(position_ids, B, L)
        mask = key_padding_mask(attention_mask, (B, past + L), "(B, past + L)")  # (B, Lk) bool or None
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, L, E)
        residual = None
        for i, block in enumerate(self.h):
            x, residual = block(x, residual, mask, cache, i)
        return self.ln_f(x, residual=residual)  # (B, L, E)

    def _packed(self, input_ids, position_ids, sequences, attention_mask, cache):
        """forward over the B * L tokens of input_ids split into ``sequences``."""
        if not isinstance(sequences, PackedSequences) or position_ids is None or attention_mask is not None or cache:
            raise ValueError(
                "sequences must be a PackedSequences given with their position_ids, and without attention_mask "
                "or cache"
            )
        B, L = input_ids.shape
        self._check_positions(position_ids, B, L)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids)).flatten(0, 1)  # (B, L, E) -> (B * L, E)
        residual = None
        for i, block in enumerate(self.h):
            x, residual = block(x, residual, sequences, None, i)
        return self.ln_f(x, residual=residual).unflatten(0, (B, L))  # (B * L, E) -> (B, L, E)

    def _check_positions(self, position_ids, B, L):
        """position_ids: integer (B, L) or (1, L), each in [0, n_positions)."""
        check_ids(position_ids, self.config.n_positions, "position_ids", table="the position table")
        if position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
            raise ValueError(
                f"position_ids must have shape (B, L) = {(B, L)} or (1, L), got {tuple(position_ids.shape)}"
            )


class GPTLMHeadModel(GenerationMixin, PretrainedMixin, nn.Module):
    """GPT-2 with its LM head tied to the token embeddings.

    forward(input_ids (B, L), attention_mask=None, labels=None, position_ids=None, document_starts=None): with
    labels (B, L) (-100 = ignored; shifted inside: position t predicts labels[t + 1]) the mean next-token loss
    through fastlm.linear_cross_entropy, no (B, L, V) logits formed; without, logits (B, L, V).
    document_starts (B, L) bool: documents packed into the rows attend only within themselves (True where one
    begins, and at each row's first token; ``fastlm.data.pack_blocks(..., document_starts=True)``), their
    positions restarting at 0 unless position_ids is given; one host sync reads the longest document.

    generate (GenerationMixin.generate) continues prompts (B, L) batched with LEFT padding and returns the
    prompts then the new tokens; by default it runs max_new_tokens (no EOS) and pads finished rows with EOS.
    """

    config_class = GPTConfig
    hf_architecture = "GPT2LMHeadModel"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = GPTModel(config)
        init_normal(self, config.initializer_range)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, std=scaled_std(config.initializer_range, config.n_layer))

    def hf_keys(self):
        return {"prefix": "transformer.", "dropped": ("lm_head.",), "buffers": (".attn.bias", ".attn.masked_bias")}

    @staticmethod
    def _state_from_hf(state_dict):
        return {k: v.t() if k.endswith(_CONV1D) else v for k, v in state_dict.items()}

    _state_to_hf = _state_from_hf

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, document_starts=None):
        sequences = None
        if document_starts is not None:
            check_same_shape(document_starts, "document_starts", input_ids.shape)
            positions, cu_seqlens, max_seqlen = document_sequences(document_starts.bool())
            position_ids = positions if position_ids is None else position_ids
            sequences = PackedSequences(cu_seqlens, max_seqlen)
        h = self.transformer(input_ids, attention_mask, position_ids, sequences=sequences)  # (B, L, E)
        weight = self.transformer.wte.weight  # (V, E), tied
        if labels is None:
            return GPTOutput(logits=F.linear(h, weight), last_hidden_state=h)
        if tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
            )
        E = h.shape[-1]
        loss = ops.linear_cross_entropy(h[:, :-1].reshape(-1, E), weight, labels[:, 1:].reshape(-1))
        return GPTOutput(loss=loss, last_hidden_state=h)

    def _special_ids(self, eos_token_id, pad_token_id):
        """generate's defaults: no EOS (run max_new_tokens); finished rows padded with pad_token_id, else EOS."""
        eos_token_id = None if eos_token_id == "default" else eos_token_id
        return eos_token_id, pad_token_id if pad_token_id is not None else eos_token_id

    def _start_decoding(self, input_ids, attention_mask, max_new_tokens):
        """For ``generate`` (see GenerationMixin): the prompts (B, L), LEFT padded when their lengths differ
        (positions count tokens only, as HF does), each with at least one token; they and max_new_tokens
        must fit the position table."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise ValueError(
                f"generate: input_ids must hold at least one token per prompt (e.g. the BOS token, "
                f"config.bos_token_id={self.config.bos_token_id}), got shape {tuple(input_ids.shape)}"
            )
        check_ids(input_ids, self.config.vocab_size)
        B, L = input_ids.shape
        tokens = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask_bool(attention_mask, (B, L))
        )
        if not bool(tokens[:, -1].all()):
            raise ValueError("generate: attention_mask must be 1 in the last column (pad prompts on the LEFT)")
        mask = tokens.long()  # (B, L), grows by one column per step
        self._check_fits(mask.sum(-1), max_new_tokens)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): left padding does not shift positions
        cache = KVCache(L + max_new_tokens)
        weight = self.transformer.wte.weight
        h = self.transformer(input_ids, mask, positions, cache)  # (B, L, E)
        state = {"mask": mask, "position": positions[:, -1:]}

        def step(tokens):  # (B, 1) -> (B, V)
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(B, 1)], dim=1)  # (B, Lk)
            state["position"] = state["position"] + 1  # (B, 1)
            h = self.transformer(tokens, state["mask"], state["position"], cache)  # (B, 1, E)
            return F.linear(h[:, -1], weight)

        return input_ids, F.linear(h[:, -1], weight), step

    def _check_fits(self, lengths, max_new_tokens):
        """ValueError when the longest prompt of lengths (B,) tokens and the new ones (the last one needs no
        position) run past the position table."""
        longest = int(lengths.max()) if lengths.numel() else 0
        fit = self.config.n_positions - longest + 1
        if max_new_tokens > fit:
            raise ValueError(
                f"generate: max_new_tokens={max_new_tokens} after a prompt of {longest} tokens runs past the "
                f"position table (n_positions={self.config.n_positions}); at most {fit} new tokens fit"
            )
