"""Dispatch: the op-family declarations (fastlm/ops/_family.py) decide which backend runs a call, what a
forced backend that cannot run it says, what `fastlm info` lists and what `fastlm.backends.calls` counts;
the defaults for CUDA tensors come from committed GPU benchmark results; eager kernel calls show in
torch.profiler traces."""

import json
import re

import pytest
import torch

import fastlm
from bench import dispatch
from fastlm import backends
from fastlm.ops import FAMILIES
from fastlm.ops._family import Kernels, OpFamily
from tests.conftest import backends_under_test, device_under_test


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
            row("attention", "fastlm triton varlen", 1.0),  # the padded cases' varlen rows: varlen_attention
            row("attention", "fastlm cuda varlen", 1.5),
            row("rms_norm", "fastlm triton", 1.0),  # only one backend timed: no decision
        ],
    )
    cpu = result_file(tmp_path, "b.json", "cpu", [row("rms_norm", "fastlm cuda", 0.1)])
    assert dispatch.choose([gpu, cpu]) == {"layer_norm": "triton", "attention": "cuda", "varlen_attention": "triton"}


def test_update_merges_into_the_dispatch_file(tmp_path):
    target = tmp_path / "dispatch.json"
    target.write_text(json.dumps({"rms_norm": "cuda"}))
    gpu = result_file(
        tmp_path, "a.json", "cuda", [row("attention", "fastlm triton", 1.0), row("attention", "fastlm cuda", 2.0)]
    )
    assert dispatch.update([gpu], target) == {"rms_norm": "cuda", "attention": "triton"}
    assert json.loads(target.read_text()) == {"attention": "triton", "rms_norm": "cuda"}


def test_dispatch_file_is_read_once_until_reloaded(tmp_path, monkeypatch):
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"attention": "cuda"}))
    monkeypatch.setattr(backends, "DISPATCH_FILE", path)
    backends.reload_dispatch()
    try:
        assert backends.dispatch_defaults() == {"attention": "cuda"}
        path.write_text(json.dumps({"attention": "triton"}))
        assert backends.dispatch_defaults() == {"attention": "cuda"}
        backends.reload_dispatch()
        assert backends.dispatch_defaults() == {"attention": "triton"}
    finally:
        backends.reload_dispatch()


def test_update_reloads_the_dispatch_defaults(tmp_path, monkeypatch):
    target = tmp_path / "dispatch.json"
    monkeypatch.setattr(backends, "DISPATCH_FILE", target)
    backends.reload_dispatch()
    try:
        assert backends.dispatch_defaults() == {}
        gpu = result_file(
            tmp_path, "a.json", "cuda", [row("attention", "fastlm triton", 2.0), row("attention", "fastlm cuda", 1.0)]
        )
        dispatch.update([gpu], target)
        assert backends.dispatch_defaults() == {"attention": "cuda"}
    finally:
        backends.reload_dispatch()


def test_calls_are_counted_per_plain_op_name():
    """A call the kernels cannot take is counted under the op's own name, whatever the reason."""
    before = backends.calls.copy()
    fastlm.layer_norm(torch.randn(3, 8, dtype=torch.float64))
    q = torch.randn(1, 2, 5, 300, dtype=torch.float16)
    fastlm.attention(q, q, q)  # head dim 300: no kernel takes it
    assert backends.calls - before == {("layer_norm", "reference"): 1, ("attention", "reference"): 1}


@pytest.mark.skipif(fastlm._ext.C is None, reason="fastlm._C not built")
def test_forcing_a_backend_without_the_op_names_it_and_why():
    """Every built-in family has kernels on every backend now: a family declared with Triton kernels only."""
    family = OpFamily("softcap", ("softcap",), {"triton": Kernels()})
    with fastlm.use_backend("cpu"), pytest.raises(RuntimeError) as err:
        family.select("softcap", torch.device("cpu"), torch.float32)
    message = str(err.value)
    assert "'cpu' was forced for softcap on cpu, but it has no softcap kernels (they exist for triton)" in message
    assert "float32" not in message


@pytest.mark.skipif(fastlm._ext.C_EMU is None, reason="fastlm._C_emu not built")
def test_a_refusal_states_the_limit_of_the_kernels():
    q = torch.randn(1, 2, 5, 32)
    with fastlm.use_backend("cuda_emu"), pytest.raises(RuntimeError) as err:
        fastlm.attention(q, q, q)
    assert str(err.value) == (
        "fastlm backend 'cuda_emu' was forced for attention on cpu, but it has no attention on torch.float32 "
        "(its kernels take torch.float16, torch.bfloat16)"
    )


def _info_ops(name):
    """The ops `fastlm info` lists for backend `name`."""
    lines = fastlm.info().splitlines()
    table = lines[lines.index("ops per backend:") + 1 :]
    return next(line.split(None, 1)[1] for line in table if line.split()[0] == name)


def test_info_lists_the_ops_of_each_backend():
    for name in backends.BACKENDS[:-1]:
        listed = _info_ops(name)
        for family in FAMILIES.values():
            for op in family.ops:
                assert (re.search(rf"\b{op}\b", listed) is not None) == (name in family.kernels), (name, listed)
    assert "attention (torch.float16, torch.bfloat16; head dims 32, 64, 96, 128, 256)" in _info_ops("cuda_emu")
    assert _info_ops("reference") == "every op, any dtype"


def test_tests_run_each_family_on_the_backends_that_declare_it():
    device = device_under_test()
    for name, family in FAMILIES.items():
        expected = [b for b in fastlm.available_backends(device) if b in family.kernels or b == "reference"]
        assert backends_under_test(f"tests.ops.test_{name}") == expected
    assert backends_under_test("tests.test_patch") == fastlm.available_backends(device)


def test_no_profiler_no_record_function(monkeypatch):
    """Outside a profiler the eager kernel call is made directly, with no profiler range around it."""

    def fail(name):
        raise AssertionError(f"record_function({name!r}) without a profiler")

    monkeypatch.setattr(torch.profiler, "record_function", fail)
    with fastlm.use_backend("cpu" if fastlm._ext.C is not None else "reference"):
        fastlm.layer_norm(torch.randn(3, 8))


def test_profiler_trace_of_a_patched_bert_step_names_fastlm_ops():
    """In eager mode the ops skip the dispatcher; torch.profiler still lists each kernel call as fastlm::<op>."""
    patch_tests = pytest.importorskip("tests.test_patch")
    if "triton" not in fastlm.available_backends("cpu"):
        pytest.skip("triton, the backend with every op for fp32 CPU tensors, runs them only under TRITON_INTERPRET=1")
    model = patch_tests.patched_copy(
        patch_tests.build(patch_tests.transformers.BertForMaskedLM, patch_tests.bert_config(layers=1))
    )
    ids, mask = patch_tests.padded_batch((6, 4))
    labels = patch_tests.mlm_labels(ids, mask)
    with fastlm.use_backend("triton"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        patch_tests.run(model, True, input_ids=ids, attention_mask=mask, labels=labels)
    names = {event.key for event in prof.key_averages()}
    for op in ("norm_fwd", "norm_bwd", "attention_fwd", "attention_bwd", "cross_entropy_fwd"):
        assert f"fastlm::{op}" in names, sorted(n for n in names if "fastlm" in n)
