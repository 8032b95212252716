"""Optional dependencies, imported where they are used, with an error that names the extra to install.

`import fastlm` needs only torch. The rest is installed with extras (see setup.py):
  triton   the Triton kernels (fastlm.kernels)
  models   Hugging Face checkpoint I/O of fastlm.models (safetensors)
  train    tokenizers, `fastlm pretrain` / `finetune` (tokenizers, safetensors, tqdm, matplotlib)
  bench    `fastlm bench` (matplotlib, tqdm, transformers)
"""

import importlib

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says which fastlm extra installs it."""


def require(module, extra, feature):
    """Import and return `module` (e.g. "safetensors.torch"); when its distribution is not installed,
    raise MissingDependency saying that `feature` needs it and that `pip install 'fastlm[extra]'` adds it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.partition(".")[0]
        if err.name is not None and err.name.partition(".")[0] != top:
            raise  # the package is there but one of its own imports failed: show that error as it is
        raise MissingDependency(
            f"{feature} needs {top}, which is not installed: pip install 'fastlm[{extra}]' (or pip install {top})",
            name=top,
        ) from err
