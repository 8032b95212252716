"""Attention: fastlm's backends against PyTorch and the peers, on the shapes of BERT, GPT-2, T5 and long
context.

Peers: the materialising PyTorch reference (eager, the speedup baseline, and torch.compile), SDPA with
each backend it can run on the case (flash, efficient, cudnn, math), FlexAttention (score_mod for the
T5 bias, a block mask for padding and causal), Hugging Face's eager T5 attention
(T5Attention.compute_bias + eager_attention_forward) and flash-attn when installed; a peer that cannot
run a case is reported absent with the reason, and so is an SDPA backend that ran some other kernel than
its own. TFLOP/s counts 4·B·H·Lq·Lk·D for forward, 2.5× that for backward, half of it when causal. Padded
cases pad about 45 % of the keys (seeded random lengths, as in BERT's training batches), or take the
lengths of the default corpus's sentence pairs ("-pairs"); fastlm's varlen attention runs their real
tokens packed. `summary(rows)` gives the ratios the CPU cases are read for.
"""

import importlib.util
import warnings

import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.attention import ATTENTION, RelativePositionBias, attention_reference
from fastlm.ops.varlen_attention import VARLEN_ATTENTION

from . import harness
from .harness import Case

# (label, B, H, Lq, Lk, D, causal, padding: None or padding(B, L) -> (B, L) bool mask, T5 bias)
GPU_SHAPES = [
    ("bert-base", 32, 12, 128, 128, 64, False, None, False),
    ("bert-base-pad", 32, 12, 128, 128, 64, False, harness.padding_mask, False),
    ("bert-base", 32, 12, 512, 512, 64, False, None, False),
    ("bert-base-pad", 32, 12, 512, 512, 64, False, harness.padding_mask, False),
    ("gpt2-causal", 8, 12, 1024, 1024, 64, True, None, False),
    ("t5-base-relpos", 16, 12, 512, 512, 64, False, harness.padding_mask, True),
    ("t5-base-cross", 16, 12, 114, 512, 64, False, harness.padding_mask, False),
    ("long-causal", 2, 16, 4096, 4096, 128, True, None, False),
]
CPU_SHAPES = [
    ("bert-pad", 4, 4, 128, 128, 64, False, harness.padding_mask, False),
    ("bert-pairs", 16, 4, 128, 128, 64, False, harness.sentence_pair_mask, False),
    ("gpt-causal", 4, 4, 128, 128, 64, True, None, False),
    ("t5-relpos", 4, 4, 128, 128, 64, False, harness.padding_mask, True),
    ("long-causal", 1, 8, 2048, 2048, 64, True, None, False),
]
QUICK_SHAPES = [("t5-relpos", 1, 2, 32, 32, 16, False, harness.padding_mask, True)]
HEADLINE = {
    "bert-base-pad 32x12x512x512x64",
    "gpt2-causal 8x12x1024x1024x64",
    "t5-base-relpos 16x12x512x512x64",
    "long-causal 2x16x4096x4096x128",
}
# SDPA backend -> the aten op (prefix) that runs when SDPA takes it; any other op means it fell back.
SDPA_BACKENDS = {
    "flash_attention": "aten::_scaled_dot_product_flash_attention",
    "efficient_attention": "aten::_scaled_dot_product_efficient_attention",
    "cudnn_attention": "aten::_scaled_dot_product_cudnn_attention",
    "math": "aten::_scaled_dot_product_attention_math",
}
# (CPU case label, implementation, baseline, the least speedup over the baseline the fastlm cpu kernel aims at)
TARGETS = [
    ("bert-pad", "fastlm cpu", "sdpa flash", 1.0),
    ("bert-pairs", "fastlm cpu varlen", "fastlm cpu", 1.5),
    ("gpt-causal", "fastlm cpu", "sdpa flash", 1.0),
    ("t5-relpos", "fastlm cpu", "torch eager", 2.0),
    ("t5-relpos", "fastlm cpu", "torch.compile eager", 1.3),
    ("long-causal", "fastlm cpu", "sdpa flash", 1.0),
]
MEMORY_TARGET = "long-causal"  # its peak memory growth per implementation goes into the summary


def _fastlm_backends(device):
    """Kernel backends worth timing on `device` (not the reference, the interpreter or the emulator)."""
    skip = {"reference", "cuda_emu"} | ({"triton"} if device.type == "cpu" else set())
    return [b for b in ATTENTION.available(device) if b not in skip]


def _dense_bias(q, k, mask, table, causal, bidirectional):
    """The additive (B or 1, H, Lq, Lk) bias that peers without fastlm's masks and T5 buckets need."""
    Lq, Lk = q.shape[2], k.shape[2]
    bias = None
    if table is not None:
        bias = RelativePositionBias(table, bidirectional).bias(Lq, Lk)[None].to(q.dtype)  # (1, H, Lq, Lk)
    if mask is not None:
        pad = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        pad = pad[:, None, None, :]  # (B, Lk) -> (B, 1, 1, Lk)
        bias = pad if bias is None else bias + pad
    if causal and bias is not None:
        future = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(Lk - Lq + 1)
        bias = bias.masked_fill(future, float("-inf"))
    return bias


def _varlen_backends(device):
    """Backends of fastlm.varlen_attention worth timing on `device` (as _fastlm_backends)."""
    skip = {"reference", "cuda_emu"} | ({"triton"} if device.type == "cpu" else set())
    return [b for b in VARLEN_ATTENTION.available(device) if b not in skip]


def _impls(device, causal, rel_pos, padded=False):
    """Implementations as name -> fn(q, k, v, mask, table), and absent peers as name -> why. padded: the
    case pads its keys (fastlm's varlen attention on the packed tokens is timed too)."""
    scale = 1.0 if rel_pos else None
    bidirectional = not causal
    impls, absent = {}, {}

    def ours(backend):
        def run(q, k, v, mask, table):
            rp = None if table is None else RelativePositionBias(table, bidirectional)
            with fastlm.use_backend(backend):
                return fastlm.attention(q, k, v, causal=causal, key_padding_mask=mask, rel_pos=rp, scale=scale)

        return run

    def varlen(backend):
        state = {}  # the padded inputs' real tokens, packed once per input as a model unpads once per forward

        def run(q, k, v, mask, table):
            if state.get("of") is not q:
                # (B, H, L, D) -> (B, L, H, D) -> (T, H, D): leaves of their own, so only the kernel is timed
                packed = [fastlm.unpad(t.detach().transpose(1, 2), mask) for t in (q, k, v)]
                state.update(of=q, qkv=[p[0].requires_grad_() for p in packed], lengths=packed[0][2:])
            for t in state["qkv"]:
                t.grad = None
            rp = None if table is None else RelativePositionBias(table, bidirectional)
            cu, longest = state["lengths"]
            with fastlm.use_backend(backend):
                return fastlm.varlen_attention(*state["qkv"], cu, cu, longest, longest, causal=causal, rel_pos=rp,
                                               scale=scale)  # (T, H, D)

        return run

    for backend in _fastlm_backends(device):
        impls[f"fastlm {backend}"] = ours(backend)
    if padded:  # the padded batch's real tokens as packed sequences
        for backend in _varlen_backends(device):
            impls[f"fastlm {backend} varlen"] = varlen(backend)
    if device.type == "cpu":
        absent["fastlm triton"] = "Triton runs CPU tensors only through its interpreter (not timed)"
        if "fastlm cpu" not in impls:
            absent["fastlm cpu"] = ATTENTION.lacks("cpu", "attention", torch.float32) or "the extension is not built"

    def reference(q, k, v, mask, table):  # plain PyTorch in the input dtype, as users write it
        rp = None if table is None else RelativePositionBias(table, bidirectional)
        return attention_reference(q, k, v, causal=causal, key_padding_mask=mask, rel_pos=rp, scale=scale,
                                   upcast=False)

    impls["torch eager"] = reference
    impls["torch.compile eager"] = torch.compile(reference, dynamic=False)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v, mask, table):
            bias = _dense_bias(q, k, mask, table, causal, bidirectional)
            with sdpa_kernel(getattr(SDPBackend, backend.upper())):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=bias, is_causal=causal and bias is None, scale=scale
                )

        return run

    for backend in SDPA_BACKENDS:
        impls[_sdpa_name(backend)] = sdpa(backend)

    if device.type == "cuda":
        impls["flex_attention"] = _flex(causal, rel_pos, bidirectional)
    else:
        absent["flex_attention"] = "no backward on the CPU"
    if rel_pos:
        if importlib.util.find_spec("transformers") is not None:
            impls["hf T5 eager"] = _hf_t5(causal)
        else:
            absent["hf T5 eager"] = "transformers is not installed"
    if importlib.util.find_spec("flash_attn") is None:
        absent["flash-attn"] = "not installed"
    else:
        from flash_attn import flash_attn_func

        def flash(q, k, v, mask, table):
            if mask is not None or table is not None:
                raise ValueError("flash-attn takes no key padding mask (varlen only) and no additive bias")
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, D) views
            return flash_attn_func(q, k, v, causal=causal).transpose(1, 2)

        impls["flash-attn"] = flash
    return impls, absent


def _sdpa_name(backend):
    """The implementation name of an SDPA backend: "sdpa flash" for "flash_attention"."""
    return f"sdpa {backend.split('_')[0]}"


def _flex(causal, rel_pos, bidirectional):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    block_masks = {}  # built once per mask tensor, as a training loop builds it once per batch

    def run(q, k, v, mask, table):
        B, _, Lq, _ = q.shape
        Lk = k.shape[2]
        key = (id(mask), Lq, Lk)
        if key not in block_masks and (causal or mask is not None):

            def mask_mod(b, h, q_idx, kv_idx):
                keep = kv_idx <= q_idx + (Lk - Lq) if causal else kv_idx >= 0
                return keep & mask[b, kv_idx] if mask is not None else keep

            block_masks[key] = create_block_mask(
                mask_mod, B if mask is not None else None, None, Lq, Lk, device=q.device
            )
        score_mod = None
        if table is not None:
            bucket = RelativePositionBias(table, bidirectional).diagonal_buckets(Lq, Lk)  # (Lq + Lk - 1,)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + table[bucket[kv_idx - q_idx + Lq - 1], h]

        return flex(q, k, v, score_mod=score_mod, block_mask=block_masks.get(key), scale=1.0 if rel_pos else None)

    return run


def _hf_t5(causal):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention, eager_attention_forward

    modules = {}

    def run(q, k, v, mask, table):
        B, H, Lq, D = q.shape
        if H not in modules:
            config = T5Config(
                d_model=H * D, d_kv=D, num_heads=H, relative_attention_num_buckets=table.shape[0], is_decoder=causal
            )
            modules[H] = T5Attention(config, has_relative_attention_bias=True).to(q.device)
        module = modules[H]
        module.relative_attention_bias._parameters["weight"] = table  # the benchmark's leaf: its grad is timed
        position_bias = module.compute_bias(Lq, k.shape[2], device=q.device).to(q.dtype)  # (1, H, Lq, Lk)
        extra = _dense_bias(q, k, mask, None, causal, not causal)
        out, _ = eager_attention_forward(module, q, k, v, extra, scaling=1.0, position_bias=position_bias)
        return out.transpose(1, 2)  # (B, Lq, H, D) -> (B, H, Lq, D)

    return run


def _ops_run(fn):
    """The names of the aten ops that fn() ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def _fallback(name, ops):
    """Why SDPA backend `name` does not stand for its kernel, given the ops one call ran; None if it ran it."""
    expected = next((op for backend, op in SDPA_BACKENDS.items() if _sdpa_name(backend) == name), None)
    if expected is None or any(op.startswith(expected) for op in ops):
        return None
    ran = sorted(op for op in ops if op.startswith("aten::_scaled_dot_product"))
    return f"fell back: ran {', '.join(ran) or 'no SDPA kernel'} instead of {expected}"


def _probe(impls, absent, device, dtype, D, causal, pad, rel_pos):
    """Run each peer that may refuse a case (SDPA's backends, FlexAttention, flash-attn) forward+backward on a
    tiny version of it; move refusals, and SDPA backends that ran another kernel than their own, to absent."""
    B, H, L = 2, 2, 64
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = pad(B, L, device=device) if pad else None
    table = torch.randn(32, H, device=device, requires_grad=True) if rel_pos else None
    for name, fn in list(impls.items()):
        if name.startswith(("fastlm", "torch", "hf")):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SDPA explains its refusals as warnings, then raises
                why = _fallback(name, _ops_run(lambda fn=fn: fn(q, k, v, mask, table).sum().backward()))
        except (RuntimeError, ValueError, NotImplementedError) as err:
            why = str(err).strip().splitlines()[0][:100]
        if why is not None:
            absent[name] = why
            del impls[name]


def cases(device, quick=False, keep=None):
    """The cases on `device`; `keep(shape, dtype)` selects some (default: all)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    result = []
    for label, B, H, Lq, Lk, D, causal, pad, rel_pos in shapes:
        shape = _shape(label, B, H, Lq, Lk, D)
        if keep is not None and not keep(shape, dtype):
            continue
        mask = pad(B, Lk, device=device) if pad else None  # (B, Lk), BERT-style right padding

        def inputs(B=B, H=H, Lq=Lq, Lk=Lk, D=D, mask=mask, rel_pos=rel_pos):
            q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(B, H, Lk, D, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(B, H, Lk, D, device=device, dtype=dtype, requires_grad=True)
            table = torch.randn(32, H, device=device, requires_grad=True) if rel_pos else None
            return q, k, v, mask, table

        impls, absent = _impls(device, causal, rel_pos, padded=pad is not None and Lq == Lk)
        _probe(impls, absent, device, dtype, D, causal, pad, rel_pos)
        flops = 4 * B * H * Lq * Lk * D / (2 if causal else 1)
        result.append(
            Case(
                op="attention",
                shape=shape,
                dtype=dtype,
                inputs=inputs,
                impls=impls,
                reference="torch eager",
                work={"fwd": flops, "bwd": 2.5 * flops, "fwd+bwd": 3.5 * flops},
                unit="TFLOP/s",
                absent=absent,
                note=harness.padding_note(mask) if pad else "",
            )
        )
    return result


def _shape(label, B, H, Lq, Lk, D):
    return f"{label} {B}x{H}x{Lq}x{Lk}x{D}"


def summary(rows):
    """Lines giving, for the CPU cases among `rows` (fwd+bwd), each speedup of TARGETS with its target, and
    the peak memory growth of every implementation on the long causal case."""
    shapes = {entry[0]: _shape(*entry[:6]) for entry in CPU_SHAPES}
    present = {r.shape for r in rows}
    lines = []
    for label, impl, baseline, target in TARGETS:
        if shapes[label] not in present:
            continue
        speedup = harness.ratio(rows, shapes[label], impl, baseline)
        measured = "not timed" if speedup is None else f"{speedup:.2f}×"
        lines.append(f"{shapes[label]}: {impl} over {baseline} {measured} (target ≥ {target}×)")
    peaks = [r for r in rows if r.shape == shapes[MEMORY_TARGET] and r.mode == "fwd+bwd" and r.peak_mem_mb is not None]
    if peaks:
        listed = ", ".join(f"{r.impl} {r.peak_mem_mb:.0f}" for r in peaks)
        lines.append(f"{shapes[MEMORY_TARGET]}: peak memory growth, MB: {listed}")
    return lines
