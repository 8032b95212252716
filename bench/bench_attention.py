"""Benchmark fastlm.attention against PyTorch and its peers on the shapes of BERT, GPT-2, T5 and long context.

Peers (each reported as absent, with the reason, when it cannot run a case): the PyTorch reference
(eager and torch.compile), SDPA with each of its backends (flash, efficient, math, cudnn),
FlexAttention (score_mod for the T5 bias, block masks for padding and causal), Hugging Face's eager T5
attention (T5Attention.compute_bias + eager_attention_forward) and flash-attn when installed.
TFLOP/s counts 4·B·H·Lq·Lk·D for forward, 2.5× that for backward, half of it for causal.
Without a GPU the cases shrink to tiny CPU shapes (a smoke run, not a measurement).

    python -m bench.bench_attention [--case NAME ...] [--mode fwd bwd fwd+bwd] [--out DIR]
"""

import argparse
import datetime
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.attention import RelativePositionBias, attention_reference

RESULTS = Path(__file__).parent / "results" / "local"


@dataclass
class Case:
    name: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    causal: bool = False
    pad: bool = False
    rel_pos: bool = False

    def flops(self, mode):
        fwd = 4 * self.B * self.H * self.Lq * self.Lk * self.D / (2 if self.causal else 1)
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


GPU_CASES = [
    Case("bert-base-128", 32, 12, 128, 128, 64),
    Case("bert-base-128-pad", 32, 12, 128, 128, 64, pad=True),
    Case("bert-base-512", 32, 12, 512, 512, 64),
    Case("bert-base-512-pad", 32, 12, 512, 512, 64, pad=True),
    Case("gpt2-1024-causal", 8, 12, 1024, 1024, 64, causal=True),
    Case("t5-base-512-relpos", 16, 12, 512, 512, 64, rel_pos=True),
    Case("t5-base-cross-512-114", 16, 12, 114, 512, 64, pad=True),
    Case("long-4096-causal", 2, 16, 4096, 4096, 128, causal=True),
]
CPU_CASES = [
    Case("tiny-bert-pad", 2, 2, 64, 64, 32, pad=True),
    Case("tiny-gpt-causal", 2, 2, 64, 64, 32, causal=True),
    Case("tiny-t5-relpos", 2, 2, 64, 64, 32, rel_pos=True),
]


class Absent(Exception):
    """A peer that cannot run a case; the message says why."""


# ----------------------------------------------------------------------------------------------
# Inputs and peers: each peer maps (case, inputs) to a forward callable returning (B, H, Lq, D)
# ----------------------------------------------------------------------------------------------

def make_inputs(case, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    inputs = {
        "q": rand(case.B, case.H, case.Lq, case.D),  # (B, H, Lq, D)
        "k": rand(case.B, case.H, case.Lk, case.D),  # (B, H, Lk, D)
        "v": rand(case.B, case.H, case.Lk, case.D),  # (B, H, Lk, D)
        "mask": None,
        "table": None,
    }
    if case.pad:  # lengths between half and all of Lk, BERT-style right padding
        lengths = torch.randint(case.Lk // 2, case.Lk + 1, (case.B,), generator=g)
        inputs["mask"] = (torch.arange(case.Lk)[None, :] < lengths[:, None]).to(device)  # (B, Lk)
    if case.rel_pos:
        inputs["table"] = (torch.randn(32, case.H, generator=g)).to(device).requires_grad_()  # (buckets, H)
    return inputs


def _rel_pos(case, x):
    return None if x["table"] is None else RelativePositionBias(x["table"], bidirectional=not case.causal)


def _dense_bias(case, x):
    """The additive (B or 1, H, Lq, Lk) bias the peers without in-kernel T5 buckets need."""
    bias = None
    if x["table"] is not None:
        bias = _rel_pos(case, x).bias(case.Lq, case.Lk)[None].to(x["q"].dtype)  # (1, H, Lq, Lk)
    if x["mask"] is not None:
        pad = torch.zeros(x["mask"].shape, dtype=x["q"].dtype, device=x["q"].device)
        pad = pad.masked_fill(~x["mask"], float("-inf"))[:, None, None, :]  # (B, 1, 1, Lk)
        bias = pad if bias is None else bias + pad
    return bias


def peer_fastlm(case, x):
    scale = 1.0 if case.rel_pos else None
    return lambda: fastlm.attention(x["q"], x["k"], x["v"], causal=case.causal, key_padding_mask=x["mask"],
                                    rel_pos=_rel_pos(case, x), scale=scale)


def peer_reference(case, x, compiled=False):
    fn = torch.compile(attention_reference) if compiled else attention_reference
    scale = 1.0 if case.rel_pos else None
    return lambda: fn(x["q"], x["k"], x["v"], causal=case.causal, key_padding_mask=x["mask"],
                      rel_pos=_rel_pos(case, x), scale=scale)


def peer_sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name.upper())

    def make(case, x):
        causal = case.causal
        if causal and (x["mask"] is not None or x["table"] is not None):
            raise Absent("SDPA takes either is_causal or attn_mask")
        if causal and case.Lq != case.Lk:
            raise Absent("SDPA's is_causal is top-left aligned")
        scale = 1.0 if case.rel_pos else None

        def run():
            bias = _dense_bias(case, x)  # built from the table on every call: its gradient is timed too
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=bias,
                                                      is_causal=causal, scale=scale)

        try:
            run()
        except RuntimeError as err:
            raise Absent(str(err).splitlines()[0][:120]) from None
        return run

    return make


def peer_flex(case, x):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    mask, Lq, Lk = x["mask"], case.Lq, case.Lk

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx + (Lk - Lq) if case.causal else kv_idx >= 0
        return keep & mask[b, kv_idx] if mask is not None else keep

    block_mask = None
    if case.causal or mask is not None:
        block_mask = create_block_mask(mask_mod, case.B if mask is not None else None, None, Lq, Lk,
                                       device=x["q"].device)
    score_mod, scale = None, None
    if x["table"] is not None:
        table, scale = x["table"], 1.0
        bucket = _rel_pos(case, x).diagonal_buckets(Lq, Lk)  # (Lq + Lk - 1,)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[bucket[kv_idx - q_idx + Lq - 1], h]

    return lambda: flex(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask, scale=scale)


def peer_hf_t5(case, x):
    if not case.rel_pos:
        raise Absent("HF T5 attention is benchmarked on the rel_pos cases")
    try:
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Attention, eager_attention_forward
    except ImportError as err:
        raise Absent(f"transformers is not installed ({err})") from None
    config = T5Config(d_model=case.H * case.D, d_kv=case.D, num_heads=case.H,
                      relative_attention_num_buckets=32, is_decoder=case.causal)
    module = T5Attention(config, has_relative_attention_bias=True).to(x["q"].device)
    module.relative_attention_bias._parameters["weight"] = x["table"]  # the shared leaf, so its grad is timed
    mask = _dense_bias(case, {**x, "table": None})

    def run():
        bias = module.compute_bias(case.Lq, case.Lk, device=x["q"].device).to(x["q"].dtype)  # (1, H, Lq, Lk)
        out, _ = eager_attention_forward(module, x["q"], x["k"], x["v"], mask, scaling=1.0,
                                         position_bias=bias)
        return out.transpose(1, 2)  # (B, Lq, H, D) -> (B, H, Lq, D)

    return run


def peer_flash_attn(case, x):
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise Absent(f"flash-attn is not installed ({err})") from None
    if case.pad or case.rel_pos:
        raise Absent("flash-attn takes no key padding mask (varlen only) and no additive bias")
    q, k, v = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))  # (B, L, H, D) views
    return lambda: flash_attn_func(q, k, v, causal=case.causal).transpose(1, 2)


PEERS = {
    "fastlm": peer_fastlm,
    "reference": peer_reference,
    "reference-compiled": lambda case, x: peer_reference(case, x, compiled=True),
    "sdpa-flash": peer_sdpa("flash_attention"),
    "sdpa-efficient": peer_sdpa("efficient_attention"),
    "sdpa-cudnn": peer_sdpa("cudnn_attention"),
    "sdpa-math": peer_sdpa("math"),
    "flex": peer_flex,
    "hf-t5-eager": peer_hf_t5,
    "flash-attn": peer_flash_attn,
}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def _step(fwd, mode, inputs):
    """The timed callable of `mode`; "bwd" times backward alone through a graph kept alive."""
    leaves = [t for t in (inputs["q"], inputs["k"], inputs["v"], inputs["table"]) if t is not None]
    if mode == "fwd":
        return torch.no_grad()(fwd)
    out = fwd()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    return lambda: torch.autograd.grad(fwd(), leaves, grad)


def measure(step, device):
    """(median, 20th, 80th percentile) milliseconds."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100))
    step()
    step()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=5)
    return statistics.median(times), q[0], q[3]


def run(cases, modes, peers, device, dtype):
    rows = []
    for case in cases:
        x = make_inputs(case, device, dtype)
        for peer in peers:
            for mode in modes:
                row = {"case": case.name, **asdict(case), "peer": peer, "mode": mode}
                try:
                    fwd = PEERS[peer](case, x)
                    step = _step(fwd, mode, x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    ms, p20, p80 = measure(step, device)
                    row.update(ms=ms, p20=p20, p80=p80, tflops=case.flops(mode) / ms / 1e9)
                    if device == "cuda":
                        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                except Absent as why:
                    row["absent"] = str(why)
                except (RuntimeError, NotImplementedError, ValueError) as err:
                    row["absent"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                rows.append(row)
                shown = f"{row['ms']:9.3f} ms {row['tflops']:7.2f} TFLOP/s" if "ms" in row else row["absent"]
                print(f"{case.name:24} {mode:8} {peer:20} {shown}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="*", help="case names (default: all)")
    parser.add_argument("--mode", nargs="*", default=["fwd", "bwd", "fwd+bwd"])
    parser.add_argument("--peer", nargs="*", default=list(PEERS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    if args.case:
        cases = [c for c in cases if c.name in args.case]
    rows = run(cases, args.mode, args.peer, device, dtype)
    meta = {
        "op": "attention",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "fastlm": fastlm.__version__, "dtype": str(dtype),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"attention-{device}-{meta['date'][:10]}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
