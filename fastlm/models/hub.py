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

__all__ = ["PretrainedMixin", "config_origin", "load_state_dict_checked", "read_checkpoint", "write_checkpoint"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def read_checkpoint(source, model_type):
    """The HF config (dict) and state_dict (name -> tensor) of ``source``.

    source: a directory written by ``save_pretrained`` (HF's or fastlm's; a sharded checkpoint with
        ``model.safetensors.index.json`` works too) or an HF ``PreTrainedModel`` instance.
    model_type: the expected ``config.model_type`` ("bert", "gpt2", "t5"); another one is a ValueError.
    A file that is not valid JSON / safetensors (garbage, truncated) is a ValueError naming the file.
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
        config = _read_json_object(directory / CONFIG_NAME)
        state_dict = _read_weights(directory, load_file)
    found = config.get("model_type")
    if found != model_type:
        raise ValueError(
            f"from_pretrained: the checkpoint is a {found!r} model "
            f"(architectures {config.get('architectures')}), expected model_type {model_type!r}"
        )
    return config, state_dict


def config_origin(source):
    """Where ``read_checkpoint(source)`` took the config from, for error messages."""
    if isinstance(source, nn.Module):
        return f"the config of the {type(source).__name__}"
    return str(Path(source) / CONFIG_NAME)


def _read_json_object(path):
    """The dict in the JSON file ``path``; FileNotFoundError / ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: no {path.name} in {path.parent}")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"from_pretrained: {path} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"from_pretrained: {path} must hold a JSON object, got a {type(value).__name__}")
    return value


def _read_weights(directory, load_file):
    """The state_dict of model.safetensors in ``directory``, or of the shards its index names, read with
    safetensors' ``load_file``."""
    if (directory / WEIGHTS_NAME).is_file():
        return _read_safetensors(directory / WEIGHTS_NAME, load_file)
    index_path = directory / WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(
            f"from_pretrained: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}; "
            f"only safetensors checkpoints are read"
        )
    weight_map = _read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"from_pretrained: {index_path} must map tensor names to shard files in 'weight_map'")
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(_read_safetensors(directory / shard, load_file))
    return state_dict


def _read_safetensors(path, load_file):
    """The tensors of the safetensors file ``path``; a ValueError naming it when it cannot be read."""
    from safetensors import SafetensorError  # installed: load_file comes from it

    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: the weights file {path} does not exist")
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"from_pretrained: {path} is not a readable safetensors file (truncated?): {err}") from err


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


def load_state_dict_checked(model, state_dict, *, prefix, body=False, tied=(), new=(), dropped=(), buffers=()):
    """Load ``state_dict`` (HF key names) into ``model``, strictly, with errors that list the keys.

    prefix: the body's prefix in HF's head classes ("bert.", "transformer."). A head model (body=False)
        given a bare-body checkpoint (no key under the prefix) gets the prefix added; a bare-body model
        (body=True) given a head checkpoint keeps the keys under the prefix, without it, and drops the heads.
    tied: model keys that HF derives from another one (saved once); absent from the checkpoint is fine.
    new: key prefixes of heads that a pretrained checkpoint may lack: freshly initialised when the checkpoint
        has no key under the prefix (a partly present head is an error).
    dropped: key prefixes of other heads that may be in the checkpoint and are ignored.
    buffers: key suffixes of buffers that older HF versions saved (GPT-2's causal mask ``attn.bias``,
        BERT's ``position_ids``) and that are ignored.
    Returns the sorted keys that were freshly initialised.
    """
    expected = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(tuple(buffers))}
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
    kept = {k: v for k, v in state_dict.items() if k in expected and k not in tied}
    for key, value in kept.items():
        _check_tensor(key, value, expected[key], type(model).__name__)
    with torch.no_grad():
        model.load_state_dict(kept, strict=False)
    return sorted(initialised)


def _check_tensor(key, value, expected, model_name):
    """ValueError when checkpoint tensor ``value`` does not have the shape of the model's ``expected``, is
    integer where it is floating point (or the reverse), or holds NaN or infinite values (a corrupt
    checkpoint: loading it would make every output NaN)."""
    if tuple(value.shape) != tuple(expected.shape):
        raise ValueError(
            f"from_pretrained: {key} has shape {tuple(value.shape)} in the checkpoint, "
            f"{model_name} expects {tuple(expected.shape)}"
        )
    if value.is_floating_point() != expected.is_floating_point():
        raise ValueError(
            f"from_pretrained: {key} has dtype {value.dtype} in the checkpoint, {model_name} holds {expected.dtype}"
        )
    if value.is_floating_point():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"from_pretrained: {key} holds {bad} non-finite value(s) (NaN or inf) in the checkpoint")


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for a model class whose parameters carry HF's names.

    A class sets ``config_class`` and ``hf_architecture`` (HF's class name) and describes its keys with
    ``hf_keys()``: a dict of ``load_state_dict_checked``'s keyword arguments (prefix, body, tied, new,
    dropped, buffers). ``_state_from_hf`` / ``_state_to_hf`` convert layouts that differ (GPT-2's Conv1D).
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
        The model is returned in eval mode, as Hugging Face's is (dropout off): call ``.train()`` to train.
        """
        hf_config, state_dict = read_checkpoint(source, cls.config_class.model_type)
        try:
            config = cls.config_class.from_hf(hf_config)
        except (TypeError, ValueError) as err:
            raise type(err)(f"from_pretrained: {config_origin(source)}: {err}") from err
        config = dataclasses.replace(cls._config_from_checkpoint(config, state_dict), **overrides)
        model = cls(config)
        model.initialised_keys = load_state_dict_checked(model, cls._state_from_hf(state_dict), **model.hf_keys())
        return model.eval()

    def save_pretrained(self, directory):
        """Write config.json and model.safetensors into ``directory``, loadable by HF's
        ``from_pretrained`` of ``hf_architecture`` (tied weights saved once, as HF does)."""
        tied = set(self.hf_keys().get("tied", ()))
        state_dict = {k: v for k, v in self.state_dict().items() if k not in tied}
        write_checkpoint(directory, self.config.to_hf(self.hf_architecture), self._state_to_hf(state_dict))
