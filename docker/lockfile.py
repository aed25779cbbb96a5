"""Install the locked runtime dependencies (docker/requirements.lock) into this interpreter's environment, or check
that the environment holds exactly them. The image, `make` and CI all install from that one lock.

    python docker/lockfile.py install    # torch first, then every other locked package, hash-checked, no resolver
    python docker/lockfile.py check      # exit 1 if an installed version differs from the lock

The lock is made for Linux x86_64 with PyPI's torch, a CUDA build that brings the CUDA libraries (nvidia-*,
cuda-*, triton) as packages. With an NVIDIA driver present (nvidia-smi) the whole lock is installed, exactly as
in the image. Without one, the same torch version is installed as a CPU build and the CUDA packages are left
out: first from a wheel pip already has locally (a find-links directory), else from PyTorch's CPU index
($TORCH_INDEX), as PyTorch advises for CPU-only machines; no CUDA stack is downloaded. $TORCH overrides the
choice with pip arguments of your own, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent / "requirements.lock"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Packages only a CUDA build of torch needs.
_CUDA_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(lock_text: str) -> list[tuple[str, str, str]]:
    """(name, version, the entry's full text with its hashes) for every pinned package of a pip lock file."""
    found = []
    for match in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(.*?)(?=^\S|\Z)", lock_text, re.M | re.S):
        name, version = match.group(1), match.group(2)
        found.append((_normalise(name), version, match.group(0).rstrip() + "\n"))
    return found


def _pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", *args]
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def _has_nvidia_gpu() -> bool:
    return sys.platform == "linux" and shutil.which("nvidia-smi") is not None


def install() -> None:
    locked = entries(LOCK.read_text())
    torch_version = next(version for name, version, _ in locked if name == "torch")
    override = os.environ.get("TORCH", "").strip()
    if not override and _has_nvidia_gpu():
        _pip("--require-hashes", "--no-deps", "-r", str(LOCK))  # exactly what the image installs
        return
    if override:
        _pip(*shlex.split(override))
    else:
        try:  # a CPU wheel pip already has locally (find-links)
            _pip("--no-deps", "--no-index", f"torch=={torch_version}")
        except subprocess.CalledProcessError:
            _pip("--no-deps", f"torch=={torch_version}", "--index-url", os.environ.get("TORCH_INDEX", CPU_INDEX))
    rest = "".join(text for name, _, text in locked if not _CUDA_ONLY.match(name))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as without_cuda:
        without_cuda.write(rest)
    try:
        _pip("--require-hashes", "--no-deps", "-r", without_cuda.name)
    finally:
        os.unlink(without_cuda.name)


def check() -> int:
    """Every locked package installed at its locked version (torch: the same version, any build; the CUDA-only
    packages only where torch is PyPI's build, the lock's own, rather than one with a local label like +cpu)."""
    problems = []
    pypi_torch = "+" not in metadata.version("torch")
    for name, version, _ in entries(LOCK.read_text()):
        if _CUDA_ONLY.match(name) and name != "torch" and not pypi_torch:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: locked {version}, not installed")
            continue
        if installed.split("+")[0] != version:
            problems.append(f"{name}: locked {version}, installed {installed}")
    for problem in problems:
        print(f"lock mismatch: {problem}", file=sys.stderr)
    if problems:
        print(f"the environment differs from {LOCK.name}: remove the venv and install again", file=sys.stderr)
        return 1
    print(f"every package of {LOCK.name} is installed at its locked version")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        install()
    elif sys.argv[1:] == ["check"]:
        sys.exit(check())
    else:
        sys.exit(__doc__)
