"""One command for a lent GPU: every figure BENCHMARKS.md owes, measured in order of value within a time budget.

    python3 bench/gpu_suite.py --wheels .whl           # on the device machine (BENCHMARKS.md: the exact `run` call)
    python bench/gpu_suite.py --device cpu --quick     # anywhere: every stage on the tiny builtins (2 minutes)
    python bench/gpu_suite.py --list                   # the stages, their order and their budgets

On the device it first installs the wheelhouse that ``bench/device_wheels.py`` made (diffusers, kserve, the
locked transformers, ...) offline into a virtual environment that also sees the device's own packages (its CUDA
build of torch above all), and runs again inside it with this tree's ``predictor`` first on the path.

Stages, in order of value (``--list``); each has a budget, and one that no longer fits in what is left of
``--budget_s`` is skipped, saying so (``--stages`` runs the rest in a later call):

- environment: Python, torch, CUDA, the GPU, the packages it runs with against the lock, ``pip check``;
- equivalence: the engine's images against diffusers' own ``pipe(...)`` on the device, for the tiny builtin of
  every family at its CUDA dtype (float16 for SD 1.x, 2.x and SDXL, whose float16 VAE decodes upcast; bfloat16 for
  FLUX.1 and SD3; SD 1.x in bfloat16 too): every scheduler alone, jobs submitted in waves while others run (so
  the preparation stream works beside running steps) against each alone, and host synchronisations per step;
- sd-v1, startup, sdxl, flux, sd35 (eager): the server's lone latency against bare ``pipe(...)`` in alternating
  rounds, concurrent clients' throughput against bare ``pipe(...)`` at the same batch, p50/p95, start to ready,
  first request; startup: import times and eager start to ready from local disk;
- previews: what streamed previews cost a batch (the linear map, a tiny VAE);
- compile-sd-v1, loras-compiled, loras, compile-sdxl, compile-flux, compile-sd35: the same under ``--compile``
  (cold, then a restart on the compile cache made in this run), LoRA adapters eager and in ``--compile``'s
  slots (throughput, swap time, slot memory, graphs compiled under load).

Each figure is printed beside its target and its published or earlier anchor (BENCHMARKS.md). After every
figure ``gpu_suite.json`` (one entry per stage: name, status ran/skipped/failed/pending, seconds, figures) and
``gpu_suite.md`` (the tables BENCHMARKS.md takes) are rewritten in --out (default: $OUT, else bench/out/), with
this run's printout (``gpu_suite.log``) and the end of every server's log (``gpu_suite_servers.log``), so a run
cut short still returns what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STARTED_ENV = "GPU_SUITE_STARTED"  # the first process's start (epoch seconds): the budget counts from there
VENV_ENV = "GPU_SUITE_VENV"  # set once running inside the wheelhouse's virtual environment
INSTALL_ENV = "GPU_SUITE_INSTALL_S"
DEFAULT_VENV = "/tmp/gpu-suite-venv"


# ---------------------------------------------------------------------------------------------------------------
# The wheelhouse: the standard library only, since this runs before anything the device lacks is imported.


def install_wheelhouse(wheels: Path, venv: Path) -> Path:
    """A virtual environment at ``venv`` that sees this interpreter's packages, with every wheel of ``wheels``
    installed into it offline; returns its python. ``--system-site-packages`` shows it a system Python's packages;
    the device's python3 is itself a virtual environment (/opt/torch/.venv), whose packages only a .pth file naming
    its site-packages shows. Its own site-packages come first on the path, so a carried version wins."""
    import site

    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    query = [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    own = Path(subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip())
    seen = [path for path in site.getsitepackages() if Path(path).is_dir() and Path(path) != own]
    (own / "_gpu_suite_parent_site.pth").write_text("".join(f"{path}\n" for path in seen))
    found = sorted(str(wheel) for wheel in wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"no wheels in {wheels}: run python bench/device_wheels.py first")
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index"]
    command += ["--no-deps", "--no-compile", "--ignore-installed", *found]
    subprocess.run(command, check=True)
    return python


def bootstrap(argv: list[str]) -> None:
    """On the device: install the wheelhouse (--wheels; by default .whl/ on a GPU run, when there), then run this
    same command again inside its environment. Returns only where there is nothing to install."""
    os.environ.setdefault(STARTED_ENV, str(time.time()))
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--wheels")
    early.add_argument("--venv", default=DEFAULT_VENV)
    early.add_argument("--device", default="cuda")
    early.add_argument("--list", action="store_true")
    early.add_argument("-h", "--help", action="store_true")
    options, _ = early.parse_known_args(argv)
    wheels = options.wheels
    if wheels is None and options.device == "cuda" and (ROOT / ".whl").is_dir():
        wheels = str(ROOT / ".whl")
    if os.environ.get(VENV_ENV) or wheels is None or options.list or options.help:
        return
    began = time.perf_counter()
    python = install_wheelhouse(Path(wheels), Path(options.venv))
    took = time.perf_counter() - began
    print(f"installed {wheels} into {options.venv} in {took:.1f} s", flush=True)
    env = {**os.environ, VENV_ENV: options.venv, INSTALL_ENV: f"{took:.1f}"}
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *argv], env)


if __name__ == "__main__":
    bootstrap(sys.argv[1:])  # before the imports below: the device has neither pydantic nor kserve of its own

# This tree's predictor, before any installed copy (the wheelhouse's own wheel only gives the server its version).
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import httpx  # noqa: E402
from common import (  # noqa: E402
    RECOMPILE_LOGS,
    Server,
    live_and_ready,
    measure_load,
    median,
    picture,
    running_server,
    start_server,
    stop_server,
    timed_post,
)

from predictor.testing import free_port  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


# ---------------------------------------------------------------------------------------------------------------
# Workloads, targets and anchors (BENCHMARKS.md)


@dataclass(frozen=True)
class Workload:
    """One architecture's measured load: the full-size builtin on a GPU, a tiny one in the quick mode."""

    model_id: str
    dtype: str  # the family's CUDA dtype on a GPU; float32 on a CPU
    size: int
    steps: int
    long_steps: int | None  # a second lone-latency figure
    batch: int  # the server's --max_batch_size and the bare pipeline's batch
    clients: int
    requests: int
    rounds: int  # alternating bare/server rounds per lone figure
    from_disk: bool = False  # saved with save_pretrained and loaded by the server from --model_dir
    flags: tuple[str, ...] = ()  # the deployment's own flags (Z-Image-Turbo's guidance 0)
    # Request fields every request and the bare pipeline's call take (Qwen-Image's model card: negative_prompt " ",
    # so true CFG at the pipeline's 4)
    fields: tuple[tuple[str, Any], ...] = ()


TURBO = ("--default_guidance_scale", "0")  # Z-Image-Turbo's deployment: no guidance row
TRUE_CFG = (("negative_prompt", " "),)  # Qwen-Image as its model card runs it: two rows a step


@dataclass(frozen=True)
class Picture:
    """A request field's value: a size x size noise picture (base64 PNG), made when the request is."""

    size: int


# Qwen-Image-Edit as its model card runs it: one input image, true CFG.
EDIT_ONE = (("image", Picture(1024)), *TRUE_CFG)
EDIT_ONE_TINY = (("image", Picture(64)), *TRUE_CFG)

FULL = {
    "sd-v1": Workload("builtin:sd-v1-arch", "float16", 512, 25, 50, 8, 16, 48, 5, from_disk=True),
    "sdxl": Workload("builtin:sdxl-arch", "float16", 1024, 30, None, 4, 8, 16, 3),
    "flux": Workload("builtin:flux-arch", "bfloat16", 1024, 28, None, 4, 4, 8, 2),
    "sd35": Workload("builtin:sd35-arch", "bfloat16", 1024, 28, None, 4, 4, 8, 2),
    "zimage-turbo": Workload("builtin:zimage-arch", "bfloat16", 1024, 9, None, 4, 16, 32, 2, flags=TURBO),
    "flux2-klein": Workload("builtin:flux2-klein-4b-arch", "bfloat16", 1024, 4, None, 4, 16, 32, 2),
    # 112.6 GB of bfloat16 weights: all on the GPU of a 141 GB H200 (an 80 GB card needs the overlay's float8
    # transformer and offloaded encoder, which the bare pipeline would need too).
    "flux2-dev": Workload("builtin:flux2-dev-arch", "bfloat16", 1024, 50, None, 2, 4, 8, 1),
    # 57.7 GB of bfloat16 weights; the bare pipeline beside the server needs a 141 GB H200 (else measured apart).
    "qwen-image": Workload("builtin:qwenimage-arch", "bfloat16", 1024, 50, None, 2, 4, 8, 1, fields=TRUE_CFG),
    "qwen-image-edit": Workload(
        "builtin:qwenimage-edit-plus-arch", "bfloat16", 1024, 50, None, 2, 4, 8, 1, fields=EDIT_ONE
    ),
}
QUICK = {
    "sd-v1": Workload("builtin:tiny", "float32", 64, 3, 4, 2, 2, 4, 1, from_disk=True),
    "sdxl": Workload("builtin:tiny-sdxl", "float32", 64, 3, None, 2, 2, 4, 1),
    "flux": Workload("builtin:tiny-flux-dev", "float32", 64, 3, None, 2, 2, 4, 1),
    "sd35": Workload("builtin:tiny-sd3", "float32", 64, 3, None, 2, 2, 4, 1),
    "zimage-turbo": Workload("builtin:tiny-zimage", "float32", 64, 3, None, 2, 2, 4, 1, flags=TURBO),
    "flux2-klein": Workload("builtin:tiny-flux2-klein", "float32", 64, 3, None, 2, 2, 4, 1),
    "flux2-dev": Workload("builtin:tiny-flux2-dev", "float32", 64, 3, None, 2, 2, 4, 1),
    "qwen-image": Workload("builtin:tiny-qwenimage", "float32", 64, 3, None, 2, 2, 4, 1, fields=TRUE_CFG),
    "qwen-image-edit": Workload(
        "builtin:tiny-qwenimage-edit-plus", "float32", 64, 3, None, 2, 2, 4, 1, fields=EDIT_ONE_TINY
    ),
}
# The tiny builtin of every family, at its CUDA dtype ("auto"), and SD 1.x in bfloat16 as well.
EQUIVALENCE = [
    ("builtin:tiny", "auto"),
    ("builtin:tiny", "bfloat16"),
    ("builtin:tiny-sd2", "auto"),
    ("builtin:tiny-sdxl", "auto"),
    ("builtin:tiny-flux-dev", "auto"),
    ("builtin:tiny-sd3", "auto"),
    ("builtin:tiny-zimage", "auto"),
    ("builtin:tiny-flux2-klein", "auto"),
    ("builtin:tiny-flux2-dev", "auto"),
    ("builtin:tiny-qwenimage", "auto"),
]

H200 = "H200 2026-11-26"
# (target, anchor) by workload and figure; a target is "<op> <number>", checked on a GPU only.
OWED: dict[str, dict[str, tuple[str | None, str | None]]] = {
    "sd-v1": {
        "lone / bare": ("<= 1.05", f"{H200}: 1.00x (0.648 s vs 0.647 s)"),
        "lone / bare, long": ("<= 1.05", f"{H200}: 1.01x at 50 steps (1.343 s vs 1.329 s)"),
        "lone": (None, f"{H200}: 0.648 s"),
        "images/s": (None, f"{H200}: 5.37 (16 clients)"),
        "images/s / bare batch": (">= 0.9", f"{H200}: 1.08x (bare 4.99 at batch 8)"),
        "p50 under load": (None, f"{H200}: 2.94 s"),
        "first / warm": ("<= 1.2", f"{H200}: 0.91x"),
        "ready": ("<= 10", f"{H200}: 11.2 s, 13.0-13.6 s in later starts (issue #14's target: 10 s)"),
        "compiled lone, long": ("<= 0.5", f"{H200}: 0.380 s at 50 steps (eager 1.343 s)"),
        "compiled images/s": (">= 8", f"{H200}: 8.49 warm cache, 8.20 cold"),
        "compiled ready, warm cache": ("<= 30", f"{H200}: 25.9 s (32.1 s in the run before)"),
        "compiled ready, cold": (None, f"{H200}: 107.8 s (94.6 s compiling)"),
        "compiled first / warm": ("<= 1.2", f"{H200}: 1.03x warm cache"),
    },
    "sdxl": {
        "lone / bare": ("<= 1.05", None),
        "images/s / bare batch": (">= 1", None),
        "images/s": (None, "MLPerf Inference v4.1 SDXL: about 2.2 images/s per H200 (TensorRT, 20 steps)"),
        "compiled lone": (None, "PyTorch blog, compiled SDXL: 2.54 s for 30 steps at 1024x1024 on an A100"),
        "compiled ready, warm cache": (None, None),
    },
    "flux": {
        "lone / bare": ("<= 1.05", None),
        "lone": (None, "xDiT on 1xH100: 6.71 s eager, 28 steps"),
        "compiled lone": ("<= 3.6", "xDiT on 1xH100: 4.30 s compiled; SGLang: 128.9 ms a step (3.61 s for 28)"),
        "compiled ms per step": (None, "SGLang on 1xH100: 128.9 ms"),
    },
    "sd35": {"lone / bare": ("<= 1.05", None)},
    "zimage-turbo": {
        "lone / bare": ("<= 1.05", None),
        "lone": (None, "SGLang on 1xH100: 0.91 s, 9 steps (the compiled target: 0.80 s)"),
        "images/s / bare batch": (">= 1", None),
        "compiled lone": ("<= 0.8", "SGLang on 1xH100: 0.91 s, 9 steps"),
        "compiled images/s": (None, None),
        "compiled ready, warm cache": (None, None),
    },
    "flux2-klein": {
        "lone / bare": ("<= 1.05", None),
        "lone": ("<= 0.35", "SGLang on 1xH100: 0.40 s, 4 steps"),
        "images/s / bare batch": (">= 1", None),
    },
    "flux2-dev": {
        "lone / bare": ("<= 1.05", None),
        "lone": ("<= 21", "SGLang on 1xH100: 23.1 s, 50 steps"),
        "images/s / bare batch": (">= 1", None),
    },
    "qwen-image-edit": {
        "lone / bare": ("<= 1.05", None),
        "lone": ("<= 29", "SGLang on 1xH100: 32.8 s, 50 steps"),
        "images/s / lone rate": (">= 1.3", None),
        "images/s / bare batch": (">= 1", None),
    },
    "qwen-image": {
        "lone / bare": ("<= 1.05", None),
        "lone": ("<= 11.5", "SGLang on 1xH100: 12.8 s, 50 steps"),
        "images/s / lone rate": (">= 1.3", None),
        "images/s / bare batch": (">= 1", None),
    },
}


def owed(workload: str, name: str) -> dict[str, str | None]:
    target, anchor = OWED.get(workload, {}).get(name, (None, None))
    return {"target": target, "anchor": anchor}


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Figure:
    name: str
    value: float | int | str | None
    unit: str = ""
    target: str | None = None
    anchor: str | None = None
    met: bool | None = None  # judged against the target on a GPU only


@dataclass
class StageRecord:
    name: str
    description: str
    budget_s: float
    status: str = "pending"  # ran, skipped, failed, pending (not reached: the run was cut short)
    seconds: float | None = None
    reason: str | None = None  # why skipped or failed
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def meets(target: str, value: float) -> bool:
    op, bound = target.split()
    number = float(bound)
    return {"<=": value <= number, ">=": value >= number, "==": value == number, "<": value < number}[op]


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    text = str(value)
    if isinstance(value, float):
        text = f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{text} {unit}".strip() if unit and unit != "x" else f"{text}{unit}"


class StageOverrun(BaseException):
    """Raised by the alarm in the main thread when a stage runs past its budget (a BaseException, so no handler
    inside a stage takes it for an ordinary failure)."""


# ---------------------------------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True)
class Stage:
    name: str
    gpu_budget_s: float
    quick_budget_s: float
    description: str
    quick_skip: str | None = None  # why the quick mode leaves it out, where it does
    workload: str | None = None  # the key of the model it measures, in FULL or QUICK


STAGES = [
    Stage("environment", 30, 20, "Python, torch, CUDA, the GPU, versions against the lock, pip check"),
    Stage("equivalence", 120, 60, "the engine against diffusers' pipe(...) on the device, every family's tiny model"),
    Stage("sd-v1", 110, 30, "SD v1, eager: server vs bare pipe(...), lone and under load", workload="sd-v1"),
    Stage("startup", 60, 30, "import times, eager start to ready from local disk (SD v1)", workload="sd-v1"),
    Stage(
        "sdxl",
        150,
        20,
        "SDXL, eager: server vs bare pipe(...), lone and under load",
        workload="sdxl",
        quick_skip="sd-v1 runs this code (stage_serve) on the CPU; this stage is the same on SDXL",
    ),
    Stage("previews", 90, 15, "what 3 streamed previews cost a batch (SDXL)", workload="sdxl"),
    Stage("flux", 220, 20, "FLUX.1-dev, eager: server vs bare pipe(...), lone and under load", workload="flux"),
    Stage(
        "sd35",
        200,
        20,
        "SD 3.5 large, eager: server vs bare pipe(...), lone and under load",
        workload="sd35",
        quick_skip="flux runs this code (stage_serve) on the CPU; this stage is the same on SD 3.5",
    ),
    Stage(
        "zimage-turbo",
        150,
        20,
        "Z-Image-Turbo, eager: server vs bare pipe(...), lone and 16 clients",
        workload="zimage-turbo",
        quick_skip="flux runs this code (stage_serve) on the CPU; this stage is the same on Z-Image-Turbo",
    ),
    Stage(
        "flux2-klein",
        150,
        20,
        "FLUX.2-klein-4B, eager: server vs bare pipe(...), lone and 16 clients",
        workload="flux2-klein",
        quick_skip="flux runs this code (stage_serve) on the CPU; this stage is the same on FLUX.2-klein",
    ),
    Stage(
        "flux2-dev",
        420,
        20,
        "FLUX.2-dev (32B) in bfloat16 on a 141 GB GPU, eager: server vs bare pipe(...), lone and 4 clients",
        workload="flux2-dev",
        quick_skip="flux runs this code (stage_serve) on the CPU; this stage is the same on FLUX.2-dev",
    ),
    Stage("compile-sd-v1", 240, 30, "SD v1 under --compile: cold, then restarted on the cache", workload="sd-v1"),
    Stage(
        "qwen-image",
        300,
        20,
        'Qwen-Image, eager, true CFG (negative prompt " "): server vs bare pipe(...), lone at 50 steps and 4 clients',
        workload="qwen-image",
        quick_skip="flux runs this code (stage_serve) on the CPU; this stage is the same on Qwen-Image",
    ),
    Stage(
        "qwen-image-edit",
        360,
        20,
        "Qwen-Image-Edit-2511, eager, a 1024x1024 input, true CFG: server vs bare pipe(...), lone and 4 clients",
        workload="qwen-image-edit",
        quick_skip="flux runs this code (stage_serve) on the CPU; this stage is the same on Qwen-Image-Edit",
    ),
    Stage(
        "compile-zimage-turbo",
        300,
        30,
        "Z-Image-Turbo under --compile (its blocks by region, any prompt length): cold, then restarted on the cache",
        workload="zimage-turbo",
    ),
    Stage("loras-compiled", 360, 30, "LoRA slots under --compile (SDXL): load, swaps, slot memory", workload="sdxl"),
    Stage("loras", 360, 20, "LoRA adapters eager (SDXL): none, mixed, grouped, serial, swaps", workload="sdxl"),
    Stage(
        "compile-sdxl",
        330,
        30,
        "SDXL under --compile: cold, then restarted on the cache",
        quick_skip="it compiles one model (compile-sd-v1); this stage is the same code on SDXL",
        workload="sdxl",
    ),
    Stage(
        "compile-flux",
        420,
        30,
        "FLUX.1-dev under --compile: cold, then restarted on the cache",
        quick_skip="it compiles one model (compile-sd-v1); this stage is the same code on FLUX.1",
        workload="flux",
    ),
    Stage(
        "compile-sd35",
        400,
        30,
        "SD 3.5 large under --compile: cold, then restarted on the cache",
        quick_skip="it compiles one model (compile-sd-v1); this stage is the same code on SD 3.5",
        workload="sd35",
    ),
]
STAGE_NAMES = [stage.name for stage in STAGES]


class Suite:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.quick = options.quick
        self.device = options.device
        self.cuda = options.device == "cuda"
        self.judged = self.cuda and not self.quick  # targets are GPU targets
        self.workloads = QUICK if self.quick else FULL
        self.out = Path(options.out)
        self.scratch = Path(options.scratch)
        self.started = float(os.environ.get(STARTED_ENV, time.time()))
        self.budget_s = options.budget_s
        self.selected = [name for name in options.stages if name not in options.skip]
        self.records = {
            stage.name: StageRecord(
                stage.name, self.describe(stage), stage.quick_budget_s if self.quick else stage.gpu_budget_s
            )
            for stage in STAGES
        }
        self.current: StageRecord | None = None
        self.environment: dict[str, Any] = {}
        self.eager: dict[str, dict[str, float]] = {}  # each workload's eager figures, for the compiled stages
        self.log_lines: list[str] = []

    def describe(self, stage: Stage) -> str:
        if stage.workload is None:
            return stage.description
        w = self.workloads[stage.workload]
        load = f"batch {w.batch}, {w.clients} clients, {w.requests} requests"
        steps = f"{w.steps}" + (f"/{w.long_steps}" if w.long_steps else "")
        return f"{stage.description}; {w.model_id}, {w.size}x{w.size}, {steps} steps, {w.dtype}, {load}"

    # -- time

    def left_s(self) -> float:
        return self.budget_s - (time.time() - self.started)

    # -- output

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log_lines.append(text)

    def figure(
        self,
        name: str,
        value: float | int | str | None,
        unit: str = "",
        target: str | None = None,
        anchor: str | None = None,
    ) -> None:
        """Records a figure of the running stage, prints it beside its target and anchor, and rewrites the output."""
        met = meets(target, value) if self.judged and target and isinstance(value, int | float) else None
        record = self.current
        assert record is not None
        record.figures.append(Figure(name, value, unit, target, anchor, met))
        verdict = "" if met is None else (" (met)" if met else " (NOT met)")
        beside = f"   target {target}{verdict}" if target else ""
        beside += f"   anchor: {anchor}" if anchor else ""
        self.say(f"   {name}: {_cell(value, unit)}{beside}")
        self.write()

    def note(self, text: str) -> None:
        assert self.current is not None
        self.current.notes.append(text)
        self.say(f"   note: {text}")
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        document = {
            "suite": {
                "argv": sys.argv[1:],
                "mode": "quick" if self.quick else "full",
                "device": self.device,
                "budget_s": self.budget_s,
                "elapsed_s": round(time.time() - self.started, 1),
                "judged": self.judged,
            },
            "environment": self.environment,
            "stages": [asdict(self.records[stage.name]) for stage in STAGES],
        }
        (self.out / "gpu_suite.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
        (self.out / "gpu_suite.md").write_text(self.markdown())
        (self.out / "gpu_suite.log").write_text("\n".join(self.log_lines) + "\n")
        # The servers' logs stay on the device, which keeps nothing: their ends come back in one file.
        tails = [f"==> {log.name} <==\n{log.read_text(errors='replace')[-4000:]}" for log in self.server_logs()]
        (self.out / "gpu_suite_servers.log").write_text("\n".join(tails) + "\n")

    def server_logs(self) -> list[Path]:
        logs = self.scratch / "logs"
        return sorted(logs.glob("*.log"), key=lambda path: path.stat().st_mtime) if logs.is_dir() else []

    def markdown(self) -> str:
        env = self.environment
        lines = [f"### GPU suite, {time.strftime('%Y-%m-%d')}: {env.get('gpu', self.device)}", ""]
        if env:
            packages = env.get("packages", {})
            versions = ", ".join(f"{name} {packages[name]}" for name in KEY_PACKAGES if name in packages)
            lines.append(
                f"Machine: {env.get('gpu', 'no GPU')}{', driver ' + env['driver'] if env.get('driver') else ''}; "
                f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}); {versions}. "
                f"Code: {env.get('code', 'unknown')}."
            )
            if env.get("lock_differences"):
                lines.append(f"Locked packages at another version there: {', '.join(env['lock_differences'])}.")
            lines.append("")
        mode = (
            "quick (tiny builtins on this device: the figures prove the plumbing, not speed)" if self.quick else "full"
        )
        lines += [
            f"`python3 bench/gpu_suite.py {' '.join(sys.argv[1:])}`: mode {mode}, budget {self.budget_s:.0f} s, "
            f"{time.time() - self.started:.0f} s used.",
            "",
        ]
        for stage in STAGES:
            record = self.records[stage.name]
            took = f" in {record.seconds:.0f} s" if record.seconds is not None else ""
            why = f": {record.reason}" if record.reason else ""
            lines.append(
                f"**{record.name}** ({record.description}): {record.status}{took} (budget {record.budget_s:.0f} s){why}"
            )
            lines.append("")
            if record.figures:
                lines += ["| figure | value | target | met | anchor |", "|---|---|---|---|---|"]
                for figure in record.figures:
                    met = "" if figure.met is None else ("yes" if figure.met else "**no**")
                    lines.append(
                        f"| {figure.name} | {_cell(figure.value, figure.unit)} | {figure.target or ''} | {met} | "
                        f"{figure.anchor or ''} |"
                    )
                lines.append("")
            for note in record.notes:
                lines.append(f"- {note}")
            if record.notes:
                lines.append("")
        left = [name for name in self.selected if self.records[name].status in ("skipped", "pending", "failed")]
        if left and not self.quick:
            lines.append(f"Not measured in this run: `python3 bench/gpu_suite.py --stages {','.join(left)}` next.")
            lines.append("")
        return "\n".join(lines)

    # -- running

    def run(self) -> int:
        self.scratch.mkdir(parents=True, exist_ok=True)
        (self.scratch / "logs").mkdir(exist_ok=True)
        for stage in STAGES:
            record = self.records[stage.name]
            if stage.name not in self.selected:
                record.status, record.reason = "skipped", "not selected (--stages/--skip)"
                continue
            if self.quick and stage.quick_skip:
                record.status, record.reason = "skipped", f"quick mode: {stage.quick_skip}"
                continue
            left = self.left_s()
            if record.budget_s > left and not self.quick:  # the quick mode proves every stage runs: none skipped
                record.status = "skipped"
                record.reason = f"needs about {record.budget_s:.0f} s, {max(left, 0):.0f} s of the budget left"
                self.say(f"-- {stage.name}: skipped ({record.reason})")
                self.write()
                continue
            self.run_stage(stage, record, left)
        self.write()
        statuses = {record.name: record.status for record in self.records.values()}
        self.say(f"done in {time.time() - self.started:.0f} s: " + ", ".join(f"{n} {s}" for n, s in statuses.items()))
        self.say(f"results: {self.out / 'gpu_suite.json'}, {self.out / 'gpu_suite.md'}")
        return 1 if "failed" in statuses.values() else 0

    def run_stage(self, stage: Stage, record: StageRecord, left: float) -> None:
        # A stage may take twice its estimate, never past the end of the budget (plus a little to write up); in the
        # quick mode, on a shared machine, the limit only catches a hang.
        allowed = max(5.0, min(2 * record.budget_s, left + 20)) if not self.quick else 300.0
        self.say(
            f"-- {stage.name}: {stage.description} (budget {record.budget_s:.0f} s, stopped after {allowed:.0f} s)"
        )
        self.current = record
        record.status = "running"
        began = time.perf_counter()

        def overrun(signum: int, frame: Any) -> None:
            raise StageOverrun

        cpu_before = cpu_time()
        previous = signal.signal(signal.SIGALRM, overrun)
        signal.setitimer(signal.ITIMER_REAL, allowed)
        try:
            RUNNERS[stage.name](self, record)
            record.status = "ran"
        except StageOverrun:
            record.status, record.reason = (
                "failed",
                f"stopped after {allowed:.0f} s (its budget: {record.budget_s:.0f} s)",
            )
        except Exception as exc:
            record.status, record.reason = "failed", f"{type(exc).__name__}: {exc}"[:2000]
            record.details["traceback"] = traceback.format_exc()[-4000:]
            self.say(traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            record.seconds = round(time.perf_counter() - began, 1)
            record.details["cpu_s"] = round(cpu_time() - cpu_before, 1)  # this process and the servers it ended
            self.current = None
            release_memory()
        self.say(
            f"   {stage.name}: {record.status} in {record.seconds:.0f} s"
            + (f" ({record.reason})" if record.reason else "")
        )
        self.write()

    # -- shared pieces

    def log(self, name: str) -> Path:
        return self.scratch / "logs" / f"{name}.log"

    def server_flags(self, workload: Workload, batch: int | None = None) -> list[str]:
        batch = workload.batch if batch is None else batch
        return [
            *("--device", self.device, "--dtype", workload.dtype, "--max_batch_size", str(batch)),
            *("--max_queue", "64"),
            *workload.flags,
        ]

    def model_flags(self, workload: Workload) -> list[str]:
        """Where the server reads the model: the saved directory (SD v1, as a deployment reads it) or the builtin."""
        if workload.from_disk:
            return ["--model_dir", str(self.saved_model(workload)), "--model_id", "not/used"]
        return ["--model_id", workload.model_id, "--model_dir", "/nonexistent"]

    def compile_flags(self) -> list[str]:
        cache = self.scratch / "compile-cache"  # one cache for the whole run: restarts and later stages reuse it
        return [
            *("--compile", "--compile_cache_dir", str(cache)),
            *("--compile_backend", self.options.compile_backend, "--compile_mode", "reduce-overhead"),
        ]

    def saved_model(self, workload: Workload, pipe: Any = None) -> Path:
        """The workload's builtin saved with save_pretrained (float16 safetensors on a GPU), made once per run (from
        ``pipe`` when given: the same seeded builtin)."""
        directory = self.scratch / f"model-{workload.model_id.removeprefix('builtin:')}"
        if not (directory / "model_index.json").is_file():
            (pipe if pipe is not None else build_bare(workload, self.device)).save_pretrained(
                directory, safe_serialization=True
            )
            release_memory()
        return directory


KEY_PACKAGES = ("diffusers", "transformers", "kserve", "peft", "huggingface-hub", "accelerate", "numpy", "pillow")


def cpu_time() -> float:
    import resource

    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def build_bare(workload: Workload, device: str) -> Any:
    """The builtin as diffusers' own pipeline, seeded as the server builds it: the baseline of every server figure."""
    import torch

    from predictor.families import BUILTIN_PREFIX, build_builtin

    pipe = build_builtin(
        workload.model_id.removeprefix(BUILTIN_PREFIX), torch.device(device), torch_dtype(workload.dtype)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def free_gpu_bytes(device: str) -> int | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.mem_get_info()[0]


# ---------------------------------------------------------------------------------------------------------------
# environment


def stage_environment(suite: Suite, record: StageRecord) -> None:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "venv": os.environ.get(VENV_ENV),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{properties.name} ({properties.total_memory / 2**30:.1f} GiB)"
        env["gpu_capability"] = f"{properties.major}.{properties.minor}"
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            found = subprocess.run(query, capture_output=True, text=True, timeout=30)
            env["driver"] = found.stdout.strip().splitlines()[0] if found.stdout.strip() else None
    import predictor

    env["predictor"] = str(Path(predictor.__file__).parent)
    if not Path(predictor.__file__).resolve().is_relative_to(ROOT):
        raise RuntimeError(f"predictor was imported from {predictor.__file__}, not from this tree ({ROOT})")
    env["code"] = code_version()
    env["packages"], env["lock_differences"] = package_versions()
    if os.environ.get(INSTALL_ENV):
        env["wheelhouse_install_s"] = float(os.environ[INSTALL_ENV])
    if not suite.quick:  # the device's packages against this project's declared requirements (its wheel)
        found = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
        env["pip_check"] = found.stdout.strip().splitlines()[:40]
    suite.environment = env
    for key in ("python", "torch", "cuda", "gpu", "driver", "code"):
        suite.say(f"   {key}: {env.get(key)}")
    suite.figure("packages of the lock at another version", len(env["lock_differences"]))
    for line in env.get("pip_check", []):
        suite.note(f"pip check: {line}")


def code_version() -> str:
    if shutil.which("git"):
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip():
            changed = ["git", "status", "--porcelain", "--untracked-files=no"]
            dirty = subprocess.run(changed, cwd=ROOT, capture_output=True, text=True).stdout.strip()
            return f"commit {found.stdout.strip()}" + (" with local changes" if dirty else "")
    manifest = ROOT / ".whl" / "MANIFEST.json"  # the device gets a copy of the tree without .git
    if manifest.is_file():
        commit = json.loads(manifest.read_text())["built_from_commit"]
        return f"a copy without .git; the wheelhouse was built at commit {commit}"
    return "unknown"


def package_versions() -> tuple[dict[str, str], list[str]]:
    """Installed versions of the locked packages (the CUDA stack aside, torch kept), and those that differ from the
    lock."""
    from importlib import metadata

    from device_wheels import DEVICE_OWN, load_lockfile

    lockfile = load_lockfile()
    installed: dict[str, str] = {}
    differences = []
    for name, version, _ in lockfile.entries(lockfile.LOCK.read_text()):
        if DEVICE_OWN.match(name) and name != "torch":
            continue
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = "absent"
        if installed[name].split("+")[0] != version:
            differences.append(f"{name} {installed[name]} (lock {version})")
    return installed, differences


# ---------------------------------------------------------------------------------------------------------------
# equivalence


def stage_equivalence(suite: Suite, record: StageRecord) -> None:
    from predictor.loading import load_pipeline

    cases = EQUIVALENCE if suite.cuda else [(model_id, "auto") for model_id, dtype in EQUIVALENCE if dtype == "auto"]
    for model_id, dtype_flag in cases:
        loaded = load_pipeline(None, model_id, None, device_flag=suite.device, dtype_flag=dtype_flag)
        # Host synchronisations are a property of the code path, not of the dtype: counted at each family's own.
        check_family(suite, model_id, loaded, every_scheduler=dtype_flag == "auto")
        del loaded
        release_memory()


def check_family(suite: Suite, model_id: str, loaded: Any, every_scheduler: bool = True) -> None:
    """One family's tiny model: every scheduler alone against diffusers, jobs in waves against each alone, and on
    a GPU the host synchronisations per step (the preparation stream and the host-side first step make none)."""
    import numpy as np

    from predictor.testing import diffusers_image, params, pixels, running_engine

    traits = loaded.traits
    loaded.pipe.set_progress_bar_config(disable=True)
    label = f"{model_id.removeprefix('builtin:')} {str(loaded.dtype).removeprefix('torch.')}"
    schedulers = list(traits.schedulers) if not suite.quick else [traits.default_scheduler]
    wave_size = 6 if not suite.quick else 2

    def job(scheduler: str, steps: int, seed: int, guidance: float = traits.default_guidance_scale) -> Any:
        return params(
            prompt=PROMPT,
            scheduler=scheduler,
            num_inference_steps=steps,
            seed=seed,
            width=64,
            height=64,
            guidance_scale=guidance,
        )

    with running_engine(loaded, max_batch_size=8, max_queue=64) as engine:
        alone: dict[Any, Any] = {}
        worst = 0
        for index, scheduler in enumerate(schedulers):
            p = job(scheduler, 12 if not suite.quick else 4, index)
            alone[p] = pixels(engine.generate(p, timeout=300).image)
            worst = max(worst, int(np.abs(alone[p] - diffusers_image(loaded.pipe, p)).max()))
        suite.figure(f"{label}: {len(schedulers)} schedulers alone vs diffusers, max", worst, "grey levels", "<= 2")

        if suite.cuda and every_scheduler:  # host synchronisations per step: the difference between 20 and 10 steps
            for scheduler in schedulers:
                counts = [
                    count_syncs(lambda n=n, s=scheduler: engine.generate(job(s, n, 7), timeout=300)) for n in (10, 20)
                ]
                target = "== 0" if scheduler in SYNC_FREE else None
                earlier = H200_SYNCS.get(scheduler) if model_id == "builtin:tiny" else None
                anchor = f"{H200}: {earlier}" if earlier else None
                suite.figure(
                    f"{label}: host syncs per step, {scheduler}", (counts[1] - counts[0]) / 10, "", target, anchor
                )

        # Waves: each submitted while the previous one runs, so new jobs are prepared beside running steps.
        wave_steps = (9, 14, 20) if not suite.quick else (3, 5)
        mixed = [job(name, steps, 100 + k) for k, (name, steps) in enumerate(product(wave_steps, schedulers))]
        mixed.append(job(traits.default_scheduler, wave_steps[0], 200, guidance=1.0))  # an unguided row among them
        for p in mixed:
            alone[p] = pixels(engine.generate(p, timeout=300).image)
        results: list[Any] = []

        def waves() -> None:
            futures = []
            for start in range(0, len(mixed), wave_size):
                futures += engine.submit(mixed[start : start + wave_size])
                time.sleep(0.01)
            results.extend(future.result(timeout=600) for future in futures)

        syncs = count_syncs(waves) if suite.cuda else waves()
        worst = max(int(np.abs(pixels(r.image) - alone[p]).max()) for r, p in zip(results, mixed, strict=True))
        suite.figure(f"{label}: {len(mixed)} jobs in waves vs each alone, max", worst, "grey levels", "<= 2")
        if syncs is not None:
            total = sum(p.num_inference_steps for p in mixed)
            suite.figure(f"{label}: host syncs under the waves, per step", syncs / total)


def product(steps: tuple[int, ...], schedulers: list[str]) -> list[tuple[str, int]]:
    return [(name, count) for count in steps for name in schedulers]


# Schedulers that step without a host synchronisation (README, "GPU fast path"; the engine's host-free list), and
# what bench/gpu_check.py counted per step for each on an H200 (SD 1.x float16).
SYNC_FREE = frozenset({"dpmpp_2m", "dpmpp_2m_karras", "euler", "lms"})
H200_SYNCS = {"dpmpp_2m": "0", "dpmpp_2m_karras": "0", "euler": "0", "lms": "0", "euler_a": "1", "pndm": "3"}
H200_SYNCS |= {"ddim": "6", "unipc": "7"}


def count_syncs(call: Callable[[], Any]) -> int:
    """Host synchronisations ``call`` makes on the GPU (torch's sync debug mode warns at each)."""
    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(warning.message) for warning in caught)


# ---------------------------------------------------------------------------------------------------------------
# server against bare pipe(...)


def request_body(workload: Workload, steps: int, seed: int | None = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "width": workload.size,
        "height": workload.size,
    }
    if seed is not None:
        body["seed"] = seed
    return {**body, **{name: field_value(value) for name, value in workload.fields}}


def field_value(value: Any) -> Any:
    return picture(value.size) if isinstance(value, Picture) else value


def decoded(png: str) -> Any:
    """A base64 PNG as the PIL image diffusers' pipeline takes."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")


class Bare:
    """diffusers' own pipeline in this process, called as ``predictor.testing.diffusers_image`` calls it (the
    server's default scheduler and guidance, the request's CPU generator), timed to the last pixel."""

    def __init__(self, pipe: Any, workload: Workload, defaults: dict[str, Any], device: str) -> None:
        self.pipe, self.workload, self.defaults, self.device = pipe, workload, defaults, device

    def seconds(self, steps: int, batch: int = 1) -> float:
        from predictor.testing import diffusers_image, params

        p = params(
            prompt=PROMPT,
            num_inference_steps=steps,
            width=self.workload.size,
            height=self.workload.size,
            seed=1,
            scheduler=self.defaults["default_scheduler"],
            guidance_scale=self.defaults["default_guidance_scale"],
            **{name: value for name, value in self.workload.fields if not isinstance(value, Picture)},
        )
        pictures = [decoded(picture(value.size)) for _, value in self.workload.fields if isinstance(value, Picture)]
        if "default_true_cfg_scale" in self.defaults:  # the server's default, passed as the pipeline takes it
            p = replace(p, true_cfg_scale=self.defaults["default_true_cfg_scale"])
        synchronize(self.device)
        started = time.perf_counter()
        extra = {"num_images_per_prompt": batch} if batch > 1 else {}
        diffusers_image(self.pipe, p, **extra, **({"image": pictures} if pictures else {}))
        synchronize(self.device)
        return time.perf_counter() - started


def lone_rounds(
    server: Server, bare: Bare | None, workload: Workload, steps: int, rounds: int
) -> tuple[float, float | None]:
    """Median server and bare lone seconds at ``steps``, in rounds that alternate the two (this host's speed drifts:
    only figures taken side by side compare); the bare side is None when it is measured apart."""
    body = request_body(workload, steps)
    served, baseline = [], []
    with httpx.Client(base_url=server.base, timeout=900) as client:
        for _ in range(rounds):
            if bare is not None:
                baseline.append(bare.seconds(steps))
            served.append(timed_post(client, body))
    return median(served), (median(baseline) if baseline else None)


def model_defaults(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.base}/v1/models/sd/schedulers", timeout=30).json()


def stage_serve(suite: Suite, record: StageRecord, key: str) -> None:
    """Eager: the server against bare pipe(...): lone latency side by side, the first request, concurrent
    clients' throughput against the bare pipeline at the same batch, start to ready."""
    workload = suite.workloads[key]
    bare_pipe = build_bare(workload, suite.device) if workload.from_disk else None
    if workload.from_disk:
        suite.saved_model(workload, bare_pipe)
    free_before = free_gpu_bytes(suite.device)
    args = [*suite.model_flags(workload), *suite.server_flags(workload)]
    figures: dict[str, float] = {}
    apart: dict[str, tuple[float, int]] = {}  # lone figures whose bare side is measured after the server
    with running_server(*args, log=suite.log(key), timeout_s=900) as server:
        defaults = model_defaults(server)
        if workload.from_disk:
            suite.figure("start to ready from local disk", server.ready_s, "s", **owed(key, "ready"))
        else:
            suite.figure("start to ready (builds the random weights)", server.ready_s, "s")
        if bare_pipe is None:
            side_by_side = fits_beside(suite, free_before)
            if side_by_side:
                bare_pipe = build_bare(workload, suite.device)
            else:
                suite.note(
                    "the bare pipeline does not fit beside the server: each is measured alone, one after the other"
                )
        bare = Bare(bare_pipe, workload, defaults, suite.device) if bare_pipe is not None else None
        with httpx.Client(base_url=server.base, timeout=900) as client:
            first = timed_post(client, request_body(workload, workload.steps))
        if bare is not None:
            bare.seconds(workload.steps)  # warm-up
        for steps, rounds, suffix in step_plan(workload):
            served, baseline = lone_rounds(server, bare, workload, steps, rounds)
            figures[f"lone{suffix}"] = served
            suite.figure(f"lone, {steps} steps", served, "s", **owed(key, f"lone{suffix}"))
            if baseline is not None:
                suite.figure(f"bare pipe(...) lone, {steps} steps (same rounds)", baseline, "s")
                suite.figure(f"lone / bare, {steps} steps", served / baseline, "x", **owed(key, f"lone / bare{suffix}"))
            else:
                apart[f"lone{suffix}"] = (served, steps)
        suite.figure("first request / warm lone", first / figures["lone"], "x", **owed(key, "first / warm"))
        found = measure_load(
            server, request_body(workload, workload.steps, seed=None), workload.clients, workload.requests
        )
        suite.figure(f"images/s, {workload.clients} clients", found["images_per_s"], **owed(key, "images/s"))
        suite.figure("p50 under load", found["p50"], "s", **owed(key, "p50 under load"))
        suite.figure("p95 under load", found["p95"], "s")
        figures["images/s"] = found["images_per_s"]
        # What concurrency buys over one image at a time (Qwen-Image's target: 1.3x with 4 clients).
        lone_rate = 1 / figures["lone"]
        suite.figure(
            "images/s / lone rate", found["images_per_s"] / lone_rate, "x", **owed(key, "images/s / lone rate")
        )
    if bare is None:  # measured apart: the server is gone now
        bare = Bare(build_bare(workload, suite.device), workload, defaults, suite.device)
        bare.seconds(workload.steps)
        for name, (served, steps) in apart.items():
            baseline = median([bare.seconds(steps) for _ in range(max(2, workload.rounds))])
            suite.figure(f"bare pipe(...) lone, {steps} steps (measured apart)", baseline, "s")
            suite.figure(
                f"lone / bare, {steps} steps (apart)",
                served / baseline,
                "x",
                **owed(key, name.replace("lone", "lone / bare")),
            )
    bare.seconds(2, workload.batch)  # warm the batch
    batched = median([bare.seconds(workload.steps, workload.batch) for _ in range(max(1, workload.rounds - 1))])
    bare_rate = workload.batch / batched
    suite.figure(f"bare pipe(...) images/s at batch {workload.batch}", bare_rate)
    suite.figure("images/s / bare batch", figures["images/s"] / bare_rate, "x", **owed(key, "images/s / bare batch"))
    suite.eager[key] = figures


def step_plan(workload: Workload) -> list[tuple[int, int, str]]:
    plan = [(workload.steps, workload.rounds, "")]
    if workload.long_steps:
        plan.append((workload.long_steps, max(1, workload.rounds - 2), ", long"))
    return plan


def fits_beside(suite: Suite, free_before: int | None) -> bool:
    """Whether a second copy of the model (the bare pipeline) fits beside the running server, with room for both
    to run: the server's share of the GPU, measured, again, plus 8 GiB for activations."""
    if free_before is None:
        return True
    free_now = free_gpu_bytes(suite.device) or 0
    server_bytes = max(0, free_before - free_now)
    return free_now > 1.15 * server_bytes + 8 * 2**30


# ---------------------------------------------------------------------------------------------------------------
# startup

IMPORT_PROBE = r"""
import json, sys, time
started = time.perf_counter()
marks = {}
def mark(name):
    marks[name] = round(time.perf_counter() - started, 3)
import torch
mark("import torch")
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
    mark("CUDA context")
    a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    (a @ a).sum().item()
    mark("first cuBLAS product")
from diffusers import StableDiffusionPipeline
mark("import diffusers' pipelines")
argv, sys.argv = sys.argv, sys.argv[:1]  # kserve.model_server parses argv on import
import kserve.model_server
sys.argv = argv
mark("import kserve.model_server")
import predictor.model, predictor.server
mark("import predictor.model, predictor.server")
print(json.dumps(marks))
"""
IMPORT_ANCHORS = {  # bench/gpu_probe.py on an H200, 2026-11-26: seconds since the interpreter started
    "import torch": 3.0,
    "CUDA context": 3.4,
    "first cuBLAS product": 3.6,
    "import diffusers' pipelines": 13.5,
    "import kserve.model_server": 13.8,
    "import predictor.model, predictor.server": 13.8,
}


def stage_startup(suite: Suite, record: StageRecord) -> None:
    found = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True, timeout=300, cwd=ROOT
    )
    for name, seconds in json.loads(found.stdout.strip().splitlines()[-1]).items():
        anchor = IMPORT_ANCHORS.get(name)
        suite.figure(f"{name}, since start", seconds, "s", anchor=f"{H200}: {anchor} s" if anchor else None)
    workload = suite.workloads["sd-v1"]
    args = [*suite.model_flags(workload), *suite.server_flags(workload)]
    live, ready, first, warm = [], [], [], []
    cold = ""
    for _ in range(3 if not suite.quick else 1):
        if suite.options.cold_start:
            cold = ", page cache dropped" if drop_page_cache() else ", page cache NOT dropped (not root)"
        port = free_port()
        log = suite.log("startup")
        started = time.perf_counter()
        process = start_server(*args, port=port, log=log)
        try:
            listening, ready_s = live_and_ready(process, port, started, log, timeout_s=600)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                body = request_body(workload, workload.steps)
                first.append(timed_post(client, body))
                warm.append(median([timed_post(client, body) for _ in range(2)]))
        finally:
            stop_server(process)
        live.append(listening)
        ready.append(ready_s)
    suite.figure(f"eager start to listening (/livez), median of {len(live)}{cold}", median(live), "s")
    name = f"eager start to ready from local disk, median of {len(ready)}{cold}"
    suite.figure(name, median(ready), "s", **owed("sd-v1", "ready"))
    suite.figure("eager start to ready, slowest", max(ready), "s")
    suite.figure("first request / warm", median(first) / median(warm), "x", **owed("sd-v1", "first / warm"))
    record.details["ready_s"] = ready


def drop_page_cache() -> bool:
    """Forget cached file pages (root only), so the next start reads weights and libraries from disk like a fresh
    node."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# previews


def stage_previews(suite: Suite, record: StageRecord) -> None:
    from previews import measure_previews

    workload = suite.workloads["sdxl"]
    jobs = 4 if not suite.quick else 2
    found = measure_previews(
        workload.model_id,
        workload.size,
        workload.steps,
        jobs,
        3,
        rounds=3 if not suite.quick else 1,
        device=suite.device,
    )
    plain = found["none"]
    suite.figure(f"{jobs} jobs, {workload.steps} steps, no previews", plain, "s")
    for name, anchor in (
        ("linear map", "CPU 2026-12-01: +2.5% (tiny, 128x128)"),
        ("tiny VAE", "CPU 2026-12-01: +10.2% (SD v1 architecture, 256x256)"),
    ):
        suite.figure(f"3 previews each from the {name}: cost", 100 * (found[name] / plain - 1), "%", anchor=anchor)
    suite.figure("previews sent", int(found["previews sent"]))


# ---------------------------------------------------------------------------------------------------------------
# --compile


def stage_compiled(suite: Suite, record: StageRecord, key: str) -> None:
    """The server under --compile: cold (compiling into this run's cache), then restarted on that cache; lone
    latency against bare pipe(...) side by side, throughput, graphs compiled under load (expected none)."""
    workload = suite.workloads[key]
    free_before = free_gpu_bytes(suite.device)
    args = [*suite.model_flags(workload), *suite.server_flags(workload), *suite.compile_flags()]
    eager = suite.eager.get(key, {})
    bare = None
    log = suite.log(f"compile-{key}-cold")
    with running_server(*args, log=log, timeout_s=1800, env=RECOMPILE_LOGS) as server:
        suite.figure("start to ready, cold (compiling)", server.ready_s, "s", **owed(key, "compiled ready, cold"))
        recompiles_ready = server.recompiles()
        defaults = model_defaults(server)
        if fits_beside(suite, free_before):
            bare = Bare(build_bare(workload, suite.device), workload, defaults, suite.device)
            bare.seconds(workload.steps)
        else:
            suite.note("the bare pipeline does not fit beside the server: compiled figures stand alone")
        with httpx.Client(base_url=server.base, timeout=900) as client:
            timed_post(client, request_body(workload, workload.steps))
        for steps, rounds, suffix in step_plan(workload):
            served, baseline = lone_rounds(server, bare, workload, steps, rounds)
            suite.figure(f"compiled lone, {steps} steps", served, "s", **owed(key, f"compiled lone{suffix}"))
            if suffix == "" and key == "flux":
                suite.figure("compiled ms per step", 1000 * served / steps, "ms", **owed(key, "compiled ms per step"))
            if baseline is not None:
                suite.figure(f"bare pipe(...) lone, {steps} steps (same rounds)", baseline, "s")
                suite.figure(f"compiled lone / bare, {steps} steps", served / baseline, "x")
            if eager.get(f"lone{suffix}"):
                suite.figure(f"eager lone / compiled lone, {steps} steps", eager[f"lone{suffix}"] / served, "x")
        # Prompts of several lengths: Z-Image's transformer takes each at its own, and must not compile for one.
        body = request_body(workload, workload.steps, seed=None)
        bodies = [{**body, "prompt": body["prompt"][: len(body["prompt"]) * k // 4]} for k in (4, 1, 3, 2)]
        found = measure_load(server, bodies, workload.clients, workload.requests)
        suite.figure(
            f"compiled images/s, {workload.clients} clients", found["images_per_s"], **owed(key, "compiled images/s")
        )
        if eager.get("images/s"):
            suite.figure("compiled images/s / eager", found["images_per_s"] / eager["images/s"], "x")
        suite.figure(
            "graphs compiled under load", found["graphs_added_under_load"], target="== 0", anchor=f"{H200}: 0 (SD v1)"
        )
        suite.figure("recompilations after ready (torch's log)", server.recompiles() - recompiles_ready, target="== 0")
    del bare
    release_memory()
    if suite.options.compile_backend == "eager":
        suite.note("no restart on the compile cache: the eager backend (quick mode) writes none")
        return
    if not suite.quick and suite.left_s() < 90:
        suite.note(f"no restart on the compile cache: {suite.left_s():.0f} s of the budget left")
        return
    with running_server(*args, log=suite.log(f"compile-{key}-warm"), timeout_s=1800) as server:
        suite.figure(
            "start to ready, warm compile cache", server.ready_s, "s", **owed(key, "compiled ready, warm cache")
        )
        body = request_body(workload, workload.steps)
        with httpx.Client(base_url=server.base, timeout=900) as client:
            first = timed_post(client, body)
            warm = median([timed_post(client, body) for _ in range(2)])
        suite.figure("first request / warm, warm cache", first / warm, "x", **owed(key, "compiled first / warm"))


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters


def lora_setup(suite: Suite) -> tuple[Workload, Path, list[str]]:
    """Five random adapters for SDXL (rank 16; 2 on the tiny model), made once per run: four for the load, and a
    fifth so that cycling through all of them with four loaded swaps on every request."""
    from loras import make_adapters

    workload = suite.workloads["sdxl"]
    directory = suite.scratch / "loras"
    names = [f"adapter-{index}" for index in range(5)]
    if not all((directory / f"{name}.safetensors").is_file() for name in names):
        rank = 2 if suite.quick else 16
        names = make_adapters(workload.model_id, directory, 5, rank, device=suite.device)
        release_memory()
    return workload, directory, names


def lora_bodies(workload: Workload, names: list[str], steps: int) -> tuple[dict, list[dict]]:
    plain = request_body(workload, steps)
    return plain, [{**plain, "seed": index, "loras": [{"name": name}]} for index, name in enumerate(names)]


def swap_ms(server: Server, workload: Workload, names: list[str]) -> float:
    """Milliseconds an adapter swap adds to a lone request (2 steps, so the swap is a large share). Cycling through
    five adapters with four loaded, least recently used out, every request swaps once the first cycle is done; the
    baseline repeats the adapter just used, which stays loaded."""
    _, adapted = lora_bodies(workload, names, 2)
    turns = 10
    with httpx.Client(base_url=server.base, timeout=600) as client:
        for body in adapted:  # the first cycle: from here on, each request's adapter is the one evicted longest ago
            timed_post(client, body)
        swapping = median([timed_post(client, adapted[turn % len(adapted)]) for turn in range(turns)])
        last = adapted[(turns - 1) % len(adapted)]
        resident = median([timed_post(client, last) for _ in range(4)])
    return 1000 * (swapping - resident)


def stage_loras_compiled(suite: Suite, record: StageRecord) -> None:
    workload, directory, names = lora_setup(suite)
    plain, adapted = lora_bodies(workload, names[:4], workload.steps)
    args = [
        *suite.model_flags(workload),
        *suite.server_flags(workload),
        *suite.compile_flags(),
        *("--lora_dir", str(directory), "--max_loaded_loras", "4"),
    ]
    log = suite.log("loras-compiled")
    with running_server(*args, log=log, timeout_s=1800, env=RECOMPILE_LOGS) as server:
        suite.figure("start to ready (reads the adapters, makes the slots, compiles)", server.ready_s, "s")
        graphs_ready, recompiles_ready = server.compiled_graphs(), server.recompiles()
        without = measure_load(server, plain, workload.clients, workload.requests)
        suite.figure("compiled, no adapters: images/s", without["images_per_s"], anchor="CPU tiny: 30.28")
        mixed = measure_load(server, adapted, workload.clients, workload.requests)
        suite.figure("compiled, 4 adapters in slots: images/s", mixed["images_per_s"], anchor="CPU tiny: 27.47")
        suite.figure(
            "adapters / no adapters, compiled",
            mixed["images_per_s"] / without["images_per_s"],
            "x",
            anchor="CPU tiny: 0.91x",
        )
        suite.figure(
            "adapter swap into the slots (lone request)",
            swap_ms(server, workload, names),
            "ms",
            anchor="CPU tiny: 39.0 ms in-process",
        )
        added = server.compiled_graphs() - graphs_ready
        suite.figure("graphs compiled after ready (loads and swaps)", added, target="== 0", anchor="CPU tiny: 5 -> 5")
        recompiled = server.recompiles() - recompiles_ready
        suite.figure("recompilations after ready (torch's log)", recompiled, target="== 0")
    slots = re.search(r"LoRA slots for --compile: .*\(([\d.]+) MiB\)", log.read_text(errors="replace"))
    suite.figure("slot memory (4 slots)", float(slots.group(1)) if slots else None, "MiB")
    if slots is None:
        suite.note("the server's log no longer reports the slots' size")


def stage_loras(suite: Suite, record: StageRecord) -> None:
    workload, directory, names = lora_setup(suite)
    plain, adapted = lora_bodies(workload, names[:4], workload.steps)
    common = [*suite.model_flags(workload), *("--lora_dir", str(directory), "--max_loaded_loras", "4")]
    flags = suite.server_flags(workload)
    with running_server(*common, *flags, log=suite.log("loras-mixed"), timeout_s=900) as server:
        without = measure_load(server, plain, workload.clients, workload.requests)
        suite.figure("no adapters: images/s", without["images_per_s"], anchor="CPU SD v1 arch: 0.27")
        mixed = measure_load(server, adapted, workload.clients, workload.requests)
        suite.figure("4 adapters, mixed batches: images/s", mixed["images_per_s"], anchor="CPU SD v1 arch: 0.24")
        suite.figure(
            "mixed / no adapters", mixed["images_per_s"] / without["images_per_s"], "x", anchor="CPU SD v1 arch: 0.91x"
        )
        by_body: dict[int, list[float]] = {}
        half = [item for other in adapted for item in (plain, other)]
        measure_load(server, half, workload.clients, workload.requests, by_body=by_body, warm=False)
        plain_p50 = median([latency for index, found in by_body.items() if index % 2 == 0 for latency in found])
        suite.figure(
            "requests without adapters in a half-adapted load: p50 / no adapters anywhere",
            plain_p50 / without["p50"],
            "x",
            anchor="CPU tiny: 1.51x (the batch's own slowdown)",
        )
        suite.figure(
            "adapter swap, eager (lone request)",
            swap_ms(server, workload, names),
            "ms",
            anchor="CPU tiny: 31.7 ms in-process",
        )
    rates = {"mixed": mixed["images_per_s"]}
    if suite.quick:
        suite.note("quick mode: grouped and serial, the same server with another flag, are left out")
        return
    grouped_flags = [*flags, "--lora_batching", "grouped"]
    with running_server(*common, *grouped_flags, log=suite.log("loras-grouped"), timeout_s=900) as server:
        rates["grouped"] = measure_load(server, adapted, workload.clients, workload.requests)["images_per_s"]
    suite.figure("4 adapters, grouped: images/s", rates["grouped"], anchor="CPU SD v1 arch: 0.16")
    serial_flags = suite.server_flags(workload, batch=1)
    with running_server(*common, *serial_flags, log=suite.log("loras-serial"), timeout_s=900) as server:
        rates["serial"] = measure_load(server, adapted, workload.clients, workload.clients)["images_per_s"]
    suite.figure("4 adapters, serial: images/s", rates["serial"], anchor="CPU SD v1 arch: 0.15")
    suite.figure("mixed / serial", rates["mixed"] / rates["serial"], "x", anchor="CPU SD v1 arch: 1.66x")
    suite.figure("mixed / grouped", rates["mixed"] / rates["grouped"], "x", anchor="CPU SD v1 arch: 1.5x")


def stage_flux2_dev(suite: Suite, record: StageRecord) -> None:
    """FLUX.2-dev side by side with its bare pipeline, on a GPU that holds its 112.6 GB of bfloat16 weights."""
    free = free_gpu_bytes(suite.device)
    if free is not None and free < 120e9:
        record.notes.append(
            f"not measured: {free / 1e9:.0f} GB free on the GPU, 112.6 GB of bfloat16 weights plus activations "
            "needed (an H200); on an 80 GB card the overlay's --storage_dtype float8_e4m3fn --offload_text_encoders "
            "serve it"
        )
        return
    stage_serve(suite, record, "flux2-dev")


RUNNERS: dict[str, Callable[[Suite, StageRecord], None]] = {
    "environment": stage_environment,
    "equivalence": stage_equivalence,
    "sd-v1": lambda suite, record: stage_serve(suite, record, "sd-v1"),
    "startup": stage_startup,
    "sdxl": lambda suite, record: stage_serve(suite, record, "sdxl"),
    "previews": stage_previews,
    "flux": lambda suite, record: stage_serve(suite, record, "flux"),
    "sd35": lambda suite, record: stage_serve(suite, record, "sd35"),
    "zimage-turbo": lambda suite, record: stage_serve(suite, record, "zimage-turbo"),
    "flux2-klein": lambda suite, record: stage_serve(suite, record, "flux2-klein"),
    "flux2-dev": lambda suite, record: stage_flux2_dev(suite, record),
    "compile-sd-v1": lambda suite, record: stage_compiled(suite, record, "sd-v1"),
    "qwen-image": lambda suite, record: stage_serve(suite, record, "qwen-image"),
    "qwen-image-edit": lambda suite, record: stage_serve(suite, record, "qwen-image-edit"),
    "compile-zimage-turbo": lambda suite, record: stage_compiled(suite, record, "zimage-turbo"),
    "loras-compiled": stage_loras_compiled,
    "loras": stage_loras,
    "compile-sdxl": lambda suite, record: stage_compiled(suite, record, "sdxl"),
    "compile-flux": lambda suite, record: stage_compiled(suite, record, "flux"),
    "compile-sd35": lambda suite, record: stage_compiled(suite, record, "sd35"),
}
assert list(RUNNERS) == STAGE_NAMES


# ---------------------------------------------------------------------------------------------------------------
# The wheelhouse


def default_out() -> str:
    return os.environ.get("OUT") or str(ROOT / "bench" / "out" / "gpu-suite")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="every stage on the tiny builtins, small loads")
    parser.add_argument("--budget_s", type=float, help="seconds for every stage together (default 480; quick 400)")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated stages to run, in order")
    parser.add_argument("--skip", default="", help="comma-separated stages not to run")
    parser.add_argument("--out", default=default_out(), help="where gpu_suite.json/.md/.log go (default $OUT)")
    parser.add_argument("--scratch", help="models, adapters, compile cache, server logs (default /tmp/gpu-suite)")
    parser.add_argument("--wheels", help="a wheelhouse to install first (default: .whl/ on a GPU run, if there)")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="where the wheelhouse is installed")
    parser.add_argument("--compile_backend", help="torch.compile's backend (default inductor; quick: eager)")
    parser.add_argument("--cold_start", action="store_true", help="startup: drop the page cache first (root)")
    parser.add_argument("--list", action="store_true", help="print the stages with their budgets and exit")
    options = parser.parse_args(argv)
    options.stages = [name for name in options.stages.split(",") if name]
    options.skip = [name for name in options.skip.split(",") if name]
    unknown = set(options.stages + options.skip) - set(STAGE_NAMES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGE_NAMES)}")
    if options.budget_s is None:
        options.budget_s = 400 if options.quick else 480
    if options.compile_backend is None:
        options.compile_backend = "eager" if options.quick or options.device == "cpu" else "inductor"
    if options.scratch is None:
        options.scratch = tempfile.mkdtemp(prefix="gpu-suite-") if options.quick else "/tmp/gpu-suite"
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    if options.list:
        for stage in STAGES:
            quick = f"; quick mode: {stage.quick_skip}" if stage.quick_skip else ""
            print(f"{stage.name:<15} {stage.gpu_budget_s:>4.0f} s  {stage.description}{quick}")
        return 0
    os.environ.setdefault(STARTED_ENV, str(time.time()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # builtins only: never wait on a network the device does not have
    if options.quick:
        # One thread a process: the tiny models gain nothing from more, and on a shared machine OpenMP's threads
        # spin at every barrier while their peers wait for a core (seen: 30x slower images). Servers inherit it.
        os.environ["OMP_NUM_THREADS"] = "1"
    # Server processes import this tree's predictor too, wherever they start.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    suite = Suite(options)
    suite.write()
    try:
        return suite.run()
    finally:
        if options.quick:
            shutil.rmtree(options.scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
