"""Where the benchmarks write their files: benchmarks/results/ (git-ignored), never the current directory.

A benchmark's output options default to `default_output(name)`, a path in that folder; a path the user gives is
written where it says. `prepare_output` creates the folder of a path on first use.
"""
from __future__ import annotations

import os
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_output(name: str) -> str:
    """The default path of the output file `name`: benchmarks/results/<name> (a str, for argparse defaults)."""
    return str(RESULTS_DIR / name)


def prepare_output(path: str | os.PathLike[str]) -> Path:
    """`path` (absolute) with its folder created: benchmarks/results/ for the defaults, or the user's folder."""
    resolved = Path(path).expanduser().resolve()
    resolved.parent.mkdir(parents=True, exist_ok=True)
    return resolved
