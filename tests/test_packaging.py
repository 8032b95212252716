"""fastlm as a user installs it: a wheel built from this checkout, installed into a fresh virtual
environment and used from outside the source tree; and `import fastlm` without the optional
dependencies, each of which, when needed, says which extra installs it."""

import os
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest
import torch

import fastlm
from fastlm._optional import MissingDependency

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("ops", "nn", "models", "data", "train", "kernels", "bench")
OPTIONAL = ("triton", "transformers", "tokenizers", "safetensors", "tqdm", "matplotlib", "datasets")


def _clean_env(**extra):
    """The environment minus what would put the checkout on sys.path."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "FASTLM_GIT_COMMIT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _run(args, cwd, env=None, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _build_wheel(dest):
    """`pip wheel --no-build-isolation --no-deps .` of the checkout, with the extension required and
    without the emulator (the slow part of a build). Compiled objects stay in build/temp.* between runs
    (ninja rebuilds what changed); the staged package folders are removed first, so that a file deleted
    from the source cannot survive in the wheel."""
    for stale in (*ROOT.glob("build/lib.*"), *ROOT.glob("build/bdist.*")):
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    env = _clean_env(FASTLM_EMU="0", FASTLM_REQUIRE_EXTENSION="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps", "-w", str(dest), "."],
        cwd=ROOT,
        env=env,
    )
    (wheel,) = dest.glob("fastlm-*.whl")
    return wheel


def _fresh_venv(path, wheel):
    """A new virtual environment holding the wheel, that reuses this environment's torch (and the other
    dependencies) through a .pth line naming the folder torch is installed in. Entries of a .pth file are
    added to sys.path without running the .pth files inside them, so an editable install of fastlm there
    (its import hook is such a .pth file) stays out, and the environment's own site-packages comes first."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    python = path / "bin" / "python"
    # pip looks at the target interpreter's installed packages: install before the .pth line exists, so
    # the fastlm of this environment is neither seen as "already satisfied" nor uninstalled.
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    _run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)], cwd=path)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=path).strip())
    (site / "reuse_dependencies.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    return python, site


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")

    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("fastlm", *(f"fastlm/{p}" for p in SUBPACKAGES)):
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    assert any(n.startswith("fastlm/_C.") and n.endswith(".so") for n in names), "the wheel has no fastlm._C"
    # Every JSON table the package reads at run time is shipped (the GPU ones exist only once committed).
    tables = {"bench/results": "fastlm/bench/results", "kernels": "fastlm/kernels", "fastlm": "fastlm"}
    for folder, installed in tables.items():
        shipped = {n for n in names if n.startswith(installed + "/") and n.count("/") == installed.count("/") + 1}
        expected = {f"{installed}/{p.name}" for p in (ROOT / folder).glob("*.json")}
        assert {n for n in shipped if n.endswith(".json")} == expected

    python, site = _fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        import torch
        import fastlm

        assert fastlm.__file__.startswith({str(site)!r}), fastlm.__file__
        for name in {SUBPACKAGES!r}:
            importlib.import_module("fastlm." + name)
        modules = [m.name for m in pkgutil.walk_packages(fastlm.__path__, "fastlm.") if not m.name.endswith("__main__")]
        for name in modules:
            importlib.import_module(name)
        assert fastlm._ext.C is not None, fastlm._ext.C_ERROR
        assert "cpu" in fastlm.available_backends("cpu")
        x = torch.randn(3, 5, 16)
        w, b = torch.randn(16), torch.randn(16)
        expected = torch.nn.functional.layer_norm(x, (16,), w, b, eps=1e-5)
        torch.testing.assert_close(fastlm.layer_norm(x, w, b), expected, atol=1e-5, rtol=1e-5)
        assert fastlm.backends.calls[("layer_norm", "cpu")] == 1, dict(fastlm.backends.calls)
        from fastlm.bench.harness import git_commit
        assert git_commit(fastlm.__version__) == "unknown (fastlm " + fastlm.__version__ + ")"
        print(len(modules), "modules")
        """
    )
    out = _run([str(python), "-c", script], cwd=work)
    assert "modules" in out

    fastlm_cmd = python.parent / "fastlm"
    info = _run([str(fastlm_cmd), "info"], cwd=work)
    assert info.startswith(f"fastlm {fastlm.__version__}\n")
    assert "cpu        available" in info
    assert "usage: fastlm pretrain" in _run([str(fastlm_cmd), "pretrain", "--help"], cwd=work)
    assert "fastlm " in _run([str(python), "-m", "fastlm", "info"], cwd=work)


def test_import_without_the_optional_dependencies():
    """With every optional dependency missing, fastlm and its subpackages import and an op runs; each
    feature that needs one says which extra to install."""
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in OPTIONAL)
    code = textwrap.dedent(
        f"""
        import sys
        {blocked}
        import torch
        import fastlm, fastlm.ops, fastlm.nn, fastlm.models, fastlm.data, fastlm.train, fastlm.bench
        x = torch.randn(4, 8)
        torch.testing.assert_close(fastlm.rms_norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert "triton: not installed" in fastlm.info()

        def says(extra, fn):
            try:
                fn()
            except ImportError as err:
                assert f"pip install 'fastlm[{{extra}}]'" in str(err), err
            else:
                raise AssertionError(f"{{fn}} ran without its optional dependency")

        says("triton", lambda: __import__("fastlm.kernels.norms"))
        says("train", lambda: fastlm.data.train_tokenizer("bert", ["a b c"], vocab_size=64))
        says("models", lambda: fastlm.models.BertModel.from_pretrained("no-such-dir"))
        from fastlm.cli import main
        assert main(["bench"]) == 2
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fastlm bench: error: fastlm bench needs tqdm" in result.stderr


def test_missing_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MissingDependency, match=r"pip install 'fastlm\[train\]'") as info:
        fastlm.data.train_tokenizer("gpt", ["some text"], vocab_size=300)
    assert isinstance(info.value, ImportError) and info.value.name == "tokenizers"


def test_one_version():
    """The version lives in fastlm/version.py; setup.py and the package both take it from there."""
    from fastlm.version import __version__

    assert fastlm.__version__ == __version__
    out = _run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=_clean_env(FASTLM_EMU="0"))
    assert out.strip().splitlines()[-1] == __version__


def test_bench_results_name_their_commit(monkeypatch):
    """Benchmark JSON is tagged with the checkout's commit, or FASTLM_GIT_COMMIT where the tree has no .git
    (an installed copy is covered by the wheel test)."""
    from bench.harness import git_commit

    monkeypatch.setenv("FASTLM_GIT_COMMIT", "abc1234")
    assert git_commit("0") == "abc1234"
    monkeypatch.delenv("FASTLM_GIT_COMMIT")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip(f"not a git checkout here: {head.stderr.strip()}")
    assert git_commit("0") == head.stdout.strip()
