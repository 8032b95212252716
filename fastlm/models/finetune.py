"""Fine-tuning helpers: freeze all but named parts, linear probing, a new head on a pretrained body.

Names are parameter-name prefixes as ``model.named_parameters()`` spells them, e.g. "classifier",
"bert.encoder.layer.11", "bert.pooler".
"""

from torch import nn

__all__ = ["freeze_all_but", "linear_probe", "new_head", "trainable_parameters"]


def _matches(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_all_but(model, names):
    """Set requires_grad=False on every parameter except those under the prefixes in ``names``.

    Returns the names of the parameters left trainable. A prefix that names no parameter is a ValueError
    (a typo would otherwise freeze everything silently).
    """
    names = [names] if isinstance(names, str) else list(names)
    params = dict(model.named_parameters())
    for prefix in names:
        if not any(_matches(n, [prefix]) for n in params):
            raise ValueError(f"freeze_all_but: {prefix!r} names no parameter of {type(model).__name__}")
    trainable = []
    for name, p in params.items():
        p.requires_grad_(_matches(name, names))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def trainable_parameters(model):
    """The parameters with requires_grad, for the optimizer (``torch.optim.AdamW(trainable_parameters(m))``)."""
    return [p for p in model.parameters() if p.requires_grad]


def new_head(model, name, out_features, *, std=None):
    """Replace the nn.Linear at attribute path ``name`` (e.g. "classifier") by a fresh one with
    ``out_features`` outputs (same input size, bias, device and dtype), initialised N(0, std) with zero bias
    (std: the config's initializer_range, else 0.02). Updates ``config.num_labels`` for "classifier".
    Returns the new module.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr, None)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"new_head: {name!r} is not an nn.Linear of {type(model).__name__} (got {type(old).__name__})")
    std = std if std is not None else getattr(getattr(model, "config", None), "initializer_range", 0.02)
    head = nn.Linear(
        old.in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    nn.init.normal_(head.weight, std=std)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    setattr(parent, attr, head)
    if name == "classifier" and hasattr(getattr(model, "config", None), "num_labels"):
        model.config.num_labels = out_features
    return head


def linear_probe(model, head="classifier", out_features=None):
    """Linear probing: train only ``head`` on a frozen body. With ``out_features``, the head is first
    replaced by a fresh one of that size (``new_head``). Returns the trainable parameters (the head's)."""
    if out_features is not None:
        new_head(model, head, out_features)
    freeze_all_but(model, [head])
    return trainable_parameters(model)
