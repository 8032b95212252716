"""fastlm's benchmark suite: every op against PyTorch's own ops and the peers that are installed.

Run `python -m bench` (or `fastlm bench`, or `make bench`); see `python -m bench --help`.
"""
