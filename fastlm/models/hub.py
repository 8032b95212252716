"""Hugging Face checkpoint I/O, offline: ``config.json`` + ``model.safetensors`` with HF's key names.

A model class of fastlm.models names its parameters exactly as the HF class it mirrors, so loading is a
checked ``load_state_dict``: keys are matched by name, the tied ones (saved once by HF) are skipped, and
anything else that is missing or unexpected is an error that lists the keys. Family-specific layout
changes (GPT-2's transposed Conv1D weights) are done by the model file before and after these calls.
"""

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .._optional import require

__all__ = ["PretrainedMixin", "load_state_dict_checked", "read_checkpoint", "write_checkpoint"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def read_checkpoint(source, model_type):
    """The HF config (dict) and state_dict (name -> tensor) of ``source``.

    source: a directory written by ``save_pretrained`` (HF's or fastlm's; a sharded checkpoint with
        ``model.safetensors.index.json`` works too) or an HF ``PreTrainedModel`` instance.
    model_type: the expected ``config.model_type`` ("bert", "gpt2", "t5"); another one is a ValueError.
    """
    load_file = require("safetensors.torch", "models", "reading a checkpoint").load_file

    if isinstance(source, nn.Module):
        if not hasattr(source, "config"):
            raise TypeError(
                f"from_pretrained: expected a directory or a Hugging Face model, got a "
                f"{type(source).__name__} without a .config"
            )
        config = source.config.to_dict()
        state_dict = {k: v.detach() for k, v in source.state_dict().items()}
    else:
        directory = Path(source)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"from_pretrained: no {CONFIG_NAME} in {directory}")
        config = json.loads((directory / CONFIG_NAME).read_text())
        if (directory / WEIGHTS_NAME).is_file():
            state_dict = load_file(directory / WEIGHTS_NAME)
        elif (directory / WEIGHTS_INDEX_NAME).is_file():
            shards = sorted(set(json.loads((directory / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict.update(load_file(directory / shard))
        else:
            raise FileNotFoundError(
                f"from_pretrained: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}; "
                f"only safetensors checkpoints are read"
            )
    found = config.get("model_type")
    if found != model_type:
        raise ValueError(
            f"from_pretrained: the checkpoint is a {found!r} model "
            f"(architectures {config.get('architectures')}), expected model_type {model_type!r}"
        )
    return config, state_dict


def write_checkpoint(directory, config, state_dict):
    """Write ``config`` (dict) as config.json and ``state_dict`` as model.safetensors into ``directory``.

    Tensors that share storage (tied weights) must already be removed by the caller.
    """
    save_file = require("safetensors.torch", "models", "writing a checkpoint").save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})


def load_state_dict_checked(model, state_dict, *, prefix, body=False, tied=(), new=(), dropped=()):
    """Load ``state_dict`` (HF key names) into ``model``, strictly, with errors that list the keys.

    prefix: the body's prefix in HF's head classes ("bert.", "transformer."). A head model (body=False)
        given a bare-body checkpoint (no key under the prefix) gets the prefix added; a bare-body model
        (body=True) given a head checkpoint keeps the keys under the prefix, without it, and drops the heads.
    tied: model keys that HF derives from another one (saved once); absent from the checkpoint is fine.
    new: key prefixes of heads that a pretrained checkpoint may lack: freshly initialised when the checkpoint
        has no key under the prefix (a partly present head is an error).
    dropped: key prefixes of other heads that may be in the checkpoint and are ignored.
    Returns the sorted keys that were freshly initialised.
    """
    expected = model.state_dict()
    under_prefix = any(k.startswith(prefix) for k in state_dict)
    if body and under_prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    elif not body and not under_prefix:
        state_dict = {prefix + k: v for k, v in state_dict.items()}
    unexpected = [k for k in state_dict if k not in expected and not k.startswith(tuple(dropped))]
    missing = [k for k in expected if k not in state_dict and k not in tied]
    absent_heads = tuple(p for p in new if not any(k.startswith(p) for k in state_dict))  # wholly absent only
    initialised = [k for k in missing if k.startswith(absent_heads)]
    missing = [k for k in missing if k not in initialised]
    if missing or unexpected:
        raise ValueError(
            f"from_pretrained: the checkpoint does not match {type(model).__name__}: "
            f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
        )
    for key, value in state_dict.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"from_pretrained: {key} has shape {tuple(value.shape)} in the checkpoint, "
                f"{type(model).__name__} expects {tuple(expected[key].shape)}"
            )
    kept = {k: v for k, v in state_dict.items() if k in expected and k not in tied}
    with torch.no_grad():
        model.load_state_dict(kept, strict=False)
    return sorted(initialised)


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for a model class whose parameters carry HF's names.

    A class sets ``config_class`` and ``hf_architecture`` (HF's class name) and describes its keys with
    ``hf_keys()``: a dict of ``load_state_dict_checked``'s keyword arguments (prefix, body, tied, new,
    dropped). ``_state_from_hf`` / ``_state_to_hf`` convert layouts that differ (GPT-2's Conv1D).
    """

    config_class = None
    hf_architecture = None

    def hf_keys(self):
        """How this class's keys relate to HF checkpoints: ``load_state_dict_checked``'s keyword arguments."""
        raise NotImplementedError

    @staticmethod
    def _state_from_hf(state_dict):
        return state_dict

    @staticmethod
    def _state_to_hf(state_dict):
        return state_dict

    @staticmethod
    def _config_from_checkpoint(config, state_dict):
        """The config adjusted to what the checkpoint holds (T5: an lm_head saved apart means untied)."""
        return config

    @classmethod
    def from_pretrained(cls, source, **overrides):
        """The model with the weights of ``source``: a directory in HF's format (config.json +
        model.safetensors) or an HF ``PreTrainedModel``. ``overrides`` replace config fields (e.g.
        ``num_labels`` for a new classification head, dropout rates). Heads the checkpoint lacks are
        freshly initialised and listed in ``model.initialised_keys``; any other mismatch is a ValueError.
        """
        hf_config, state_dict = read_checkpoint(source, cls.config_class.model_type)
        config = cls._config_from_checkpoint(cls.config_class.from_hf(hf_config), state_dict)
        config = dataclasses.replace(config, **overrides)
        model = cls(config)
        model.initialised_keys = load_state_dict_checked(model, cls._state_from_hf(state_dict), **model.hf_keys())
        return model

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors into ``directory``, loadable by HF's
        ``from_pretrained`` of ``hf_architecture`` (tied weights saved once, as HF does)."""
        tied = set(self.hf_keys().get("tied", ()))
        state_dict = {k: v for k, v in self.state_dict().items() if k not in tied}
        write_checkpoint(directory, self.config.to_hf(self.hf_architecture), self._state_to_hf(state_dict))
