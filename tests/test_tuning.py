"""The Triton launchers: they launch on their tensors' device and read the tuning table that the sweep
(bench.tune) writes; and the sweep's dry run writes a table the launchers then use."""

import json
import types

import pytest
import torch

import fastlm
from fastlm.kernels import attention, cross_entropy, launch, norms

pytestmark = pytest.mark.skipif(
    "triton" not in fastlm.available_backends("cpu"), reason="Triton runs CPU tensors only under TRITON_INTERPRET=1"
)


class LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch_with(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch_with


def _spy(monkeypatch, module, name):
    spy = LaunchSpy(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


def _table(tmp_path, monkeypatch, configs):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"meta": {}, "configs": {"cpu": configs}}))
    monkeypatch.setenv("FASTLM_TUNING", str(path))
    launch.reload_tuning()
    return path


@pytest.fixture(autouse=True)
def _fresh_table():
    launch.reload_tuning()
    yield
    launch.reload_tuning()


def test_norm_launchers_take_their_tuned_configuration(tmp_path, monkeypatch):
    x = torch.randn(37, 100, requires_grad=True)
    n_class = norms.shape_class(100)
    _table(tmp_path, monkeypatch, {
        "norm_fwd": {n_class: {"BLOCK_M": 2, "num_warps": 2}},
        "norm_bwd": {n_class: {"BLOCK_M": 8, "num_warps": 4, "programs_per_sm": 2}},
    })  # fmt: skip
    fwd, bwd = _spy(monkeypatch, norms, "_norm_fwd_kernel"), _spy(monkeypatch, norms, "_norm_bwd_kernel")
    with fastlm.use_backend("triton"):
        y = fastlm.layer_norm(x)
    y.sum().backward()
    assert (fwd.launches[0]["BLOCK_M"], fwd.launches[0]["num_warps"]) == (2, 2)
    assert (bwd.launches[0]["BLOCK_M"], bwd.launches[0]["num_warps"]) == (8, 4)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (100,)), atol=1e-5, rtol=1e-5)


def test_a_class_missing_from_the_table_keeps_the_default(tmp_path, monkeypatch):
    _table(tmp_path, monkeypatch, {"norm_fwd": {"n4096": {"BLOCK_M": 2, "num_warps": 2}}})
    fwd = _spy(monkeypatch, norms, "_norm_fwd_kernel")
    with fastlm.use_backend("triton"):
        fastlm.rms_norm(torch.randn(5, 100))
    assert fwd.launches[0]["BLOCK_M"] == norms.ELEMENTS_PER_PROGRAM // 128


def test_cross_entropy_launcher_takes_its_tuned_configuration(tmp_path, monkeypatch):
    _table(tmp_path, monkeypatch, {"ce_fwd": {cross_entropy.shape_class(300): {"BLOCK": 64, "num_warps": 2}}})
    spy = _spy(monkeypatch, cross_entropy, "_ce_fwd_kernel")
    logits, labels = torch.randn(9, 300), torch.randint(0, 300, (9,))
    with fastlm.use_backend("triton"):
        loss = fastlm.cross_entropy(logits, labels)
    assert (spy.launches[0]["BLOCK"], spy.launches[0]["num_warps"]) == (64, 2)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))


def test_attention_launchers_take_their_tuned_configuration(tmp_path, monkeypatch):
    q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    shape_class = attention.shape_class(q, has_score_bias=False)
    assert shape_class == "d16-16bit"
    _table(tmp_path, monkeypatch, {
        "attention_fwd": {shape_class: {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}},
        "attention_bwd": {shape_class: {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1}},
    })  # fmt: skip
    fwd, dq = _spy(monkeypatch, attention, "_fwd_kernel"), _spy(monkeypatch, attention, "_bwd_dq_kernel")
    with fastlm.use_backend("triton"):
        o = fastlm.attention(q, k, v)
    o.float().sum().backward()
    fwd_opt, dq_opt = fwd.launches[0]["OPT"], dq.launches[0]["OPT"]  # the kernels' compile-time Options
    assert (fwd_opt.BLOCK_M, fwd_opt.BLOCK_N, fwd.launches[0]["num_warps"]) == (32, 16, 2)
    assert (dq_opt.BLOCK_M, dq_opt.BLOCK_N) == (16, 32)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(o.float(), expected, atol=2e-3, rtol=2e-3)


def test_a_trial_overrides_the_table_for_its_family_and_class_only(tmp_path, monkeypatch):
    _table(tmp_path, monkeypatch, {"norm_fwd": {"n128": {"BLOCK_M": 2}}, "norm_bwd": {"n128": {"BLOCK_M": 4}}})
    default = {"BLOCK_M": 32, "num_warps": 1}
    with launch.trial("norm_fwd", "n128", {"BLOCK_M": 8}):
        assert launch.tuned("norm_fwd", "n128", "cpu", default) == {"BLOCK_M": 8, "num_warps": 1}
        assert launch.tuned("norm_bwd", "n128", "cpu", default)["BLOCK_M"] == 4
    with launch.trial("norm_fwd", "n128", {}):
        assert launch.tuned("norm_fwd", "n128", "cpu", default) == default
    assert launch.tuned("norm_fwd", "n128", "cpu", default)["BLOCK_M"] == 2
    assert launch.tuned("norm_fwd", "n128", "cuda", default) == default  # entries are per device kind


@pytest.mark.parametrize("op", ["layer_norm", "cross_entropy", "attention"])
def test_launchers_enter_their_tensors_device(monkeypatch, op):
    entered = []

    def recording_on_device(tensor):
        entered.append(tensor.device)
        return launch.on_device(tensor)

    for module in (norms, cross_entropy, attention):
        monkeypatch.setattr(module, "on_device", recording_on_device)
    x = torch.randn(3, 4, 32, 16, requires_grad=True)
    with fastlm.use_backend("triton"):
        if op == "layer_norm":
            out = fastlm.layer_norm(x)
        elif op == "cross_entropy":
            out = fastlm.cross_entropy(x.view(-1, 16), torch.randint(0, 16, (3 * 4 * 32,)))
        else:
            out = fastlm.attention(x, x, x)
    out.sum().backward()
    assert entered and set(entered) == {x.device}


def test_on_device_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    class RecordingDevice:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    with launch.on_device(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    with launch.on_device(torch.empty(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_the_sweeps_dry_run_writes_a_table_the_launchers_read(tmp_path, monkeypatch):
    from bench import tune

    table = tmp_path / "tuning.json"
    tune.main(["--dry-run", "--device", "cpu", "--groups", "norms,cross_entropy", "--jobs", "2",
               "--out", str(table), "--budget-s", "120"])  # fmt: skip
    written = json.loads(table.read_text())
    measured = written["measured"]
    assert set(measured) == {"norm_fwd/n128", "norm_bwd/n128", "ce_fwd/v512"}
    for result in measured.values():
        assert result["default_ms"] > 0 and len(result["candidates"]) == 2
        assert all("rel_error" in c for c in result["candidates"]), result["candidates"]
    # a chosen entry, if any, is one of the candidates; force one to check the launchers read it back
    configs = written["configs"].get("cpu", {})
    for key, result in measured.items():
        family, shape_class = key.split("/")
        if result["best"] is not None:
            assert configs[family][shape_class] == result["best"]
    written["configs"]["cpu"] = {"ce_fwd": {"v512": {"BLOCK": 128, "num_warps": 1}}}
    table.write_text(json.dumps(written))
    monkeypatch.setenv("FASTLM_TUNING", str(table))
    launch.reload_tuning()
    spy = _spy(monkeypatch, cross_entropy, "_ce_fwd_kernel")
    with fastlm.use_backend("triton"):
        fastlm.cross_entropy(torch.randn(4, 300), torch.randint(0, 300, (4,)))
    assert spy.launches[0]["BLOCK"] == 128


def test_the_committed_table_holds_only_known_families_and_parameters():
    if not launch.TUNING_FILE.exists():
        pytest.skip("no tuning table committed yet (written by python -m bench.tune on a GPU)")
    table = json.loads(launch.TUNING_FILE.read_text())
    known = {
        "norm_fwd": {"BLOCK_M", "num_warps"},
        "norm_bwd": {"BLOCK_M", "num_warps", "programs_per_sm"},
        "ce_fwd": {"BLOCK", "num_warps"},
        "attention_fwd": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"},
        "attention_bwd": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"},
    }
    assert set(table["configs"]) <= {"cuda"}
    for family, classes in table["configs"].get("cuda", {}).items():
        for config in classes.values():
            assert set(config) <= known[family], (family, config)
