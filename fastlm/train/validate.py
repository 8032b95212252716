"""Checks shared by `fastlm pretrain` and `fastlm finetune`: numeric flags in range, an output folder that
a fresh run may write, and the error a run that cannot go on raises."""

import math
import os
import shutil

__all__ = ["TrainingError", "check_float", "check_int", "check_out", "clear_out", "flag"]


class TrainingError(RuntimeError):
    """A run that started but cannot go on (a non-finite loss, a failed write); the message says why and
    what was kept."""


def flag(name):
    """The command-line flag of the config field ``name``: "--seq-len" for "seq_len"."""
    return "--" + name.replace("_", "-")


def check_int(name, value, lo, hi=None, *, optional=False):
    """ValueError naming --``name`` unless ``value`` is an int in [lo, hi] (None allowed when ``optional``)."""
    if value is None and optional:
        return
    bound = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{flag(name)} must be {bound}, got {value!r}")


def check_float(name, value, lo=None, hi=None, *, lo_open=False, hi_open=False):
    """ValueError naming --``name`` unless ``value`` is a finite number in the range given: [lo, hi], with an
    open end where ``lo_open`` / ``hi_open`` (None: unbounded on that side)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        raise ValueError(f"{flag(name)} must be {expected}, got {value!r}")


def check_out(out, *, resume, overwrite):
    """ValueError naming ``out`` unless a run may write there. A fresh run needs it missing or empty: a used
    folder is refused (its checkpoints, tokenizer and model would mix with the new run's) unless
    ``overwrite`` (then `clear_out` empties it). ``resume`` takes the folder as it is."""
    if resume:
        if overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite clears it: pass one of them")
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, expected a folder")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(
            f"--out {out!r} is not empty (holds {shown}): pass --resume to continue its run, "
            f"--overwrite to clear it and start afresh, or choose another folder"
        )


def clear_out(out):
    """Delete everything in the folder ``out`` (made when missing)."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
