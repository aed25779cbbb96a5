"""Two source trees side by side: a bench script run in each, alternately, round after round, so machine noise
hits both alike. For refactors that must not cost speed: the tree before and the tree after.

    git worktree add --detach /tmp/before <commit>
    python bench/ab.py --before /tmp/before --after . --rounds 3 -- bench/overhead.py --rounds 20

Each run uses the tree's own copy of the script and its own ``predictor`` package (PYTHONPATH), with this
interpreter. Prints each run's output table, then the medians of every number per row label across rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def run(tree: Path, script: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, *script], cwd=tree, env=env, capture_output=True, text=True, timeout=3600, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{script} failed in {tree}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def table_rows(output: str) -> dict[str, list[float]]:
    """Lines that start with a label and end in numbers: label -> numbers."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"^([A-Za-z].*?\S)\s{2,}(-?\d[\d.\s-]*)$", line.strip())
        if match:
            rows[match.group(1).strip()] = [float(n) for n in NUMBER.findall(match.group(2))]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- the script and its arguments")
    options = parser.parse_args()
    script = [part for part in options.script if part != "--"]
    results: dict[str, list[dict[str, list[float]]]] = {"before": [], "after": []}
    for round_ in range(options.rounds):
        order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
        for side in order:
            output = run(getattr(options, side).resolve(), script)
            print(f"--- round {round_ + 1}, {side}\n{output.strip()}\n", flush=True)
            results[side].append(table_rows(output))
    print(f"medians over {options.rounds} rounds (before | after | after/before)")
    for label in results["before"][0]:
        columns = zip(*(rows[label] for rows in results["before"] if label in rows), strict=False)
        before = [statistics.median(c) for c in columns]
        columns = zip(*(rows[label] for rows in results["after"] if label in rows), strict=False)
        after = [statistics.median(c) for c in columns]
        ratios = [f"{a / b:.3f}" if b else "-" for b, a in zip(before, after, strict=False)]
        shown = " | ".join(" ".join(f"{v:g}" for v in side) for side in (before, after))
        print(f"{label:<32} {shown} | {' '.join(ratios)}")


if __name__ == "__main__":
    main()
