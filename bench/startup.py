"""Start-up time, side by side: this tree against another checkout of the project (e.g. the previous main),
alternated round by round so both see the same machine.

For each tree: the seconds to import ``predictor.model`` and ``predictor.server`` in a fresh interpreter (what the
server imports before it can listen; once torch and diffusers among them, now imported by the model's load), and
for ``python -m predictor --model_id builtin:tiny``: process start to the first HTTP answer (``/livez``) and to
ready (``GET /v1/models/NAME`` 200, after loading and the warm-up).

    git worktree add /tmp/baseline <commit>
    python bench/startup.py --baseline /tmp/baseline --rounds 7
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import free_port, live_and_ready, median, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
IMPORT_PROBE = (
    "import time; started = time.perf_counter(); import predictor.model, predictor.server; "
    "print(time.perf_counter() - started)"
)


def import_seconds(tree: Path) -> float:
    # Run from the tree: `python -c` puts the working directory first on sys.path, so its predictor package wins.
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], cwd=tree, capture_output=True, text=True, check=True, timeout=300
    )
    return float(result.stdout.strip().splitlines()[-1])


def start_seconds(tree: Path, model_id: str, log: Path) -> tuple[float, float]:
    """(start to the first answer on /livez, start to ready)."""
    port = free_port()
    started = time.perf_counter()
    # Run from the tree: `python -m` puts the working directory first on sys.path, so its predictor package wins.
    process = start_server("--model_id", model_id, "--model_dir", "/nonexistent", port=port, log=log, cwd=tree)
    try:
        return live_and_ready(process, port, started, log)
    finally:
        stop_server(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of this project")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model_id", default="builtin:tiny")
    options = parser.parse_args()
    trees = {"baseline": options.baseline.resolve(), "this tree": ROOT}
    figures: dict[str, dict[str, list[float]]] = {name: {"import": [], "live": [], "ready": []} for name in trees}
    log = Path("/tmp/startup-bench.log")
    for round_index in range(options.rounds):
        order = list(trees.items()) if round_index % 2 == 0 else list(reversed(trees.items()))
        for name, tree in order:
            figures[name]["import"].append(import_seconds(tree))
            live, ready = start_seconds(tree, options.model_id, log)
            figures[name]["live"].append(live)
            figures[name]["ready"].append(ready)
        print(f"round {round_index + 1}: " + ", ".join(f"{n} ready {f['ready'][-1]:.2f} s" for n, f in figures.items()))
    print(f"\n{options.model_id}, {options.rounds} alternated rounds, medians")
    print(f"{'':<12}{'modules s':>10}{'live s':>10}{'ready s':>10}")
    for name, values in figures.items():
        print(f"{name:<12}" + "".join(f"{median(values[key]):>10.2f}" for key in ("import", "live", "ready")))
    for key in ("import", "live", "ready"):
        ratio = median(figures["this tree"][key]) / median(figures["baseline"][key])
        print(f"{key}: this tree / baseline = {ratio:.2f}x")


if __name__ == "__main__":
    main()
