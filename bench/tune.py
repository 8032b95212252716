"""The tuning sweep: python -m bench.tune [--device cuda|cpu] [--dry-run] [--out FILE] [--budget-s S] [--jobs N]

Times a small set of launch configurations (tiles, warps, stages) of each Triton kernel family at the
shape classes that BERT, GPT-2 and T5 training hit, and writes the fastest of each to the tuning table
the launchers read (kernels/tuning.json; kernels/launch.py describes it). Every candidate runs through
the public op with the `triton` backend, and its outputs are checked against the launcher's default
configuration's before it is timed: a configuration that does not compile, or computes something else,
is reported and never chosen. The default configuration is always a candidate, so the table only
changes a launch where a candidate measured faster.

Families are split into groups that run as separate processes: they compile their candidates (CPU work)
in parallel, then time them one group at a time under a file lock, so that no two groups share the GPU
while timing. `--budget-s` bounds the whole sweep; candidates not reached in time are listed as such.

`--dry-run` runs the same pipeline on the CPU through Triton's interpreter (tiny shapes, two candidates
per family, fp16) and writes its table under the "cpu" key, so CI exercises the sweep end to end.
"""

import argparse
import fcntl
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TABLE = Path(__file__).resolve().parent.parent / "kernels" / "tuning.json"


@dataclass
class Sweep:
    """One kernel family at one shape class. `setup()` builds the inputs once; `run(state)` launches the
    family's kernels through the public op and returns the tensors to compare between configurations."""

    family: str
    label: str
    setup: callable
    run: callable
    candidates: list


def _configs(names, rows):
    return [dict(zip(names, row, strict=True)) for row in rows]


# ---- the sweeps: (family, shape, candidates); GPU shapes are the headline shapes of the benchmark ----


def _norm_sweeps(device, dtype, dry_run):
    import fastlm
    from fastlm.kernels import norms

    shapes = [(64, 96)] if dry_run else [(32768, 768), (16384, 4096)]
    sweeps = {}
    for rows, n in shapes:

        def setup(rows=rows, n=n):
            x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            w = (torch.rand(n, device=device, dtype=dtype) + 0.5).requires_grad_()
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            y = fastlm.layer_norm(x, w, b)
            return x, w, b, y, torch.randn_like(y)

        def forward(state):
            x, w, b, _, _ = state
            with torch.no_grad():
                return [fastlm.layer_norm(x, w, b)]

        def backward(state):
            x, w, b, y, dy = state
            return list(torch.autograd.grad(y, (x, w, b), dy, retain_graph=True))

        block_n = 2 ** (n - 1).bit_length()
        if dry_run:
            fwd = _configs(("BLOCK_M", "num_warps"), [(1, 1), (4, 1)])
            bwd = _configs(("BLOCK_M", "num_warps", "programs_per_sm"), [(1, 1, 4), (4, 1, 4)])
        else:
            fits = [(m, w) for m in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8, 16) if 32 * w <= m * block_n <= 16384]
            fwd = _configs(("BLOCK_M", "num_warps"), fits)
            bwd = _configs(
                ("BLOCK_M", "num_warps", "programs_per_sm"),
                [(m, w, p) for m, w in fits if m <= 8 and w >= 4 for p in (2, 4, 8)],
            )
        label = f"layer_norm {rows}x{n}"
        sweeps[("norm_fwd", norms.shape_class(n))] = Sweep("norm_fwd", label, setup, forward, fwd)
        sweeps[("norm_bwd", norms.shape_class(n))] = Sweep("norm_bwd", label, setup, backward, bwd)
    return sweeps


def _ce_sweeps(device, dtype, dry_run):
    import fastlm
    from fastlm.kernels import cross_entropy

    shapes = [(16, 300)] if dry_run else [(4096, 30522), (4096, 50257)]
    sweeps = {}
    for rows, v in shapes:

        def setup(rows=rows, v=v):
            logits = torch.randn(rows, v, device=device, dtype=dtype, requires_grad=True)
            labels = torch.randint(0, v, (rows,), device=device)
            return logits, labels

        def forward(state):  # with requires_grad, one pass writes the loss and the gradient
            logits, labels = state
            loss = fastlm.cross_entropy(logits, labels, reduction="none")
            return [loss, *torch.autograd.grad(loss.sum(), logits)]

        if dry_run:
            candidates = _configs(("BLOCK", "num_warps"), [(128, 1), (512, 1)])
        else:
            blocks = [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)]
            candidates = _configs(("BLOCK", "num_warps"), blocks)
        label = f"cross_entropy {rows}x{v}"
        sweeps[("ce_fwd", cross_entropy.shape_class(v))] = Sweep("ce_fwd", label, setup, forward, candidates)
    return sweeps


ATTENTION_NAMES = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
ATTENTION_FWD = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 4, 3),
                 (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3)]  # fmt: skip
ATTENTION_FWD_BIAS = [(64, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2),
                      (32, 64, 4, 3)]  # fmt: skip
ATTENTION_BWD = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2),
                 (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 2)]  # fmt: skip
ATTENTION_BWD_BIAS = [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)]


# group -> (label, B, H, L, D, causal, padding, T5 bias) on a GPU, and its tiny version for the dry run
ATTENTION_SHAPES = {
    "attention_bert": (("bert-base-pad", 16, 12, 512, 64, False, True, False),
                       ("bert-pad", 1, 2, 40, 16, False, True, False)),
    "attention_t5": (("t5-base-relpos", 16, 12, 512, 64, False, True, True),
                     ("t5-relpos", 1, 2, 40, 16, False, True, True)),
    "attention_long": (("long-causal", 2, 16, 4096, 128, True, False, False),
                       ("causal", 1, 2, 40, 32, True, False, False)),
}  # fmt: skip


def _attention_sweeps(device, dtype, dry_run, group):
    import fastlm
    from fastlm.kernels import attention

    gpu_shape, tiny_shape = ATTENTION_SHAPES[group]
    sweeps = {}
    for label, B, H, L, D, causal, pad, rel_pos in [tiny_shape if dry_run else gpu_shape]:

        def setup(B=B, H=H, L=L, D=D, causal=causal, pad=pad, rel_pos=rel_pos):
            q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            mask = None
            if pad:  # right padding, lengths between half and all of L
                lengths = torch.randint(L // 2, L + 1, (B, 1), device=device)
                mask = torch.arange(L, device=device)[None, :] < lengths  # (B, L)
            table = torch.randn(32, H, device=device, requires_grad=True) if rel_pos else None
            rp = fastlm.RelativePositionBias(table, True) if rel_pos else None
            kwargs = {"causal": causal, "key_padding_mask": mask, "rel_pos": rp}
            o = fastlm.attention(q, k, v, **kwargs)
            leaves = (q, k, v) + ((table,) if rel_pos else ())
            return q, k, v, kwargs, o, torch.randn_like(o), leaves

        def forward(state):
            q, k, v, kwargs, *_ = state
            with torch.no_grad():
                return [fastlm.attention(q, k, v, **kwargs)]

        def backward(state):
            *_, o, do, leaves = state
            return list(torch.autograd.grad(o, leaves, do, retain_graph=True))

        probe = torch.empty(1, 1, 1, D, dtype=dtype)
        if dry_run:
            fwd = bwd = [(16, 16, 1, 1), (32, 16, 1, 1)]
        else:
            fwd, bwd = (ATTENTION_FWD_BIAS, ATTENTION_BWD_BIAS) if rel_pos else (ATTENTION_FWD, ATTENTION_BWD)
        name = f"attention {label} {B}x{H}x{L}x{D}"
        shape_class = attention.shape_class(probe, rel_pos)
        sweeps[("attention_fwd", shape_class)] = Sweep(
            "attention_fwd", name, setup, forward, _configs(ATTENTION_NAMES, fwd)
        )
        sweeps[("attention_bwd", shape_class)] = Sweep(
            "attention_bwd", name, setup, backward, _configs(ATTENTION_NAMES, bwd)
        )
    return sweeps


GROUPS = {
    "norms": _norm_sweeps,
    "cross_entropy": _ce_sweeps,
    **{group: functools.partial(_attention_sweeps, group=group) for group in ATTENTION_SHAPES},
}


# ---- one group, in its own process ----


def _relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all() or actual.shape != expected.shape:
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _time_ms(fn, device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _run_group(group, device, dtype, dry_run, deadline, lock_path):
    """Sweep every family of `group`: compile and check each candidate, then time them under the lock.
    Returns {"family/shape_class": measured} (see _measured)."""
    import fastlm
    from fastlm.kernels.launch import trial

    results = {}
    for (family, shape_class), sweep in GROUPS[group](device, dtype, dry_run).items():
        with fastlm.use_backend("triton"):
            state = sweep.setup()

            def launch(config, sweep=sweep, family=family, shape_class=shape_class, state=state):
                with fastlm.use_backend("triton"), trial(family, shape_class, config):
                    return sweep.run(state)

            expected = launch({})  # the launcher's default configuration
            tried = []
            for config in sweep.candidates:
                if time.monotonic() > deadline:
                    tried.append({"config": config, "error": "not tried: time budget"})
                    continue
                try:
                    error = max(map(_relative_error, launch(config), expected))
                except Exception as exc:  # a configuration that does not compile or launch is skipped
                    tried.append({"config": config, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
                    continue
                ok = error < (1e-2 if dtype != torch.float32 else 1e-4)
                tried.append({"config": config, "rel_error": error, **({} if ok else {"error": "wrong result"})})
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one group times at a time
                default_ms = _time_ms(lambda launch=launch: launch({}), device)
                for entry in tried:
                    if "error" not in entry:
                        entry["ms"] = _time_ms(lambda c=entry["config"], launch=launch: launch(c), device)
        results[f"{family}/{shape_class}"] = _measured(sweep, default_ms, tried)
        print(f"tuned {family} {shape_class}", file=sys.stderr, flush=True)
    return results


def _measured(sweep, default_ms, tried):
    timed = [entry for entry in tried if "ms" in entry]
    best = min(timed, key=lambda entry: entry["ms"], default=None)
    return {
        "shape": sweep.label,
        "default_ms": default_ms,
        "best": None if best is None or best["ms"] >= default_ms else best["config"],
        "best_ms": default_ms if best is None else min(best["ms"], default_ms),
        "candidates": tried,
    }


# ---- the whole sweep ----


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes through the interpreter (CI)")
    parser.add_argument("--out", type=Path, default=TABLE, help="the tuning table to write")
    parser.add_argument("--budget-s", type=float, default=180.0, help="time for the whole sweep")
    parser.add_argument("--jobs", type=int, default=len(GROUPS), help="groups swept at once")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, from {', '.join(GROUPS)}")
    parser.add_argument("--group-worker", help=argparse.SUPPRESS)  # internal: run one group, print JSON
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--lock", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _dtype(dry_run):
    # fp16 under the interpreter (triton 3.9's interpreter multiplies bf16 operands of tl.dot as integers),
    # bf16 on a GPU, the dtype of mixed-precision training; both are the "16bit" shape classes
    return torch.float16 if dry_run else torch.bfloat16


def _worker(args):
    device = torch.device(args.device)
    results = _run_group(args.group_worker, device, _dtype(args.dry_run), args.dry_run, args.deadline, args.lock)
    print(json.dumps(results))


def _spawn(groups, args, deadline, lock_path, env):
    """Run the groups, `args.jobs` processes at a time; returns {group: results or error text}."""
    pending, running, done = list(groups), {}, {}
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            group = pending.pop(0)
            command = [sys.executable, "-m", "bench.tune", "--device", args.device, "--group-worker", group,
                       "--deadline", str(deadline), "--lock", lock_path]  # fmt: skip
            command += ["--dry-run"] if args.dry_run else []
            running[group] = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        for group, process in list(running.items()):
            if process.poll() is None:
                continue
            out = process.stdout.read()
            try:
                done[group] = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else None
            except (json.JSONDecodeError, IndexError):
                done[group] = None
            if done[group] is None:
                done[group] = f"failed (exit status {process.returncode})"
            del running[group]
        time.sleep(0.2)
    return done


def write_table(path, device, meta, measured):
    """Merge the winners of `measured` into the table at `path` under `device`'s kind (other kinds kept)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    configs = table.setdefault("configs", {}).setdefault(torch.device(device).type, {})
    for key, result in measured.items():
        family, shape_class = key.split("/")
        configs.setdefault(family, {}).pop(shape_class, None)
        if result["best"] is not None:
            configs[family][shape_class] = result["best"]
    for family in [f for f, entries in configs.items() if not entries]:
        del configs[family]
    table["meta"] = meta
    table["measured"] = {**table.get("measured", {}), **measured}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def print_summary(measured, failures, file=sys.stdout):
    header = f"{'family':<14} {'shape class':<18} {'shape':<40} {'default ms':>10} {'best ms':>9} {'gain':>6}  best"
    print(header, file=file)
    for key, result in sorted(measured.items()):
        family, shape_class = key.split("/")
        gain = result["default_ms"] / result["best_ms"]
        errors = sum("error" in entry for entry in result["candidates"])
        best = result["best"] or "default"
        print(
            f"{family:<14} {shape_class:<18} {result['shape']:<40} {result['default_ms']:>10.4f} "
            f"{result['best_ms']:>9.4f} {gain:>5.2f}×  {best}" + (f"  ({errors} refused)" if errors else ""),
            file=file,
        )
    for group, why in failures.items():
        print(f"group {group}: {why}", file=file)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
        if not args.dry_run:
            raise SystemExit("tuning times GPU kernels: on the CPU only --dry-run (the interpreter) runs")
    if args.group_worker:
        return _worker(args)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    from .harness import metadata

    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        done = _spawn(groups, args, deadline, str(Path(tmp) / "lock"), env)
    measured = {key: value for result in done.values() if isinstance(result, dict) for key, value in result.items()}
    failures = {group: result for group, result in done.items() if isinstance(result, str)}
    write_table(args.out, device, metadata(device), measured)
    print_summary(measured, failures)
    print(f"wrote {args.out}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
