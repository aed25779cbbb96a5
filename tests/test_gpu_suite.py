"""The GPU suite's plumbing, on the CPU: its quick mode runs each stage's code on the tiny builtins, the wheelhouse plan
carries the lock's versions, and the offline install sees the interpreter's own packages with carried ones winning.
So the day a GPU is lent, ``bench/gpu_suite.py`` works the first time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import device_wheels  # noqa: E402
import gpu_suite  # noqa: E402

pytestmark = pytest.mark.slow


def _numbers(stage: dict) -> dict[str, float]:
    return {figure["name"]: figure["value"] for figure in stage["figures"]}


def test_quick_mode_runs_every_stage_and_reports_every_figure(tmp_path: Path) -> None:
    # cryptography is left out of the device's wheelhouse as never imported: prove it, with it unimportable.
    blocked = tmp_path / "blocked" / "cryptography"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not carried to the device')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(blocked.parent)])}
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--device", "cpu", "--quick"]
    command += ["--out", str(out), "--scratch", str(tmp_path / "scratch")]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-5000:] + finished.stderr[-5000:]

    document = json.loads((out / "gpu_suite.json").read_text())
    stages = {stage["name"]: stage for stage in document["stages"]}
    assert list(stages) == gpu_suite.STAGE_NAMES
    for name, stage in stages.items():
        if stage["status"] == "skipped":  # only where the quick mode says why
            assert stage["reason"].startswith("quick mode: "), (name, stage["reason"])
            continue
        assert stage["status"] == "ran", (name, stage["status"], stage["reason"])
        assert stage["figures"], name
        missing = [figure["name"] for figure in stage["figures"] if figure["value"] is None]
        assert not missing, (name, missing)
    ran = {name for name, stage in stages.items() if stage["status"] == "ran"}
    # Left out in the quick mode: stages whose code another stage runs on the CPU (on another workload).
    quick_skipped = {"sdxl", "sd35", "zimage-turbo", "flux2-klein", "flux2-dev", "qwen-image", "qwen-image-edit"}
    quick_skipped |= {"compile-sdxl", "compile-flux", "compile-sd35"}
    assert ran >= set(gpu_suite.STAGE_NAMES) - quick_skipped

    # The figures the quick mode can judge on a CPU hold: every family's image equals diffusers' alone and in
    # waves, and nothing compiles after ready.
    equivalence = _numbers(stages["equivalence"])
    assert len(equivalence) == 2 * 9
    assert all(value <= 2 for value in equivalence.values()), equivalence
    for name in ("compile-sd-v1", "compile-zimage-turbo", "loras-compiled"):
        compiled = _numbers(stages[name])
        assert compiled["recompilations after ready (torch's log)"] == 0
    assert _numbers(stages["loras-compiled"])["slot memory (4 slots)"] > 0
    assert _numbers(stages["previews"])["previews sent"] > 0

    markdown = (out / "gpu_suite.md").read_text()
    for name in gpu_suite.STAGE_NAMES:
        assert f"**{name}**" in markdown
    assert "| lone / bare, 3 steps |" in markdown


def test_wheelhouse_plan_carries_the_locked_versions_and_leaves_the_device_its_cuda_stack() -> None:
    carried = {name: version for name, version, _, _ in device_wheels.plan()}
    locked = {
        name: version
        for name, version, _ in device_wheels.load_lockfile().entries(
            (ROOT / "docker" / "requirements.lock").read_text()
        )
    }
    assert {"diffusers", "kserve", "fastapi", "uvicorn", "python-multipart", "transformers", "peft"} <= set(carried)
    assert all(carried[name] == locked[name] for name in carried)
    assert not [name for name in carried if device_wheels.DEVICE_OWN.match(name)]
    assert "numpy" not in carried and "torch" not in carried


def _wheel(directory: Path, name: str, version: str, module: str, source: str) -> Path:
    """A minimal pure-Python wheel."""
    dist = f"{name}-{version}.dist-info"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{module}.py", source)
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist}/RECORD", "")
    return path


def test_wheelhouse_environment_sees_this_interpreters_packages_and_carried_versions_win(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "gpu_suite_probe", "1.0", "gpu_suite_probe", "CARRIED = True\n")
    # tabulate is installed here (kserve's): a carried wheel of it must shadow this interpreter's copy.
    _wheel(wheels, "tabulate", "99.0", "tabulate", "SHADOW = True\n")
    python = gpu_suite.install_wheelhouse(wheels, tmp_path / "venv")
    probe = "import sys, torch, gpu_suite_probe, tabulate; print(sys.prefix, tabulate.SHADOW, gpu_suite_probe.CARRIED)"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-3000:]
    prefix, shadow, carried = found.stdout.split()
    assert Path(prefix) == tmp_path / "venv"
    assert shadow == carried == "True"


def test_the_wheelhouse_installs_before_anything_the_device_lacks_is_imported() -> None:
    # The device's python3 has neither pydantic nor kserve: every import the script runs before bootstrap() hands
    # over to the wheelhouse's environment must come from the standard library.
    import ast

    tree = ast.parse((ROOT / "bench" / "gpu_suite.py").read_text())
    early: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "bootstrap" in ast.unparse(node):
            break
        if isinstance(node, ast.Import):
            early += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            early.append((node.module or "").split(".")[0])
    else:
        raise AssertionError("no bootstrap() call at module level")
    assert early, "the script imports nothing before bootstrap()?"
    assert set(early) <= set(sys.stdlib_module_names) | {"__future__"}, early
