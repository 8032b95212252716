"""Cross-entropy of an LM head: fastlm.linear_cross_entropy against what Hugging Face computes in eager
mode (logits = hidden @ W^T + b, then F.cross_entropy), the same under torch.compile, and liger-kernel's
fused linear cross-entropy and cut-cross-entropy (Apple's CCE kernels) when installed. Shapes: BERT-base
MLM (15% of rows labelled), GPT-2 (every row labelled), T5 (V 32128). Work is counted as the eager head's
matmul FLOPs (6 N D V for forward+backward), so fastlm's throughput is "eager-equivalent": skipping the
ignored rows shows up as a higher rate."""

import importlib.util

import torch
import torch.nn.functional as F

import fastlm

from .harness import Case

# (label, tokens N, hidden D, vocab V, fraction of rows labelled, has decoder bias)
GPU_SHAPES = [
    ("bert-mlm 32x128", 4096, 768, 30522, 0.15, True),
    ("bert-mlm 64x512", 32768, 768, 30522, 0.15, True),
    ("gpt2 8x1024", 8192, 768, 50257, 1.0, False),
    ("t5 32x512", 16384, 768, 32128, 1.0, False),
]
CPU_SHAPES = [
    ("bert-mlm 32x128", 4096, 768, 30522, 0.15, True),
    ("gpt2 1x512", 512, 768, 50257, 1.0, False),
    ("t5 1x512", 512, 768, 32128, 1.0, False),
]
QUICK_SHAPES = [("bert-mlm 2x64", 128, 64, 1000, 0.15, True)]
HEADLINE = {"bert-mlm 64x512", "gpt2 8x1024"}


def eager_head(hidden, weight, bias, labels):
    """What Hugging Face's BertForMaskedLM / GPT2LMHeadModel compute: every row's logits, then the loss."""
    logits = F.linear(hidden, weight, bias)  # (N, V)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def _fastlm_backends(device):
    """Kernel backends worth timing on `device` (not the interpreter or the emulator)."""
    skip = {"reference", "cuda_emu"} | ({"triton"} if device.type == "cpu" else set())
    return [b for b in fastlm.available_backends(device) if b not in skip]


def _ours(backend, capacity):
    def run(hidden, weight, bias, labels):
        with fastlm.use_backend(backend):
            return fastlm.linear_cross_entropy(hidden, weight, labels, bias, capacity=capacity)

    return run


def _peers(device, has_bias):
    """Installed peers as name -> fn(hidden, weight, bias, labels), and absent peers as name -> why."""
    if device.type != "cuda":
        return {}, {"liger-kernel": "GPU only", "cut-cross-entropy": "GPU only"}
    impls, absent = {}, {}
    if importlib.util.find_spec("liger_kernel") is None:
        absent["liger-kernel"] = "not installed"
    else:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        impls["liger-kernel"] = lambda h, w, b, y: LigerFusedLinearCrossEntropyFunction.apply(h, w, y, b)[0]
    if importlib.util.find_spec("cut_cross_entropy") is None:
        absent["cut-cross-entropy"] = "not installed"
    elif has_bias:
        absent["cut-cross-entropy"] = "takes no decoder bias"
    else:
        from cut_cross_entropy import linear_cross_entropy as cce  # its defaults: the "cce" kernels

        impls["cut-cross-entropy"] = lambda h, w, b, y: cce(h, w, y)
    return impls, absent


def cases(device, quick=False, keep=None):
    """The cases on `device`; `keep(shape, dtype)` selects some (default: all)."""
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    compiled = torch.compile(eager_head, dynamic=False)
    result = []
    for label, n, d, v, labelled, has_bias in shapes:
        for dtype in dtypes:
            if keep is not None and not keep(label, dtype):
                continue

            def inputs(n=n, d=d, v=v, labelled=labelled, has_bias=has_bias, dtype=dtype):
                generator = torch.Generator(device=device).manual_seed(0)
                hidden = torch.randn(n, d, device=device, dtype=dtype, generator=generator, requires_grad=True)
                weight = (0.05 * torch.randn(v, d, device=device, generator=generator)).to(dtype).requires_grad_()
                bias = torch.zeros(v, device=device, dtype=dtype, requires_grad=True) if has_bias else None
                labels = torch.randint(0, v, (n,), device=device, generator=generator)
                keep = torch.rand(n, device=device, generator=generator) < labelled
                return hidden, weight, bias, torch.where(keep, labels, -100)

            # On a GPU a static bound on the labelled rows avoids a host sync (a third above the expected
            # count); on the CPU torch.nonzero costs nothing extra.
            sync_free = device.type == "cuda" and labelled < 1
            capacity = int(n * min(1.0, labelled * 4 / 3)) if sync_free else None
            ours = {f"fastlm {be}": _ours(be, capacity) for be in _fastlm_backends(device)}
            peers, absent = _peers(device, has_bias)
            flops = 2 * n * d * v
            result.append(
                Case(
                    op="linear_cross_entropy",
                    shape=label,
                    dtype=dtype,
                    inputs=inputs,
                    impls={**ours, "torch eager": eager_head, "torch.compile": compiled, **peers},
                    reference="torch eager",
                    work={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops},
                    unit="TFLOP/s",
                    absent=absent,
                )
            )
    return result
