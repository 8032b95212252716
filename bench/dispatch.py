"""Dispatch defaults from measured results (docs/architecture.md, "Backends and dispatch").

For every op timed on a GPU with both the `triton` and the `cuda` backend, the default for CUDA
tensors is the backend with the smaller total forward+backward median over the op's shapes. The
attention suite's "varlen" rows (varlen attention on the padded cases' real tokens) decide
varlen_attention. The choice is written to fastlm/dispatch.json, which fastlm.backends reads; ops
missing from it default to triton.
"""

import json
from collections import defaultdict
from pathlib import Path

from fastlm.backends import DISPATCH_FILE, reload_dispatch

# impl -> (the op it decides, None for the row's own, and the backend)
CANDIDATES = {
    "fastlm triton": (None, "triton"),
    "fastlm cuda": (None, "cuda"),
    "fastlm triton varlen": ("varlen_attention", "triton"),
    "fastlm cuda varlen": ("varlen_attention", "cuda"),
}


def choose(result_files):
    """{op: backend} from benchmark JSON files of CUDA runs; an op is decided only where both backends
    were timed on the same shapes."""
    totals = defaultdict(lambda: defaultdict(dict))  # op -> backend -> (shape, dtype) -> ms
    for path in result_files:
        data = json.loads(Path(path).read_text())
        if data["meta"]["device_type"] != "cuda":
            continue
        for row in data["rows"]:
            op, backend = CANDIDATES.get(row["impl"], (None, None))
            if backend is None or row["mode"] != "fwd+bwd" or row["median_ms"] is None:
                continue
            totals[op or row["op"]][backend][(row["shape"], row["dtype"])] = row["median_ms"]
    chosen = {}
    for op, per_backend in totals.items():
        if len(per_backend) < 2:
            continue
        shared = set.intersection(*(set(times) for times in per_backend.values()))
        if shared:
            chosen[op] = min(per_backend, key=lambda b: sum(per_backend[b][s] for s in shared))
    return chosen


def update(result_files, path=DISPATCH_FILE):
    """Merge the choices from `result_files` into the dispatch file; returns the full mapping."""
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(choose(result_files))
    path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    reload_dispatch()  # fastlm reads the file once; this process sees the new choices
    return current
