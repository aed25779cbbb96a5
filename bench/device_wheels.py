"""The wheelhouse for the lent GPU machine: the packages its image lacks or holds at another version, at this
project's locked versions (docker/requirements.lock), for CPython 3.12 on manylinux x86_64, in ``.whl/``
(git-ignored), with this project's own wheel built from the tree. Run it here, where PyPI is reachable; the
device machine reaches nothing, so ``bench/gpu_suite.py`` installs these offline there.

    python bench/device_wheels.py            # download, build, check the size, print the carry path
    python bench/device_wheels.py --plan     # only say what would be carried and why

Which packages, read against the device's package list (``../.library/device/KINDS.md``, "Python packages already
there", read 2026-11-17, and its "pip list" row of 2026-11):

- **Carried, absent there**: every locked package the image does not have: diffusers, kserve and those of its
  dependencies it lacks (fastapi, starlette, uvicorn and its ``standard`` extras httptools, watchfiles, websockets
  and python-dotenv, python-multipart, pydantic and pydantic-core, orjson, cloudevents, grpcio-tools,
  grpc-interceptor, kubernetes and the rest), and huggingface-hub 2's own new needs (httpx2, httpcore2). A
  server run under ``python -X importtime`` (load, generation, both image routes) imports kubernetes and
  grpcio-tools too, so they travel although they are large (10 MiB).
- **Carried, there at another version**: transformers (5.17.0 there; this project needs at least 5.20, and its
  LoRA tests ran on the locked 5.23), huggingface-hub (1.33.0 there; 2.4.0 locked) and tokenizers (0.23.2 there).
- **Carried, there at a version nobody read, small, and their exact version shapes what runs**: peft (the LoRA
  layers; transformers 5.23 takes text-encoder adapters only from the locked 0.21) and protobuf (kserve's
  generated gRPC code requires a runtime at least as new as the one it was generated with, 6.33.5).
- **Left to the device**: torch, triton and the CUDA libraries (nvidia-*, cuda-*): the device's own CUDA build
  is the one measured, and they are gigabytes. numpy (2.5.2 there, 2.4.6 locked): 16 MiB, a quarter of what a
  call may carry, and torch, scipy, pandas and the rest there were built against the device's numpy; the project
  asks for numpy>=1.26 and none of its arithmetic runs in numpy. The other locked packages the device has (scipy,
  pandas, pillow, accelerate 1.15.0, safetensors 0.8.0, ...) stay at the device's versions too, within the
  project's requirements as far as anyone has read them; ``gpu_suite.py`` reports every locked package whose
  installed version differs from the lock, and ``pip check`` against this project's own requirements, beside the
  figures.
- **Left out, absent there**: cryptography with cffi and pycparser (5 MiB). kserve requires it, but neither the
  server (the ``-X importtime`` run above) nor the suite imports it; the suite's test proves the quick mode runs
  with it made unimportable.

The wheelhouse plus the working tree must stay under 48 MiB (the device tool carries 64 MiB a call). Each wheel is
hash-checked against the lock; a wheel of another version left over from an earlier run is removed (two versions
of one package stop the offline install). ``MANIFEST.json`` in the folder records what is there and why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".whl"
PYTHON_VERSION = "3.12"
# pip matches manylinux_2_N exactly, so every N up to the device's glibc (2.39, Ubuntu 24.04) is named.
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)
]
CARRY_LIMIT_MIB = 64  # what one call of the device tool may carry: working tree plus carried paths
BUDGET_MIB = 48  # well under the limit: room for the tree to grow and for a few more wheels

# KINDS.md, "Python packages already there" (the device image 'cuda', read 2026-11-17), as it lists them.
_DEVICE_LIST = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE_HAS = frozenset(_DEVICE_LIST.split())
# KINDS.md's "pip list" row (2026-11): the versions read there, for the packages this project locks.
DEVICE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
# The device's own CUDA build of torch and its stack are what is measured.
DEVICE_OWN = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
# There at a version nobody read, but small, and their exact version shapes what runs (see the docstring).
CARRIED_ANYWAY = {
    "peft": "there at an unread version: the LoRA layers, and transformers 5.23 takes text-encoder adapters from 0.21",
    "protobuf": "there at an unread version: kserve's generated gRPC code needs a runtime at least as new as 6.33.5",
}
# There at another version, left there (see the docstring).
LEFT_THERE = {
    "numpy": "16 MiB, and the device's torch, scipy and pandas were built against its own numpy (2.5.2); >=1.26 asked",
}
# Absent there, and never imported by the server or the suite (see the docstring).
NOT_IMPORTED = {
    "cryptography": "5 MiB with cffi and pycparser; kserve requires it, but serving and the suite never import it",
    "cffi": "cryptography's",
    "pycparser": "cffi's",
}


def load_lockfile():
    """docker/lockfile.py, the lock's one parser (docker/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "docker" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan() -> list[tuple[str, str, str, str]]:
    """(name, version, the lock entry with its hashes, why) for every locked package to carry."""
    lockfile = load_lockfile()
    carried = []
    for name, version, entry in lockfile.entries(lockfile.LOCK.read_text()):
        if DEVICE_OWN.match(name) or name in LEFT_THERE or name in NOT_IMPORTED:
            continue
        if name not in DEVICE_HAS:
            why = "absent there"
        elif name in DEVICE_VERSIONS and DEVICE_VERSIONS[name] != version:
            why = f"{DEVICE_VERSIONS[name]} there"
        elif name in CARRIED_ANYWAY:
            why = CARRIED_ANYWAY[name]
        else:
            continue
        carried.append((name, version, entry, why))
    return carried


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return _normalise(name), version


def download(carried: list[tuple[str, str, str, str]]) -> None:
    WHEELHOUSE.mkdir(exist_ok=True)
    wanted = {name: version for name, version, _, _ in carried}
    for wheel in WHEELHOUSE.glob("*.whl"):  # another version of a carried package, or one no longer carried
        name, version = _wheel_name_version(wheel)
        if name != "diffusion-predictor" and wanted.get(name) != version:
            print(f"removing {wheel.name}")
            wheel.unlink()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        requirements.write("".join(entry for _, _, entry, _ in carried))
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [
        *(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"),
        *("--no-deps", "--only-binary=:all:", "--require-hashes"),
        *("--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms),
        *("-d", str(WHEELHOUSE), "-r", requirements.name),
    ]
    try:
        subprocess.run(command, check=True)
    finally:
        Path(requirements.name).unlink()


def build_own_wheel() -> Path:
    """This project's wheel, built from the tree (a copy, so no build/ or egg-info lands in it). The suite runs the
    tree's code itself (on PYTHONPATH); the installed wheel gives the server its version and lets ``pip check``
    test the device against this project's declared requirements."""
    for old in WHEELHOUSE.glob("diffusion_predictor-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source / name)
        shutil.copytree(ROOT / "predictor", source / "predictor", ignore=shutil.ignore_patterns("__pycache__"))
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
        command += ["--no-deps", "--no-build-isolation", "-w", str(WHEELHOUSE), str(source)]
        subprocess.run(command, check=True)
    return next(WHEELHOUSE.glob("diffusion_predictor-*.whl"))


def travelling_tree_bytes() -> int:
    """What every device call sends besides carried paths: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    paths = [ROOT / name for name in listed.decode().split("\0") if name]
    return sum(path.stat().st_size for path in paths if path.is_file() and not path.is_symlink())


def _commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print what would be carried and why, download nothing")
    options = parser.parse_args()
    carried = plan()
    for name, version, _, why in carried:
        print(f"  {name}=={version}: {why}")
    for name, why in LEFT_THERE.items():
        print(f"  (left at the device's version) {name}: {why}")
    for name, why in NOT_IMPORTED.items():
        print(f"  (left out) {name}: {why}")
    if options.plan:
        return 0
    started = time.perf_counter()
    download(carried)
    own = build_own_wheel()
    wheels = sorted(WHEELHOUSE.glob("*.whl"))
    manifest = {
        "python": PYTHON_VERSION,
        "built_from_commit": _commit(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "carried": {name: {"version": version, "why": why} for name, version, _, why in carried},
        "left_at_device_version": LEFT_THERE,
        "left_out": NOT_IMPORTED,
        "own_wheel": own.name,
        "wheels": [wheel.name for wheel in wheels],
    }
    (WHEELHOUSE / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    wheel_mib = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    tree_mib = travelling_tree_bytes() / 2**20
    total = wheel_mib + tree_mib
    print(
        f"{WHEELHOUSE.relative_to(ROOT)}/: {len(wheels)} wheels, {wheel_mib:.1f} MiB; working tree {tree_mib:.1f} MiB; "
        f"together {total:.1f} MiB of the {CARRY_LIMIT_MIB} MiB a device call may carry "
        f"(budget {BUDGET_MIB} MiB; {time.perf_counter() - started:.0f} s)"
    )
    if total > BUDGET_MIB:
        print(f"too large: over the {BUDGET_MIB} MiB budget; carry fewer packages", file=sys.stderr)
        return 1
    print('carry: [".whl"]')
    return 0


if __name__ == "__main__":
    sys.exit(main())
