"""Triton kernels of fastlm, one module per op family (installed as fastlm.kernels)."""

import importlib.util

if importlib.util.find_spec("triton") is None:  # say which extra installs it (fastlm/_optional.py's wording)
    raise ImportError(
        "fastlm.kernels (the Triton kernels) needs triton, which is not installed: "
        "pip install 'fastlm[triton]' (or pip install triton)",
        name="triton",
    )
