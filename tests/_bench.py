"""Loading a script of benchmarks/ as a module, the way its tests run it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str, monkeypatch=None):
    """``benchmarks/<name>.py`` as a fresh module. With ``monkeypatch``, benchmarks/ goes first on sys.path
    for the test's duration, as ``python benchmarks/<name>.py`` has it (the scripts import ``_common``)."""
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
