"""python -m bench [--ops norms,...] [--device cuda|cpu] [--shapes 8192x768,...] [--out DIR] [--quick]"""

import argparse
import importlib
import sys
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
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="folder for JSON and PNG results")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (a smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement on the CPU")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tqdm import tqdm

    device = torch.device(args.device)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(SUITES))
    if unknown:
        raise SystemExit(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    keep = {s.strip() for s in args.shapes.split(",") if s.strip()}
    reps = args.reps or (3 if args.quick else 15)
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
        module = importlib.import_module(f".bench_{op}", __package__)
        if op == "models":
            module.run_all(device, args.quick, args.reps or (3 if args.quick else 10), args.out, meta)
            continue
        cases = [c for c in module.cases(device, quick=args.quick) if not keep or c.shape in keep]
        rows = []
        for case in tqdm(cases, desc=f"bench {op}", unit="case", file=sys.stderr):
            rows.extend(harness.run_case(case, device, reps, ceiling))
        print()
        harness.print_table(rows)
        json_path = args.out / f"{op}-{slug}.json"
        png_path = args.out / f"{op}-{slug}.png"
        harness.write_json(json_path, meta, ceiling, rows)
        harness.plot(png_path, f"fastlm {op} on {meta['device']}", rows)
        print(f"wrote {json_path} and {png_path}")
        written.append(json_path)
    if device.type == "cuda" and not args.quick and args.out == harness.RESULTS:
        print(f"dispatch defaults for CUDA tensors: {dispatch.update(written)} (fastlm/dispatch.json)")


if __name__ == "__main__":
    main()
