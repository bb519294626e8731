"""The configuration of a sparse-attention run: which method, block sizes, dense steps and layers, backend."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SparseAttentionConfig"]

_BACKENDS = ("auto", "triton", "torch")
_DENSE_BACKENDS = ("stock", "auto", "cudnn", "xformers", "triton", "torch")


@functools.lru_cache(maxsize=1024)
def auto_block(seq_len: int) -> int:
    """The block size for ``seq_len`` tokens: the power of two at or above seq_len / 16, in [16, 128]."""
    target = max(-(-int(seq_len) // 16), 1)
    return min(max(1 << (target - 1).bit_length(), 16), 128)


@dataclass(frozen=True)
class SparseAttentionConfig:
    """How the replaced self-attention layers compute attention.

    Attributes:
        method: a method name ("dense", "window", "radial", "adaspa", "rettention"; see
            ``dit_accel.methods.method_names()``) or an instance of :class:`dit_accel.methods.SparseMethod`.
        block_q: query block size in tokens of a block plan (a power of two >= 16 for the Triton kernels).
            None (the default): chosen per call from the sequence length S so that a row has at least about
            16 blocks: the power of two at or above S / 16, between 16 and 128 (128 above 1,024 tokens, 16
            up to 256). A method may cap that per call (``SparseMethod.blocks_for``): the per-frame window
            keeps blocks at most 1/8 of a latent frame. Giving one of block_q / block_k sets both.
        block_k: key block size in tokens (None: as block_q).
        dense_steps: dense warm-up: an int counts steps, a float in [0, 1) is a fraction of the run's steps
            (rounded down). Steps are counted per CFG context, from 0. None (the default): the method's
            default for the model family (see ``SparseMethod.configure``; 0 unless the method has one).
        dense_layers: indices of replaced attention layers that always run dense; negative indices count from
            the last layer. Layers are numbered per transformer in module order (Flux: dual blocks, then
            single blocks). None (the default): the method's default, as for ``dense_steps`` (none unless
            the method has one).
        backend: "auto" | "triton" | "torch" for dit_accel's block-sparse and block-mass kernels.
        dense_backend: what dense steps and dense layers run. "stock" (the default): the stock diffusers
            attention op, whatever attention backend diffusers is set to, so their output is bit-exact with
            the stock processors; dense passes that must also return the LSE (searches, refreshes) then use
            ``backend``. "auto" | "cudnn" | "xformers" | "triton" | "torch": ``dit_accel.kernels.
            dense_attention`` with that backend for both ("auto" picks from measured results per device
            and shape; a named one raises where it cannot run). "stock" is the default because a dense
            step is then exactly the un-accelerated model (quality baselines and the dense method compare
            against it), it honours ``set_attention_backend``, and diffusers' default on an H200 already
            runs cuDNN, which the measurements put first at every head_dim but 64 (there our dense loop
            was 3% faster). The exception is a model whose stock attention passes a key mask: SDPA with a
            mask leaves cuDNN's fast kernel, and "auto" runs cuDNN on the valid keys instead (HunyuanVideo
            720p: dense steps 1.37x faster; its presets set "auto").
        cuda_graphs: replay whole transformer forwards as CUDA graphs where the method's decisions repeat
            (dense and sparse steps; searches and refreshes run eagerly): removes the host cost of every
            kernel launch, which decides the speed of small geometries (the embedded model, small images).
            Costs one capture per kind of forward per run and the memory of the captured forwards. See
            ``dit_accel.graphs`` for when a forward runs eagerly instead.
        fuse_blocks: run each transformer block's elementwise work around attention and feed-forward (its
            residuals, float32 LayerNorms and modulation) as one Triton pass per step instead of eager
            torch's several passes over the hidden states (``dit_accel.kernels.block_step``). Families that
            declare a fused block forward only (Wan); elsewhere, on the CPU, under ``torch.compile`` (which
            fuses them itself) and in blocks whose forward something else wraps from inside (a step cache's
            hook registered before ``apply``), the stock forward runs. Eager only changes speed and the last
            bit of the LayerNorms' half-precision output.
        timing: record each attention call's wall time in the handle's stats (adds a CUDA event pair per
            call; no host synchronisation until stats are read).
        max_state_bytes: byte budget of what a method keeps per layer between steps (cached LSE, re-ttention's
            correction): an int, None (unbounded) or "auto" (the default: on a GPU, the memory free at the
            run's first placement minus 10% of the device; unbounded on the CPU). Over it, state is stored
            in a smaller dtype, then on the host (``state_offload``), then dropped (logged, in the stats).
        state_offload: keep state that does not fit the budget in pinned host memory and copy it back ahead
            of use, instead of dropping it (GPU only).
        patterns: path of a saved pattern set (written by ``save_patterns``): its plans are used instead of
            building or searching them (searched methods skip their searches; corrections still refresh);
            its model must match at ``apply``, its geometry at each call.
        save_patterns: path to write the plans of each run to when the run ends (safetensors with the
            geometry, model and knobs they belong to), for ``patterns=`` later.
        options: method-specific knobs (e.g. ``{"density": 0.1}`` for "window"); checked by the method.
    """

    method: Any = "dense"
    block_q: int | None = None
    block_k: int | None = None
    dense_steps: int | float | None = None
    dense_layers: tuple[int, ...] | None = None
    backend: str = "auto"
    dense_backend: str = "stock"
    timing: bool = False
    cuda_graphs: bool = False
    fuse_blocks: bool = False
    max_state_bytes: int | str | None = "auto"
    state_offload: bool = True
    patterns: str | None = None
    save_patterns: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.block_q is None and self.block_k is not None:
            object.__setattr__(self, "block_q", self.block_k)
        if self.block_k is None and self.block_q is not None:
            object.__setattr__(self, "block_k", self.block_q)
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None (auto), got {value!r}")
        budget = self.max_state_bytes
        if not (
            budget is None
            or budget == "auto"
            or (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0)
        ):
            raise ValueError(f"max_state_bytes must be an int >= 0, None or 'auto', got {budget!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if not isinstance(self.fuse_blocks, bool):
            raise ValueError(f"fuse_blocks must be a bool, got {self.fuse_blocks!r}")
        if not isinstance(self.state_offload, bool):
            raise ValueError(f"state_offload must be a bool, got {self.state_offload!r}")
        for name in ("patterns", "save_patterns"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path, got {type(value).__name__}")
        steps = self.dense_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, float))):
            raise ValueError(
                f"dense_steps must be an int (count) or a float in [0, 1) (fraction), got {steps!r}"
            )
        if isinstance(steps, int) and steps < 0:
            raise ValueError(f"dense_steps must be >= 0, got {steps}")
        if isinstance(steps, float) and not 0.0 <= steps < 1.0:
            raise ValueError(f"a fractional dense_steps must lie in [0, 1), got {steps}")
        layers = self.dense_layers
        if layers is not None:
            if isinstance(layers, int):
                layers = (layers,)
            layers = tuple(layers)
            if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise ValueError(f"dense_layers must be ints, got {self.dense_layers!r}")
            object.__setattr__(self, "dense_layers", layers)
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.dense_backend not in _DENSE_BACKENDS:
            raise ValueError(f"dense_backend must be one of {_DENSE_BACKENDS}, got {self.dense_backend!r}")
        _check_options(self.options)
        object.__setattr__(self, "options", dict(self.options))

    @classmethod
    def from_knobs(cls, config: SparseAttentionConfig | None = None, **knobs) -> SparseAttentionConfig:
        """``config`` (or the defaults) with ``knobs`` applied; non-field knobs become ``options``."""
        base = config if config is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(base).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in knobs.items() if k in names}
        _check_options(fields.get("options", {}))
        options = {
            **base.options,
            **fields.pop("options", {}),
            **{k: v for k, v in knobs.items() if k not in names},
        }
        return dataclasses.replace(base, **fields, options=options)

    def blocks_for(self, seq_len: int) -> tuple[int, int]:
        """(block_q, block_k) for a call over ``seq_len`` query tokens (see ``block_q``)."""
        if self.block_q is not None:
            return self.block_q, self.block_k
        block = auto_block(seq_len)
        return block, block

    def num_dense_steps(self, num_steps: int | None) -> int | None:
        """Warm-up steps for a run of ``num_steps`` steps (None: a fraction with an unknown step count)."""
        if self.dense_steps is None:
            return 0
        if isinstance(self.dense_steps, int):
            return self.dense_steps
        if self.dense_steps == 0.0:
            return 0
        if num_steps is None:
            return None
        return int(self.dense_steps * num_steps)

    def is_dense_layer(self, layer_index: int, num_layers: int) -> bool:
        return any(i == layer_index or i + num_layers == layer_index for i in self.dense_layers or ())


def _check_options(options) -> None:
    if not isinstance(options, Mapping):
        raise ValueError(
            "options must be a mapping of method option names to values (e.g. {'density': 0.1}), got "
            f"{type(options).__name__}: {options!r}"
        )
