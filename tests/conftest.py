import os
import sys
from pathlib import Path

# The repository root holds the folders installed as dit_accel.kernels and dit_accel.pipelines. When it is on
# sys.path (``python -m pytest`` puts the working directory first), diffusers finds the root's ``kernels``
# folder, takes it for the Hugging Face ``kernels`` package and fails to import. The tests import the
# installed package, so the root is taken off the path before anything imports diffusers.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter; this must be set before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
