"""python -m bench [--ops norms,...] [--device cuda|cpu] [--shapes 8192x768,...] [--headline] [--out DIR] [--quick]
                  [--budget-s S] [--rep-ms MS] [--warm-only] [--update-dispatch] [--dispatch-file FILE]"""

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from . import dispatch, harness

OPS = ("norms", "attention", "cross_entropy")
SUITES = (*OPS, "models")  # op benchmarks, then one training step of each model


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastlm bench", description=__doc__)
    parser.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated, from {', '.join(SUITES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="", help="comma-separated shape labels to keep (e.g. 8192x768)")
    parser.add_argument(
        "--headline", action="store_true", help="only each op's HEADLINE shapes in its first dtype (not with --quick)"
    )
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="folder for JSON and PNG results")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (a smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement on the CPU")
    parser.add_argument("--rep-ms", type=float, default=100, help="milliseconds of calls per GPU measurement")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop starting cases after this many seconds (rest listed)"
    )
    parser.add_argument(
        "--warm-only", action="store_true", help="run every implementation once (fill compile caches), time nothing"
    )
    parser.add_argument(
        "--update-dispatch",
        action="store_true",
        help="write the triton/cuda choice per op to the dispatch file (default: full CUDA runs into bench/results)",
    )
    parser.add_argument("--dispatch-file", type=Path, default=dispatch.DISPATCH_FILE, help="fastlm/dispatch.json")
    return parser.parse_args(argv)


def _keep(module, args, shapes):
    """The `keep(shape, dtype)` filter of --shapes (a harness.ShapeFilter) and --headline."""
    headline = getattr(module, "HEADLINE", None) if args.headline and not args.quick else None
    first_dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    def keep(shape, dtype):
        if not shapes(shape):
            return False
        return headline is None or (shape in headline and dtype == first_dtype)

    return keep


def _op_cases(ops, device, args):
    """{op: its cases after --shapes / --headline} for the op suites in `ops`; SystemExit naming the
    labels of --shapes that no case of these suites has, and the labels they do have."""
    try:
        shapes = harness.ShapeFilter(args.shapes)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    cases = {}
    for op in (op for op in ops if op != "models"):
        module = importlib.import_module(f".bench_{op}", __package__)
        cases[op] = module.cases(device, quick=args.quick, keep=_keep(module, args, shapes))
    unmatched = shapes.unmatched()
    if unmatched:
        suites = ", ".join(cases) or "no op suite (--shapes selects op shapes; the models suite has none)"
        where = f"{device.type}{' with --quick' if args.quick else ''}"
        raise SystemExit(
            f"--shapes: no case of {suites} has shape {', '.join(map(repr, unmatched))}; "
            f"their shapes on {where}: {', '.join(sorted(shapes.offered)) or 'none'}"
        )
    return cases


def _summary(op, rows):
    """The lines of the op module's `summary(rows)` (the ratios its cases are read for), if it has one."""
    module = importlib.import_module(f".bench_{op}", __package__)
    return module.summary(rows) if hasattr(module, "summary") else []


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tqdm import tqdm

    start = time.monotonic()
    device = torch.device(args.device)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(SUITES))
    if unknown:
        raise SystemExit(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    reps = args.reps or (3 if args.quick else 15)
    op_cases = _op_cases(ops, device, args)

    def over_budget():
        return args.budget_s is not None and time.monotonic() - start > args.budget_s

    if args.warm_only:
        for cases in op_cases.values():
            for case in cases:
                if over_budget():
                    return
                harness.warm_case(case)
                print(f"warmed {case.op} {case.shape}", flush=True)
        return

    meta = harness.metadata(device)
    print(f"fastlm bench on {meta['device']} ({device.type}), torch {meta['torch']}, commit {meta['git_commit']}")
    ceiling = harness.ceilings(device)
    print(
        f"measured ceilings: copy {ceiling['copy_gbps']:.1f} GB/s, matmul {ceiling['matmul_tflops']:.2f} TFLOP/s "
        f"({ceiling['matmul_dtype']})"
    )
    slug = "quick-" + device.type if args.quick else device.type
    written = []
    for op in ops:
        if op == "models":
            if over_budget():
                print("models: not run (time budget)")
                continue
            models = importlib.import_module(".bench_models", __package__)
            models.run_all(device, args.quick, args.reps or (3 if args.quick else 10), args.out, meta)
            continue
        rows = []
        for case in tqdm(op_cases[op], desc=f"bench {op}", unit="case", file=sys.stderr):
            if over_budget():
                rows.extend(harness.skipped_rows(case, "not run: time budget"))
                continue
            rows.extend(harness.run_case(case, device, reps, ceiling, rep_ms=args.rep_ms))
        print()
        harness.print_table(rows)
        summary = _summary(op, rows)
        for line in summary:
            print(line)
        json_path = args.out / f"{op}-{slug}.json"
        png_path = args.out / f"{op}-{slug}.png"
        harness.write_json(json_path, meta, ceiling, rows, summary)
        harness.plot(png_path, f"fastlm {op} on {meta['device']}", rows, notes=summary)
        print(f"wrote {json_path} and {png_path}")
        written.append(json_path)
    full_run = device.type == "cuda" and not args.quick and args.out == harness.RESULTS
    if args.update_dispatch or full_run:
        chosen = dispatch.update(written, args.dispatch_file)
        print(f"dispatch defaults for CUDA tensors: {chosen} ({args.dispatch_file})")


if __name__ == "__main__":
    main()
