"""Saved pattern sets: the block plans of a run, with the geometry and model they belong to, in safetensors.

A file holds, per (CFG context, layer), the plans that layer used and the step each was set at (a static
pattern: one; adaspa: the fused search's and each cached search's), plus JSON metadata: the method and its
knobs, each transformer's class and number of replaced layers, and per plan the attention geometry it was
built for (batch, heads, query and key lengths, latent grid, text length and position, block sizes).

Loaded into ``dit_accel.apply(..., patterns=path)``, the plans replace building and searching: a searched
method skips its searches, a corrected method still refreshes its statistics on schedule. A file whose
models differ from the handle's is refused at ``apply``; a call whose geometry differs from the saved one
raises at that call, naming both.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels import BlockPlan

__all__ = ["LoadedPatterns", "load_patterns", "save_patterns"]

FORMAT = 1
_META_KEY = "dit_accel_patterns"
_GEOMETRY = ("batch", "heads", "q_len", "k_len", "grid", "text_len", "text_position", "block_q", "block_k")


def _geometry_of(key) -> dict:
    """The plan key of an entry (``SparseMethod.plan_key``) as a JSON-able dict."""
    values = dict(zip(_GEOMETRY, key))
    if values.get("grid") is not None:
        values["grid"] = list(values["grid"])
    return values


def save_patterns(path, entries: list, meta: dict) -> Path:
    """Write ``entries`` [(context, layer, plan key, [(step, BlockPlan), ...])] and ``meta`` to ``path``
    (written to a temporary file first, then renamed)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    items = []
    stored: dict[int, int] = {}  # id(plan) -> index of its tensors (a static plan is shared by every layer)
    for context, layer, key, history in entries:
        for step, plan in history:
            i = stored.setdefault(id(plan), len(stored))
            if f"{i}.kv_indices" not in tensors:
                tensors[f"{i}.kv_indices"] = plan.kv_indices.detach().to("cpu").contiguous()
                tensors[f"{i}.kv_counts"] = plan.kv_counts.detach().to("cpu").contiguous()
            items.append(
                {
                    "tensors": i,
                    "context": context,
                    "layer": layer,
                    "step": step,
                    "num_kv_blocks": plan.num_kv_blocks,
                    "plan_block_q": plan.block_q,
                    "plan_block_k": plan.block_k,
                    **_geometry_of(key),
                }
            )
    if not items:
        raise ValueError("no plans to save: the run kept none (dense steps only, or nothing ran)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"format": FORMAT, **meta, "items": items})
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: header})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass
class LoadedPatterns:
    """A saved pattern set (module docstring).

    Attributes:
        path: the file.
        meta: method, knobs, models, and the items' geometry.
        plans: (context, layer) -> [(step, geometry dict, BlockPlan)] sorted by step.
    """

    path: Path
    meta: dict
    plans: dict

    def check_models(self, models: dict[str, tuple[str, int]]) -> None:
        """Refuse a file saved for other transformers ({component: (class name, replaced layers)})."""
        saved = {k: tuple(v) for k, v in self.meta.get("models", {}).items()}
        if saved != models:
            raise ValueError(
                f"patterns in {self.path} were saved for {saved}, but this pipeline has {models} "
                "(transformer class, replaced layers); save them again for this model"
            )

    def plan_for(self, context: str, layer: str, step: int, key, device) -> BlockPlan | None:
        """The saved plan of (context, layer) in force at ``step`` (None when the file has none for it).

        Raises:
            ValueError: the call's geometry differs from the one the plan was saved for.
        """
        history = self.plans.get((context, layer))
        if not history:
            return None
        usable = [h for h in history if h[0] <= step] or history[:1]
        _, geometry, plan = usable[-1]
        now = _geometry_of(key)
        fixed = {k: v for k, v in now.items() if k != "batch"}
        saved = {k: v for k, v in geometry.items() if k in fixed}
        batch_ok = plan.batch == 1 or geometry["batch"] == now["batch"]
        if saved != fixed or not batch_ok:
            raise ValueError(
                f"patterns in {self.path}: {layer} ({context}) was saved for {geometry}, but this call has "
                f"{now}; render at the saved geometry or save the patterns again"
            )
        if plan.device != torch.device(device):
            plan = plan.to(device)
            usable[-1][2] = plan
        return plan


def load_patterns(path) -> LoadedPatterns:
    """Read a pattern file written by :func:`save_patterns`.

    Raises:
        FileNotFoundError, ValueError: no such file, or not a dit_accel pattern file of a known format.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pattern file at {path}")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for a file it cannot parse
        raise ValueError(f"{path} is not a dit_accel pattern file: {exc}") from None
    with handle as f:
        header = (f.metadata() or {}).get(_META_KEY)
        if header is None:
            raise ValueError(f"{path} is not a dit_accel pattern file (no {_META_KEY!r} metadata)")
        meta = json.loads(header)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} has pattern format {meta.get('format')!r}; this version reads {FORMAT}")
        plans: dict = {}
        read: dict[int, BlockPlan] = {}
        for item in meta["items"]:
            i = item["tensors"]
            if i not in read:
                read[i] = BlockPlan(
                    item["plan_block_q"],
                    item["plan_block_k"],
                    f.get_tensor(f"{i}.kv_indices"),
                    f.get_tensor(f"{i}.kv_counts"),
                    item["num_kv_blocks"],
                )
            plan = read[i]
            geometry = {k: item.get(k) for k in _GEOMETRY}
            plans.setdefault((item["context"], item["layer"]), []).append([item["step"], geometry, plan])
    for history in plans.values():
        history.sort(key=lambda h: h[0])
    return LoadedPatterns(path, meta, plans)
