"""The `fastlm` command: `fastlm info` and `fastlm bench [...]` (see `fastlm bench --help`)."""

import argparse
import sys


def main(argv=None):
    """Entry point of the `fastlm` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastlm", description="fused kernels for BERT/GPT/T5 training")
    parser.add_argument("command", choices=("info", "bench"), help="info: backends and versions; bench: benchmarks")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"info takes no arguments, got {' '.join(rest)}")
        import fastlm

        print(fastlm.info())
        return 0
    from .bench.__main__ import main as bench_main

    bench_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
