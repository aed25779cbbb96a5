"""One lock for the image, `make` and CI: the environment under test is the lock, and the install commands say
what the README says they do."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lockfile_module():
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "docker" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_this_environment_is_exactly_the_lock() -> None:
    """What the tests run on is what the image installs (torch: the same version, here maybe a CPU build)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "lockfile.py"), "check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_lock_entries_keep_their_hashes_and_cuda_packages_are_told_apart() -> None:
    lockfile = lockfile_module()
    entries = lockfile.entries((ROOT / "docker" / "requirements.lock").read_text())
    names = {name for name, _, _ in entries}
    assert {"torch", "diffusers", "kserve", "transformers"} <= names
    assert all("--hash=sha256:" in text for _, _, text in entries), "every entry is hash-pinned"
    cuda_only = {name for name in names if lockfile._CUDA_ONLY.match(name)}
    assert "torch" in cuda_only and "triton" in cuda_only and any(n.startswith("nvidia-") for n in cuda_only)
    assert not cuda_only & {"diffusers", "numpy", "safetensors"}


def test_torch_override_reaches_pip_as_separate_arguments(monkeypatch) -> None:
    lockfile = lockfile_module()
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(lockfile, "_pip", lambda *args: calls.append(args))
    monkeypatch.setattr(lockfile, "_has_nvidia_gpu", lambda: False)
    monkeypatch.setenv("TORCH", "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126")
    lockfile.install()
    assert calls[0] == ("torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu126")
    assert calls[1][:3] == ("--require-hashes", "--no-deps", "-r"), "then the rest of the lock, hash-checked"
    assert len(calls) == 2


def test_without_a_gpu_torch_is_the_cpu_build_of_the_locked_version(monkeypatch) -> None:
    lockfile = lockfile_module()
    calls: list[tuple[str, ...]] = []

    requirements: list[str] = []

    def pip(*args: str) -> None:
        calls.append(args)
        if "-r" in args:
            requirements.append(Path(args[-1]).read_text())
        if "--no-index" in args:  # no local wheel: the CPU index is next
            raise subprocess.CalledProcessError(1, "pip")

    monkeypatch.setattr(lockfile, "_pip", pip)
    monkeypatch.setattr(lockfile, "_has_nvidia_gpu", lambda: False)
    monkeypatch.delenv("TORCH", raising=False)
    monkeypatch.delenv("TORCH_INDEX", raising=False)
    lockfile.install()
    version = next(v for name, v, _ in lockfile.entries(lockfile.LOCK.read_text()) if name == "torch")
    assert calls[0] == ("--no-deps", "--no-index", f"torch=={version}"), "a local CPU wheel first"
    assert calls[1] == ("--no-deps", f"torch=={version}", "--index-url", "https://download.pytorch.org/whl/cpu")
    (rest,) = requirements
    assert "diffusers==" in rest and "--hash=sha256:" in rest
    assert "torch==" not in rest and "nvidia-" not in rest and "triton==" not in rest, "no CUDA stack on a CPU"


def test_make_has_the_rules_the_readme_names() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    for rule in ("serve", "test", "lint", "install"):
        result = subprocess.run([make, "-n", rule], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, (rule, result.stderr)
    assert "ruff check" in subprocess.run([make, "-n", "lint"], cwd=ROOT, capture_output=True, text=True).stdout
