"""Dispatch defaults for CUDA tensors come from committed GPU benchmark results."""

import json

from bench import dispatch


def result_file(tmp_path, name, device_type, rows):
    path = tmp_path / name
    meta = {"device_type": device_type}
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def row(op, impl, ms, shape="s1", mode="fwd+bwd"):
    return {"op": op, "impl": impl, "mode": mode, "median_ms": ms, "shape": shape, "dtype": "bfloat16"}


def test_faster_backend_per_op_wins(tmp_path):
    gpu = result_file(
        tmp_path,
        "a.json",
        "cuda",
        [
            row("layer_norm", "fastlm triton", 1.0),
            row("layer_norm", "fastlm cuda", 2.0),
            row("layer_norm", "fastlm triton", 1.0, shape="s2"),
            row("layer_norm", "fastlm cuda", 0.5, shape="s2"),
            row("attention", "fastlm triton", 3.0),
            row("attention", "fastlm cuda", 2.0),
            row("attention", "fastlm cuda", 0.1, mode="fwd"),
            row("rms_norm", "fastlm triton", 1.0),  # only one backend timed: no decision
        ],
    )
    cpu = result_file(tmp_path, "b.json", "cpu", [row("rms_norm", "fastlm cuda", 0.1)])
    assert dispatch.choose([gpu, cpu]) == {"layer_norm": "triton", "attention": "cuda"}


def test_update_merges_into_the_dispatch_file(tmp_path):
    target = tmp_path / "dispatch.json"
    target.write_text(json.dumps({"rms_norm": "cuda"}))
    gpu = result_file(
        tmp_path, "a.json", "cuda", [row("attention", "fastlm triton", 1.0), row("attention", "fastlm cuda", 2.0)]
    )
    assert dispatch.update([gpu], target) == {"rms_norm": "cuda", "attention": "triton"}
    assert json.loads(target.read_text()) == {"attention": "triton", "rms_norm": "cuda"}
