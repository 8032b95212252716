"""LayerNorm / RMSNorm: fastlm's backends against torch eager (F.layer_norm, F.rms_norm, Hugging Face's
T5LayerNorm formula), torch.compile, and apex / liger-kernel when installed."""

import importlib.util

import torch
import torch.nn.functional as F

import fastlm

from .harness import Case

GPU_SHAPES = [(32768, 768), (32768, 1024), (16384, 4096), (8192, 8192)]
CPU_SHAPES = [(8192, 768), (8192, 1024), (2048, 4096), (1024, 8192)]
QUICK_SHAPES = [(256, 768)]
HEADLINE = {"32768x768", "16384x4096"}  # BERT-base's 64x512 tokens; a 4096-wide (Llama-7B-like) model


def t5_layer_norm(x, weight, eps=1e-6):
    """Hugging Face's T5LayerNorm.forward, verbatim in behaviour: what T5 models run in eager mode."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return weight * x


def _fastlm_backends(device):
    """Kernel backends worth timing on `device` (not the interpreter or the emulator)."""
    skip = {"reference", "cuda_emu"} | ({"triton"} if device.type == "cpu" else set())
    return [b for b in fastlm.available_backends(device) if b not in skip]


def _with_backend(fn, backend):
    def run(*args):
        with fastlm.use_backend(backend):
            return fn(*args)

    return run


def _peers(device, rms):
    """Installed peers as name -> fn(x, weight, bias), and absent peers as name -> why."""
    impls, absent = {}, {}
    if device.type != "cuda":
        return impls, {"liger-kernel": "GPU only", "apex": "GPU only"}
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        if rms:
            impls["liger-kernel"] = lambda x, w, b: LigerRMSNormFunction.apply(x, w, 1e-6)
        else:
            impls["liger-kernel"] = lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    else:
        absent["liger-kernel"] = "not installed"
    if importlib.util.find_spec("apex") is not None:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

        if rms:
            impls["apex"] = lambda x, w, b: fused_rms_norm_affine(x, w, (x.shape[-1],), 1e-6)
        else:
            impls["apex"] = lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), 1e-5)
    else:
        absent["apex"] = "not installed"
    return impls, absent


def cases(device, quick=False, keep=None):
    """The cases on `device`; `keep(shape, dtype)` selects some (default: all)."""
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    result = []
    for rms in (False, True):
        op = "rms_norm" if rms else "layer_norm"
        for dtype in dtypes:
            for rows, n in shapes:
                if keep is not None and not keep(f"{rows}x{n}", dtype):
                    continue

                def inputs(rows=rows, n=n, dtype=dtype):
                    x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
                    w = (torch.rand(n, device=device, dtype=dtype) + 0.5).requires_grad_()
                    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
                    return x, w, b

                if rms:
                    eager = {
                        "torch F.rms_norm": lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
                        "hf T5LayerNorm": lambda x, w, b: t5_layer_norm(x, w),
                    }
                    compiled = {"torch.compile T5LayerNorm": torch.compile(t5_layer_norm, dynamic=False)}
                    ours = {
                        f"fastlm {be}": _with_backend(lambda x, w, b: fastlm.rms_norm(x, w, 1e-6), be)
                        for be in _fastlm_backends(device)
                    }
                    reference = "hf T5LayerNorm"
                else:
                    eager = {"torch F.layer_norm": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)}
                    compiled_ln = torch.compile(
                        lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5), dynamic=False
                    )
                    compiled = {"torch.compile layer_norm": compiled_ln}
                    ours = {
                        f"fastlm {be}": _with_backend(lambda x, w, b: fastlm.layer_norm(x, w, b, 1e-5), be)
                        for be in _fastlm_backends(device)
                    }
                    reference = "torch F.layer_norm"
                peers, absent = _peers(device, rms)
                size = rows * n * torch.finfo(dtype).bits // 8
                result.append(
                    Case(
                        op=op,
                        shape=f"{rows}x{n}",
                        dtype=dtype,
                        inputs=inputs,
                        impls={**ours, **eager, **compiled, **peers},
                        reference=reference,
                        work={"fwd": 2 * size, "bwd": 3 * size, "fwd+bwd": 5 * size},
                        absent=absent,
                    )
                )
    return result
