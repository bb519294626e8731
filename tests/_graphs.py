"""A CPU stand-in for CUDA graphs, so ``dit_accel.graphs`` is tested without a GPU.

A recorded graph keeps what a CUDA graph keeps: the tensor operations of the captured forward, on fixed
tensors, and none of its Python. Capture records every aten op (a ``TorchDispatchMode``) together with its
output tensors; replay re-runs the ops in order on those same tensors and writes each fresh result into the
recorded output, so a later op reads it as a kernel reads the graph's memory. Python scalars baked into an
op's arguments stay baked, exactly as in a real graph, and Python side effects of the forward do not happen.
After capture the fresh outputs are filled with NaN, so a caller that used the capture's values instead of
replaying fails. A host read (``.item()``) while capturing raises, as it does on a GPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dit_accel.graphs import CudaGraphs


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class RecordedGraph:
    def __init__(self):
        self.ops: list = []
        self.replays = 0

    def replay(self) -> None:
        for func, args, kwargs, fresh in self.ops:
            result = func(*args, **kwargs)
            for out, new in zip(_tensors(fresh), _tensors(result)):
                if out is not None:
                    out.copy_(new)
        self.replays += 1


class _Recording(TorchDispatchMode):
    def __init__(self, graph: RecordedGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("a host read (.item()) while capturing")
        result = func(*args, **kwargs)
        inputs = {_storage(t) for t in _tensors(list(args) + list(kwargs.values()))}
        fresh = [t if _storage(t) not in inputs else None for t in _tensors(result)]
        self.graph.ops.append((func, args, kwargs, fresh))
        return result


class RecordedGraphs(CudaGraphs):
    """:class:`CudaGraphs` on the CPU with :class:`RecordedGraph` in place of the device's graphs."""

    device_type = "cpu"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made: list[RecordedGraph] = []  # every graph captured, also those dropped at a new run

    def _new_graph(self):
        self.made.append(RecordedGraph())
        return self.made[-1]

    @contextlib.contextmanager
    def _capturing(self, graph):
        with _Recording(graph):
            yield
        for _, _, _, fresh in graph.ops:
            for t in fresh:
                if t is not None and t.is_floating_point():
                    t.fill_(float("nan"))


def use_recorded_graphs(handle) -> list[RecordedGraphs]:
    """Swap the CUDA graphs of every transformer of ``handle`` (applied with ``cuda_graphs=True``) for
    recorded ones."""
    swapped = []
    for inst in handle._installed.values():
        assert inst.hook.graphs is not None, "apply with cuda_graphs=True first"
        old = inst.hook.graphs
        inst.hook.graphs = RecordedGraphs(handle.runtime, old.hook_name, old.block_hook_name)
        swapped.append(inst.hook.graphs)
    return swapped
