"""What every Triton launcher shares: the device to launch on, and the tuned launch configurations.

Triton launches on the *current* CUDA device and its current stream, so a launcher entered with tensors
on cuda:1 while cuda:0 is current would run on the wrong GPU: each launcher runs its kernels inside
``on_device(tensor)``.

Launch configurations (tile sizes, ``num_warps``, ``num_stages``) come from ``tuning.json`` beside this
file, written by the tuning sweep (``python -m bench.tune``) on a GPU:
``{"meta": {...}, "configs": {device_kind: {family: {shape_class: {param: value}}}}}``, where
``device_kind`` is ``"cuda"`` or ``"cpu"`` (the interpreter; only dry runs of the sweep write it). A
launcher asks ``tuned(family, shape_class, device, default)`` and gets the table's entry merged over its
own ``default``, or the default alone where the table has none. ``FASTLM_TUNING`` names another table
(the sweep's dry run and the tests use it); inside ``trial(...)`` one family and shape class launch with a
given configuration instead (how the sweep times its candidates).
"""

import contextlib
import contextvars
import functools
import json
import os
from pathlib import Path

import torch

TUNING_FILE = Path(__file__).with_name("tuning.json")
_trial = contextvars.ContextVar("fastlm_tuning_trial", default=None)


def on_device(tensor):
    """A context in which Triton launches on `tensor`'s CUDA device (a no-op for CPU tensors)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def tuning_file():
    """The tuning table in use: FASTLM_TUNING when set, else the committed kernels/tuning.json."""
    return Path(os.environ.get("FASTLM_TUNING") or TUNING_FILE)


@functools.cache
def _table(path):
    try:
        return json.loads(Path(path).read_text()).get("configs", {})
    except FileNotFoundError:
        return {}


def tuned(family, shape_class, device, default):
    """The launch configuration of kernel `family` for `shape_class` on `device`: `default` (a dict of
    launch parameters) updated with the tuning table's entry, if it has one."""
    trial_config = _trial.get()
    if trial_config is not None and trial_config[:2] == (family, shape_class):
        return {**default, **trial_config[2]}
    entry = _table(str(tuning_file())).get(torch.device(device).type, {}).get(family, {}).get(shape_class)
    return default if entry is None else {**default, **entry}


@contextlib.contextmanager
def trial(family, shape_class, config):
    """Inside the block, `family` launches at `shape_class` with `config` over the launcher's default,
    whatever the table says (``config={}``: the default itself)."""
    token = _trial.set((family, shape_class, dict(config)))
    try:
        yield
    finally:
        _trial.reset(token)


def reload_tuning():
    """Forget the cached table (after the sweep rewrote it, or FASTLM_TUNING changed)."""
    _table.cache_clear()
