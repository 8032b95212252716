"""Small pieces every model file uses: activations by their HF names, input checks, initialisation, packed
(unpadded) sequences."""

import dataclasses
import math
import types
import typing

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import LayerNorm, RMSNorm
from ..ops.padding import pad, unpad
from ..ops.varlen_attention import VARLEN_ATTENTION

__all__ = [
    "HFConfig",
    "PackedSequences",
    "activation",
    "attention_mask_bool",
    "check_ids",
    "check_labels",
    "check_length",
    "check_same_shape",
    "has_holes",
    "init_normal",
    "key_padding_mask",
    "run_unpadded",
    "runs_varlen_kernel",
    "scaled_std",
]


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu, "silu": F.silu}


def activation(name):
    """The activation function HF calls `name` ("gelu" is erf GELU; "gelu_new" is the tanh one)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; expected one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def check_ids(ids, vocab_size, name="input_ids", *, table="the vocabulary"):
    """Raise unless ``ids`` is an int64 or int32 (B, L) tensor, L >= 1, with values in [0, vocab_size) (the
    rows of ``table``). TypeError for a non-tensor or another dtype, ValueError for a bad shape or value."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor (B, L), got a {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (B, L) of dtype int64 or int32, got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, L) with L >= 1, got {tuple(ids.shape)}")
    if ids.numel():
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds ids in [{low}, {high}], outside {table} [0, {vocab_size})")


def check_labels(labels, vocab_size):
    """Raise unless ``labels`` is an integer (B, L) tensor of token ids in [0, vocab_size) or -100 (ignored)."""
    ids = labels.masked_fill(labels == -100, 0) if isinstance(labels, torch.Tensor) else labels
    check_ids(ids, vocab_size, "labels (where not -100)")


def check_length(length, max_positions, name="input_ids"):
    """Raise ValueError when a sequence of ``length`` tokens does not fit the position table."""
    if length > max_positions:
        raise ValueError(f"{name} has {length} positions but the model's position table holds {max_positions}")


def check_same_shape(tensor, name, shape, expected="(B, L)"):
    """Raise unless ``tensor`` is a tensor of ``shape`` (described as ``expected`` in the message)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {expected}, got a {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {expected} = {tuple(shape)}, got {tuple(tensor.shape)}")


def _as_bool(attention_mask, shape, expected, name):
    """HF's attention_mask as a bool mask (True = attend), and for a non-bool one the 0-dim bool tensor saying
    whether it holds only 0 and 1 (not read back yet: the caller reads it with whatever else it needs)."""
    check_same_shape(attention_mask, name, shape, expected)
    if attention_mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating, got dtype {attention_mask.dtype}")
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    return attention_mask != 0, ((attention_mask == 0) | (attention_mask == 1)).all()


def _check_values(valid, name):
    """Raise ValueError unless ``valid`` (read back) is True: the mask held a value other than 0 and 1."""
    if not valid:
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (token), got other values")


def attention_mask_bool(attention_mask, shape, expected="(B, L)", name="attention_mask"):
    """HF's attention_mask of ``shape``, 1 = token / 0 = padding (bool, integer or floating), as a bool
    tensor, True = attend. Any other value is a ValueError (an additive 0 / -inf mask would otherwise
    silently attend to the padding)."""
    mask, valid = _as_bool(attention_mask, shape, expected, name)
    if valid is not None:
        _check_values(bool(valid), name)
    return mask


def key_padding_mask(attention_mask, shape, expected="(B, L)", name="attention_mask"):
    """HF's attention_mask (see ``attention_mask_bool``) as fastlm.attention's bool key_padding_mask; None
    when absent or when every key is attended (the kernels then skip the mask). One host sync."""
    if attention_mask is None:
        return None
    mask, valid = _as_bool(attention_mask, shape, expected, name)
    facts = [mask.all()] if valid is None else [mask.all(), valid]
    full, *checked = torch.stack(facts).tolist()  # the one host sync
    if checked:
        _check_values(checked[0], name)
    return None if full else mask


def init_normal(module, std):
    """HF's BERT/GPT-2 initialisation: Linear and Embedding weights N(0, std) (padding rows 0), biases 0,
    norms 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, (LayerNorm, RMSNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def scaled_std(std, num_layers):
    """GPT-2's residual-projection init: std / sqrt(2 * num_layers)."""
    return std / math.sqrt(2 * num_layers)


class HFConfig:
    """Mixin of the dataclass configs: field names are HF's, so converting is a rename-free copy.

    Subclasses set ``model_type`` (HF's), ``PRESETS`` (name -> field overrides) and may override
    ``_check_hf`` to reject HF options the model does not implement and ``_check_values`` to reject values
    the model cannot be built with (checked at construction, after the field types).
    """

    def __post_init__(self):
        self._check_types()
        self._check_values()

    def _check_values(self):
        pass

    def _check_activation(self, field, name=None):
        """ValueError naming ``field`` unless its activation (``name``, default: the field's value) exists."""
        try:
            activation(getattr(self, field) if name is None else name)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}.{field}={getattr(self, field)!r}: {err}") from None

    def _check_token_ids(self, *fields):
        """ValueError unless each of ``fields`` holds a token id in [0, vocab_size)."""
        for field in fields:
            value = getattr(self, field)
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{type(self).__name__}.{field}={value} is outside the vocabulary [0, {self.vocab_size})"
                )

    def _check_heads(self, width, heads):
        """ValueError unless field ``heads`` is >= 1 and divides field ``width`` (the attention head split)."""
        w, h = getattr(self, width), getattr(self, heads)
        if h < 1 or w % h:
            raise ValueError(f"{type(self).__name__}: {width}={w} is not a multiple of {heads}={h} (>= 1)")

    def _check_types(self):
        """TypeError / ValueError unless every field holds a value of its annotated type (an int is a valid
        float; a bool is not a number) and the counts (int fields other than token ids) are >= 0."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
            ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
            ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                expected = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise TypeError(f"{type(self).__name__}.{f.name} must be {expected}, got {value!r}")
            if type(value) is int and not f.name.endswith("_id") and value < 0:
                raise ValueError(f"{type(self).__name__}.{f.name} must be >= 0, got {value}")

    @classmethod
    def preset(cls, name, **overrides):
        """The config of a named preset (see ``PRESETS``), with ``overrides`` applied."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; expected one of {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, config):
        """The config of an HF config dict (config.json's content)."""
        cls._check_hf(config)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        if "id2label" in config and "num_labels" in names:
            values["num_labels"] = len(config["id2label"])
        return cls(**values)

    @classmethod
    def _check_hf(cls, config):
        pass

    def to_hf(self, architecture):
        """The HF config dict (written as config.json) of this config for class ``architecture``."""
        config = dataclasses.asdict(self)
        if "num_labels" in config:
            num_labels = config.pop("num_labels")
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        return {**config, "model_type": self.model_type, "architectures": [architecture]}


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Where the sequences of a packed (T, ...) batch of tokens are (``fastlm.unpad``'s): cu_seqlens (B + 1,)
    int32 prefix sums of their lengths, max_seqlen the longest. Layers given one instead of a key padding
    mask run ``fastlm.varlen_attention``. ``pack`` also records where the tokens came from (indices (T,) into
    the flattened (B, L) batch, None when it had no padding; shape (B, L)) so that ``pad`` can put them back."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor | None = None
    shape: tuple[int, int] | None = None

    @classmethod
    def pack(cls, x, mask):
        """(packed (T, ...), its PackedSequences) of the real tokens of x (B, L, ...); mask (B, L) bool, True =
        real token, or None: no padding (the packed tokens are then a view of x)."""
        B, L = x.shape[:2]
        if mask is None:
            cu_seqlens = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=x.device)  # (B + 1,)
            return x.flatten(0, 1), cls(cu_seqlens, L, None, (B, L))  # (B, L, ...) -> (B * L, ...)
        packed, indices, cu_seqlens, max_seqlen = unpad(x, mask)  # (T, ...)
        return packed, cls(cu_seqlens, max_seqlen, indices, (B, L))

    def pad(self, packed):
        """packed (T, ...) tokens scattered back to (B, L, ...), zeros at the padding (differentiable)."""
        if self.indices is None:
            return packed.unflatten(0, self.shape)  # (B * L, ...) -> (B, L, ...)
        return pad(packed, self.indices, *self.shape)  # (T, ...) -> (B, L, ...)


def run_unpadded(layers, x, mask):
    """layers(packed, sequences) on the real tokens of x (B, L, E), packed (T, E) with their PackedSequences;
    the result scattered back to (B, L, E) with zeros at the padding. mask: (B, L) bool, True = real token."""
    packed, sequences = PackedSequences.pack(x, mask)  # (T, E)
    return sequences.pad(layers(packed, sequences))  # (T, E) -> (B, L, E)


def has_holes(mask):
    """Whether a row of mask (B, L) bool (True = real token) has padding between two real tokens: packing its
    tokens would then bring them closer, which changes relative positions (T5). One host sync."""
    L = mask.shape[1]
    position = torch.arange(L, device=mask.device)  # (L,)
    first = torch.where(mask, position, L).amin(dim=1)  # (B,) L for a row without tokens
    last = torch.where(mask, position, -1).amax(dim=1)  # (B,) -1 for a row without tokens
    return bool(((last - first + 1).clamp(min=0) != mask.sum(dim=1)).any())


def runs_varlen_kernel(x, head_dim):
    """Whether fastlm.varlen_attention would run a kernel, not the reference, on tensors like x (its device
    and dtype) with the backend dispatch picks or the one use_backend forces: the models unpad only then."""
    try:
        backend = VARLEN_ATTENTION.select("varlen_attention", x.device, x.dtype, head_dim=head_dim, count=False)
        return backend != "reference"
    except RuntimeError:  # a forced backend without varlen kernels: the padded path runs on it
        return False
