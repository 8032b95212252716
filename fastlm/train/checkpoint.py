"""Training checkpoints: written atomically (a temporary file in the same folder, then a rename), so a run
killed while saving leaves the previous checkpoints intact; read back with clear errors."""

import contextlib
import os
import re

import torch

from .validate import TrainingError

__all__ = [
    "latest_checkpoint",
    "load_checkpoint",
    "load_newest_good",
    "prune_checkpoints",
    "save_checkpoint",
    "write_atomically",
]

_NAME = re.compile(r"^step-(\d+)\.pt$")


def write_atomically(path, write):
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``, so that a failed
    write (a full disk, a killed process) never leaves a partial ``path`` and keeps an older one intact.
    An OSError becomes a TrainingError naming the file; the temporary file is removed."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise TrainingError(
            f"could not write {path!r} ({e.strerror or e}); the files already in {os.path.dirname(path)!r} are intact"
        ) from None


def save_checkpoint(state, directory, step):
    """Write ``state`` (a dict of tensors and plain values) to ``directory``/step-<step>.pt atomically
    (see `write_atomically`); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step-{step:08d}.pt")
    write_atomically(path, lambda f: torch.save(state, f))
    return path


def _steps(directory):
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(directory) if (m := _NAME.match(n))]
    return sorted(found)


def latest_checkpoint(directory):
    """The path of the newest step-*.pt in ``directory``, or None."""
    steps = _steps(directory)
    return os.path.join(directory, steps[-1][1]) if steps else None


def prune_checkpoints(directory, keep):
    """Delete all but the ``keep`` newest checkpoints (and stale .tmp files of killed saves)."""
    for _, name in _steps(directory)[:-keep]:
        os.remove(os.path.join(directory, name))
    for name in os.listdir(directory):
        if name.endswith(".pt.tmp"):
            os.remove(os.path.join(directory, name))


def load_checkpoint(path):
    """The state dict saved at ``path``; ValueError naming the file when it is missing, unreadable or
    truncated (the file is left as it is)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle, a text file: all are unusable checkpoints
        raise ValueError(f"checkpoint {path!r} is unreadable or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"checkpoint {path!r} is not a fastlm training checkpoint")
    return state


def load_newest_good(directory, say=print):
    """(path, state) of the newest checkpoint in ``directory`` that loads; an unreadable newer one is
    reported through ``say`` and skipped. ValueError when there is none, or none loads (naming each)."""
    steps = _steps(directory)
    if not steps:
        raise ValueError(f"--resume: no checkpoint in {directory!r}")
    errors = []
    for _, name in reversed(steps):
        path = os.path.join(directory, name)
        try:
            state = load_checkpoint(path)
        except ValueError as e:
            errors.append(str(e))
            say(f"{e}; trying an older checkpoint")
            continue
        if errors:
            say(f"resuming from {path!r}, the newest checkpoint that loads")
        return path, state
    raise ValueError(f"--resume: no usable checkpoint in {directory!r}: " + "; ".join(errors))
