"""Timing, memory, ceilings and reporting shared by every benchmark.

A benchmark module (bench_<op>.py) exposes `cases(device, quick)`, a list of `Case`. Each case names the
implementations to compare; the harness times forward, backward and both for each, measures peak
memory of forward+backward, converts times to GB/s (or TFLOP/s) against the machine's ceilings
measured in the same run, and computes the speedup over the case's reference implementation.
"""

import datetime
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastlm.data import stdlib_docstrings, train_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    """One shape of one op. `impls` maps a name to a function of `inputs()`'s tensors returning the
    output; `work` maps each mode to bytes moved (unit "GB/s") or floating-point operations
    ("TFLOP/s"); the reference implementation is the one speedups are relative to."""

    op: str
    shape: str
    dtype: torch.dtype
    inputs: callable
    impls: dict
    reference: str
    work: dict
    unit: str = "GB/s"
    absent: dict = field(default_factory=dict)  # peer name -> why it was not run
    note: str = ""  # said on every timed row of the case (e.g. how much of a padded batch is padding)


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    mode: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    throughput: float | None = None
    unit: str = "GB/s"
    pct_of_ceiling: float | None = None
    speedup: float | None = None
    peak_mem_mb: float | None = None
    note: str = ""


class ShapeFilter:
    """The shape labels of --shapes (comma-separated, e.g. "8192x768,gpt2 8x1024"; empty: keep all).

    Called with each label a benchmark module offers, it says whether to keep it and records the label,
    so that ``unmatched()`` can name the requested labels no module offered (typos are errors, not
    silently empty runs).
    """

    def __init__(self, text):
        self.wanted = {label.strip() for label in text.split(",") if label.strip()}
        if text.strip() and not self.wanted:
            raise ValueError(f"--shapes: no shape label in {text!r}; expected comma-separated labels such as 8192x768")
        self.offered = set()

    def __call__(self, shape):
        self.offered.add(shape)
        return not self.wanted or shape in self.wanted

    def unmatched(self):
        """The requested labels that no case offered, sorted."""
        return sorted(self.wanted - self.offered)


def padding_mask(batch, length, seed=0, device="cpu"):
    """(batch, length) bool, True = a token, False = padding on the right: seeded random lengths, one
    draw in each of `batch` equal strata between a tenth of `length` and all of it, so that about 45 %
    of the positions are padding, as in BERT's training batches."""
    generator = torch.Generator().manual_seed(seed)
    strata = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch  # (batch,) in [0, 1)
    lengths = (length * (0.1 + 0.9 * strata)).long().clamp(1, length)
    lengths = lengths[torch.randperm(batch, generator=generator)]
    return (torch.arange(length)[None, :] < lengths[:, None]).to(device)  # (batch, length)


@functools.cache
def _sentence_pair_lengths():
    """(N,) int64 token counts of [CLS] A [SEP] B [SEP] over every two consecutive sentences A, B of a document
    of the default pretraining corpus (the standard library's docstrings, fastlm.data), WordPiece-tokenized
    by a tokenizer trained on them: the lengths of a sentence-pair batch. Untruncated; a few seconds, once."""
    docs = stdlib_docstrings(max_chars=200_000)
    tokenizer = train_tokenizer("bert", docs, vocab_size=8000)
    sentences = [re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) for doc in docs]
    first = tokenizer.encode_batch([a for doc in sentences for a in doc[:-1]])
    second = tokenizer.encode_batch([b for doc in sentences for b in doc[1:]])
    return torch.tensor([3 + len(a) + len(b) for a, b in zip(first, second, strict=True)])


def sentence_pair_mask(batch, length, seed=0, device="cpu"):
    """(batch, length) bool, True = a token, False = padding on the right: the lengths of `batch` sentence
    pairs of the default corpus drawn at random (seeded), truncated to `length`; about 65 % of the positions
    of a batch of 128 are padding."""
    lengths = _sentence_pair_lengths()
    picked = torch.randint(len(lengths), (batch,), generator=torch.Generator().manual_seed(seed))
    lengths = lengths[picked].clamp(max=length)  # (batch,)
    return (torch.arange(length)[None, :] < lengths[:, None]).to(device)  # (batch, length)


def padding_note(mask):
    """'padding N %' of a (batch, length) bool mask (True = token)."""
    return f"padding {100 * (1 - mask.float().mean().item()):.0f} %"


def ratio(rows, shape, impl, baseline, mode="fwd+bwd"):
    """How many times faster `impl` ran than `baseline` on `shape` in `mode` (the baseline's median time
    over impl's); None when either was not timed."""
    times = {r.impl: r.median_ms for r in rows if r.shape == shape and r.mode == mode and r.median_ms is not None}
    return times[baseline] / times[impl] if impl in times and baseline in times else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps, budget_s=2.0, rep_ms=100):
    """(median, 20th, 80th percentile) milliseconds of fn(): time_many of fn alone."""
    return time_many({"fn": fn}, device, reps, budget_s, rep_ms)["fn"]


def _quantiles(times):
    """(median, 20th, 80th percentile) of a list of milliseconds."""
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def time_many(fns, device, reps, budget_s=2.0, rep_ms=100):
    """{name: (median, 20th, 80th percentile) milliseconds} of each fn() of `fns` (name -> fn). On a GPU:
    triton's do_bench of each in turn over about `rep_ms` milliseconds of calls, flushing L2 between calls.
    On the CPU: wall clock, round-robin, one call of each per round after a warm-up call of each, so that
    a load coming and going on a shared machine weighs on every fn alike; up to `reps` rounds, fewer (at
    least 3) when the slowest fn would take more than `budget_s`."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=rep_ms)) for name, fn in fns.items()}
    slowest = 1e-9
    for fn in fns.values():
        start = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - start)
    times = {name: [] for name in fns}
    for _ in range(max(3, min(reps, int(budget_s / slowest)))):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _quantiles(t) for name, t in times.items()}


def _allocator_peak_bytes(fn):
    """Peak of the bytes allocated and not yet freed through PyTorch's CPU allocator while fn() runs,
    from the profiler's memory events (every allocation and free, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def peak_memory_mb(fn, device):
    """Growth of peak memory while fn() runs, over what was allocated before: the CUDA allocator's peak
    on a GPU, the peak of tensor memory allocated by PyTorch's CPU allocator (measured by the profiler,
    exact whatever malloc keeps cached) on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return _allocator_peak_bytes(fn) / 2**20


def ceilings(device):
    """Copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s), measured now."""
    big = 2**28 if device.type == "cuda" else 2**24
    src = torch.randn(big // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms, _, _ = time_ms(lambda: dst.copy_(src), device, reps=10)
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms, _, _ = time_ms(lambda: a @ b, device, reps=10)
    return {
        "copy_gbps": 2 * big / copy_ms / 1e6,
        "matmul_tflops": 2 * n**3 / mm_ms / 1e9,
        "matmul_dtype": str(dtype),
    }


def git_commit(version):
    """The commit results are tagged with: FASTLM_GIT_COMMIT when set (a copy of the tree without .git,
    as on a GPU machine), else HEAD of the checkout this file belongs to (not of some repository an
    installed copy happens to sit in), else "unknown (fastlm <version>)"."""
    if os.environ.get("FASTLM_GIT_COMMIT"):
        return os.environ["FASTLM_GIT_COMMIT"]
    here = Path(__file__).resolve()
    try:
        top, commit = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=here.parent,
            check=True,
        ).stdout.splitlines()
        if Path(top).resolve() / "bench" / here.name == here:
            return commit
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    return f"unknown (fastlm {version})"


def metadata(device):
    """Device name, date and versions that tag every result file."""
    import fastlm

    commit = git_commit(fastlm.__version__)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fastlm": fastlm.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
    }


def _clear_grads(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None


def warm_case(case):
    """Run every implementation of `case` forward and backward once: compiles what it compiles (torch.compile,
    FlexAttention, Triton) into the on-disk caches, so that a later timed run in another process starts warm."""
    tensors = case.inputs()
    for fn in case.impls.values():
        _clear_grads(tensors)
        out = fn(*tensors)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.randn_like(out))


def skipped_rows(case, why):
    """One row per implementation of `case` that was not run, saying why."""
    dtype = str(case.dtype).replace("torch.", "")
    return [Row(case.op, case.shape, dtype, name, "fwd+bwd", None, None, None, note=why) for name in case.impls]


def run_case(case, device, reps, ceiling, rep_ms=100):
    """All rows (impl × mode) of one case."""
    rows = []
    tensors = case.inputs()
    outputs = {}
    for name, fn in case.impls.items():
        out = fn(*tensors)
        out = out[0] if isinstance(out, tuple) else out
        grad = torch.randn_like(out)
        outputs[name] = (fn, grad)

    def modes(fn, grad):
        def forward():
            fn(*tensors)

        kept = fn(*tensors)
        kept = kept[0] if isinstance(kept, tuple) else kept

        def backward():
            _clear_grads(tensors)
            kept.backward(grad, retain_graph=True)

        def both():
            _clear_grads(tensors)
            y = fn(*tensors)
            (y[0] if isinstance(y, tuple) else y).backward(grad)

        return {"fwd": forward, "bwd": backward, "fwd+bwd": both}

    fns = {name: modes(fn, grad) for name, (fn, grad) in outputs.items()}
    timings = {
        mode: time_many({name: f[mode] for name, f in fns.items()}, device, reps, rep_ms=rep_ms) for mode in MODES
    }
    for name in fns:
        for mode in MODES:
            median, p20, p80 = timings[mode][name]
            throughput = case.work[mode] / median / 1e6 if case.unit == "GB/s" else case.work[mode] / median / 1e9
            ceiling_value = ceiling["copy_gbps"] if case.unit == "GB/s" else ceiling["matmul_tflops"]
            rows.append(
                Row(
                    case.op,
                    case.shape,
                    str(case.dtype).replace("torch.", ""),
                    name,
                    mode,
                    median,
                    p20,
                    p80,
                    throughput,
                    case.unit,
                    100 * throughput / ceiling_value,
                    note=case.note,
                )
            )
        _sync(device)
        _clear_grads(tensors)  # the call allocates its gradients anew: they count, the previous ones do not
        peak = peak_memory_mb(fns[name]["fwd+bwd"], device)
        for row in rows[-len(MODES) :]:
            row.peak_mem_mb = peak
    reference = {r.mode: r.median_ms for r in rows if r.impl == case.reference}
    for row in rows:
        row.speedup = reference[row.mode] / row.median_ms
    for peer, why in case.absent.items():
        rows.append(
            Row(
                case.op,
                case.shape,
                str(case.dtype).replace("torch.", ""),
                peer,
                "fwd+bwd",
                None,
                None,
                None,
                note=f"absent: {why}",
            )
        )
    return rows


def print_table(rows, file=None):
    header = (
        f"{'op':<12} {'shape':<28} {'dtype':<9} {'impl':<26} {'mode':<8} {'median ms':>10} "
        f"{'[p20, p80]':>18} {'throughput':>14} {'%ceil':>6} {'speedup':>8} {'peak MB':>8}"
    )
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in rows:
        if r.median_ms is None:
            print(f"{r.op:<12} {r.shape:<28} {r.dtype:<9} {r.impl:<26} {r.note}", file=file)
            continue
        peak = "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}"
        print(
            f"{r.op:<12} {r.shape:<28} {r.dtype:<9} {r.impl:<26} {r.mode:<8} {r.median_ms:>10.3f} "
            f"{f'[{r.p20_ms:.3f}, {r.p80_ms:.3f}]':>18} {r.throughput:>9.1f} {r.unit:<4} "
            f"{r.pct_of_ceiling:>5.0f}% {r.speedup:>7.2f}× {peak:>8}  {r.note}".rstrip(),
            file=file,
        )


def write_json(path, meta, ceiling, rows, summary=()):
    """The results file: metadata, ceilings, every row, and the summary lines (the ratios a run is read for)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "ceilings": ceiling, "rows": [asdict(r) for r in rows], "summary": list(summary)}
    path.write_text(json.dumps(record, indent=1))


def _speedup(timed, group, impl, baseline):
    """The fwd+bwd speedup of `impl` in `group` (op, shape, dtype): over the case's reference when
    `baseline` is None, else over `baseline`; 0 when not timed."""
    match = [r for r in timed if (r.op, r.shape, r.dtype) == group and r.impl == impl]
    if not match:
        return 0
    if baseline is None:
        return match[0].speedup or 0
    return ratio(timed, group[1], impl, baseline) or 0


def _peak(timed, group, impl):
    match = [r for r in timed if (r.op, r.shape, r.dtype) == group and r.impl == impl]
    return match[0].peak_mem_mb or 0 if match else 0


def _tick(op, shape, dtype):
    """An x tick label: the op, the shape's name, its sizes wrapped at 12 characters, the dtype."""
    name, _, sizes = shape.partition(" ")
    return "\n".join([op, name, *textwrap.wrap(sizes, 12), dtype])


def _bars(ax, groups, impls, value):
    """One bar per implementation in each group, of height value(group, impl)."""
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs = [g + (k - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [value(group, impl) for group in groups], width, label=impl)
    ax.set_xticks(range(len(groups)), [_tick(*group) for group in groups], fontsize=7)


def plot(path, title, rows, baselines=(None,), notes=()):
    """Forward+backward speedups (one panel per entry of `baselines`: None = over the case's reference, else
    over that implementation) per shape and implementation, peak memory growth, and `notes` (lines of
    text) under the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.mode == "fwd+bwd" and r.median_ms is not None]
    groups = list(dict.fromkeys((r.op, r.shape, r.dtype) for r in timed))
    impls = list(dict.fromkeys(r.impl for r in timed))
    panels = len(baselines) + 1
    fig, axes = plt.subplots(1, panels, figsize=(panels * max(5, 0.8 * len(groups) + 2), 4.8 + 0.2 * len(notes)))
    for ax, baseline in zip(axes, baselines, strict=False):
        _bars(ax, groups, impls, lambda group, impl, baseline=baseline: _speedup(timed, group, impl, baseline))
        ax.set_ylabel(f"speedup over {baseline or 'reference'} (×, higher is better)")
        ax.axhline(1.0, color="black", linewidth=0.8)
    _bars(axes[-1], groups, impls, lambda group, impl: _peak(timed, group, impl))
    axes[-1].set_ylabel("peak memory growth, MB (lower is better)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title + " — forward+backward")
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.03 * len(notes), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
