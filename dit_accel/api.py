"""Public entry points: :func:`apply`, :func:`remove`, :func:`attn_processors`; the handle and its stats."""

from __future__ import annotations

import inspect
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from ._diffusers import HookRegistry, drop_registry, hook_registry, hooks_after
from .config import SparseAttentionConfig
from .graphs import CudaGraphs
from .kernels.ops import triton_runtime_unavailable_reason
from .methods import SparseMethod, create_method
from .parallel import gather_stats, stats_group
from .processors import Family, Runtime, family_for
from .processors.base import (
    FUSED_BLOCK_HOOK_NAME,
    FusedBlockHook,
    LayerRecord,
    SparseAttnProcessorBase,
    bind,
    bound_processor,
    unbind,
)
from .tracking import TRACKER_HOOK_NAME, StepTracker, install_tracker

__all__ = ["AttentionStats", "SparseAttentionHandle", "apply", "attn_processors", "remove"]

_HANDLE_ATTR = "_dit_accel_handle"


def _is_pipeline(target) -> bool:
    return not isinstance(target, torch.nn.Module) and hasattr(target, "components")


def _transformers(target) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(target, torch.nn.Module):
        return [("transformer", target)]
    if _is_pipeline(target):
        found = [
            (name, module)
            for name, module in target.components.items()
            if name.startswith("transformer") and isinstance(module, torch.nn.Module)
        ]
        if not found:
            raise ValueError(
                f"{type(target).__name__} has no transformer component for dit_accel to accelerate"
            )
        return found
    raise TypeError(f"target must be a diffusers pipeline or transformer, got {type(target).__name__}")


def _set_processor(module: torch.nn.Module, processor) -> None:
    if "processor" in module._modules and not isinstance(processor, torch.nn.Module):
        del module._modules["processor"]
    module.processor = processor


@dataclass
class AttentionStats:
    """Per attention call of the latest run: dense or sparse, density, time.

    Attributes:
        method: the method's name.
        records: one dict per call with keys run, component, context, step, layer, kind ("dense",
            "sparse", "dense+sparse", "custom" or a method's label), density (computed blocks over all
            blocks, summed over the passes of the call; 1.0 for dense) and time_ms (None unless timed).
        memory: bytes held by the method's caches (:meth:`SparseMethod.memory`: ``plans``, ``state``,
            ``total``, and what the method adds, e.g. adaspa's ``lse`` and ``peak``).
        graphs: with ``cuda_graphs=True``, the transformer forwards of the run by how they ran
            (``replayed``, ``captured``, ``eager``, and ``eager: <reason>`` per reason; see
            :mod:`dit_accel.graphs`); {} otherwise.
    """

    method: str
    records: list[dict]
    memory: dict = field(default_factory=dict)
    graphs: dict = field(default_factory=dict)

    def per_step(self) -> list[dict]:
        """One dict per (context, step): calls, dense, sparse, kinds ({kind: calls}), mean_density,
        time_ms (None without timing)."""
        groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
        for r in self.records:
            groups[(r["context"], r["step"])].append(r)
        rows = []
        for (context, step), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            times = [r["time_ms"] for r in rs if r["time_ms"] is not None]
            densities = [r["density"] for r in rs if not math.isnan(r["density"])]
            rows.append(
                {
                    "context": context,
                    "step": step,
                    "calls": len(rs),
                    "dense": sum(r["kind"] == "dense" for r in rs),
                    "sparse": sum(r["kind"] != "dense" for r in rs),
                    "kinds": dict(Counter(r["kind"] for r in rs)),
                    "mean_density": sum(densities) / len(densities) if densities else float("nan"),
                    "time_ms": sum(times) if times else None,
                }
            )
        return rows

    def summary(self) -> str:
        """A short text summary: totals, then one line per (context, step)."""
        if not self.records:
            return f"dit_accel[{self.method}]: no attention calls recorded"
        rows = self.per_step()
        sparse = [r for r in self.records if r["kind"] != "dense"]
        density = (
            sum(r["density"] for r in sparse if not math.isnan(r["density"])) / len(sparse) if sparse else 1.0
        )
        timed = [r["time_ms"] for r in self.records if r["time_ms"] is not None]
        lines = [
            f"dit_accel[{self.method}]: {len(self.records)} attention calls over {len(rows)} (context, step) "
            f"pairs; {len(self.records) - len(sparse)} dense, {len(sparse)} sparse"
            + (f" at mean density {density:.3f}" if sparse else "")
            + (f"; attention {sum(timed):.2f} ms" if timed else "")
            + _memory_note(self.memory)
            + _graphs_note(self.graphs)
        ]
        lines.append(
            f"{'context':<12}{'step':>5}{'calls':>7}{'dense':>7}{'sparse':>7}{'density':>9}{'ms':>10}  kinds"
        )
        for r in rows:
            ms = f"{r['time_ms']:.2f}" if r["time_ms"] is not None else "-"
            kinds = r["kinds"]
            kind = next(iter(kinds)) if len(kinds) == 1 else ",".join(f"{k}:{n}" for k, n in kinds.items())
            lines.append(
                f"{r['context']:<12}{r['step']:>5}{r['calls']:>7}{r['dense']:>7}{r['sparse']:>7}"
                f"{r['mean_density']:>9.3f}{ms:>10}  {kind}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _graphs_note(graphs: dict) -> str:
    if not graphs:
        return ""
    return "; forwards: " + ", ".join(f"{graphs.get(k, 0)} {k}" for k in ("replayed", "captured", "eager"))


def _memory_note(memory: dict) -> str:
    total, peak = memory.get("total", 0), memory.get("peak")
    if not total and not peak:
        return ""
    return f"; caches {_fmt_bytes(total)}" + (f" (peak {_fmt_bytes(peak)})" if peak else "")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


_MISSING = object()


class _BlockHook:
    """A fused-block hook on one block and what the block held before it (:func:`_remove_module_hook`)."""

    def __init__(self, block: torch.nn.Module, hook):
        self.block = block
        self.had_registry = hook_registry(block) is not None
        self.forward_before = block.__dict__.get("forward", _MISSING)
        registry = HookRegistry.check_if_exists_or_initialize(block)
        left = registry.get_hook(FUSED_BLOCK_HOOK_NAME)
        if left is not None:  # the pass-through an earlier remove() left under a later hook: active again
            left.forward, left.active = hook.forward, True
            hook = left
        else:
            registry.register_hook(hook, FUSED_BLOCK_HOOK_NAME)
        self.hook = hook
        self.forward_installed = block.__dict__.get("forward")

    def remove(self) -> None:
        self.hook.active = False
        if hooks_after(self.block, FUSED_BLOCK_HOOK_NAME):
            return  # wrapped by a hook registered since (a step cache's): stays, as a pass-through
        _remove_module_hook(
            self.block,
            FUSED_BLOCK_HOOK_NAME,
            self.hook,
            self.forward_installed,
            self.forward_before,
            self.had_registry,
        )


class _Installed:
    """What one transformer held before :func:`apply`, and what dit_accel put there."""

    def __init__(self, family: Family, had_registry: bool, forward_before):
        self.family = family
        self.had_registry = had_registry
        self.forward_before = forward_before
        self.forward_installed = None
        self.hook = None
        self.modules: dict[str, torch.nn.Module] = {}
        self.originals: dict[str, object] = {}
        self.processors: dict[str, object] = {}
        self.block_hooks: list[_BlockHook] = []  # fuse_blocks

    def serves(self, path: str) -> bool:
        """Whether the layer at ``path`` still runs dit_accel's processor (directly or through a detached one,
        as diffusers' IP-adapter loaders leave)."""
        current = getattr(self.modules[path], "processor", None)
        proc = self.processors[path]
        return current is proc or (
            isinstance(current, SparseAttnProcessorBase)
            and current.runtime is None
            and bound_processor(self.modules[path]) is proc
        )


class SparseAttentionHandle:
    """What :func:`apply` / :func:`attn_processors` return: the installed state of one configuration.

    Attributes:
        config: the :class:`SparseAttentionConfig`.
        method: the method instance (its ``cache`` holds the plans).
        tracker: the :class:`dit_accel.tracking.StepTracker` shared by the transformers.
        transformers: name -> transformer module.
    """

    def __init__(self, target, config: SparseAttentionConfig, method: SparseMethod, tracker: StepTracker):
        self.target = target
        self.config = config
        self.method = method
        self.tracker = tracker
        self.runtime = Runtime(config, method, tracker)
        self.transformers: dict[str, torch.nn.Module] = {}
        self._installed: dict[str, _Installed] = {}
        self._removed = False

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "cannot pickle or copy a dit_accel handle or a model it is applied to: call "
            "dit_accel.remove(...) first, and dit_accel.apply(...) again on the loaded or copied model"
        )

    def __repr__(self) -> str:
        return (
            f"SparseAttentionHandle(method={self.method.name!r}, transformers={list(self.transformers)}, "
            f"layers={len(self.layers)})"
        )

    @property
    def layers(self) -> list[str]:
        """Names of the attention layers this handle replaces."""
        return [p.layer for inst in self._installed.values() for p in inst.processors.values()]

    def _build(self, name: str, transformer: torch.nn.Module, family: Family) -> _Installed:
        inst = _Installed(
            family, hook_registry(transformer) is not None, transformer.__dict__.get("forward", _MISSING)
        )
        candidates = [
            (path, module)
            for path, module in transformer.named_modules()
            if hasattr(module, "processor") and family.select(path)
        ]
        chosen = [(p, m) for p, m in candidates if type(m.processor).__name__ in family.processors]
        others = sorted({type(m.processor).__name__ for p, m in candidates} - set(family.processors))
        if not chosen:
            raise ValueError(
                f"{type(transformer).__name__} ({name}) has no self-attention layer with a stock processor "
                f"dit_accel can replace (expected {sorted(family.processors)}, found {others})"
            )
        if others:
            _log_skipped(f"{name}: layers with processors {others} stay as they are")
        for i, (path, module) in enumerate(chosen):
            stock = module.processor
            cls = family.processors[type(stock).__name__]
            proc = cls(self.runtime, f"{name}.{path}", i, len(chosen), stock)
            inst.modules[path] = module
            inst.originals[path] = stock
            inst.processors[path] = proc
            bind(module, proc)
        self.transformers[name] = transformer
        self._installed[name] = inst
        inst.hook = install_tracker(transformer, self.tracker, name, family.geometry)
        if self.config.cuda_graphs:
            inst.hook.graphs = CudaGraphs(self.runtime, TRACKER_HOOK_NAME, FUSED_BLOCK_HOOK_NAME)
        inst.forward_installed = transformer.__dict__.get("forward")
        if self.config.fuse_blocks:
            blocks = family.fused_blocks(transformer) if family.fused_blocks is not None else []
            if not blocks:
                _log_skipped(
                    f"{name}: fuse_blocks: no block of {type(transformer).__name__} has a fused forward"
                )
            inst.block_hooks = [_BlockHook(block, FusedBlockHook(forward)) for _, block, forward in blocks]
        setattr(transformer, _HANDLE_ATTR, self)
        return inst

    def _check_layers(self) -> None:
        for name, inst in self._installed.items():
            replaced = {
                type(getattr(inst.modules[p], "processor", None)).__name__
                for p in inst.processors
                if not inst.serves(p)
            }
            if replaced:
                n = sum(not inst.serves(p) for p in inst.processors)
                _log_skipped(
                    f"{name}: {n} of {len(inst.processors)} layers dit_accel replaced run other processors "
                    f"now ({sorted(replaced)}, e.g. an IP-adapter's set after dit_accel.apply); apply again "
                    "to accelerate them"
                )

    def _activate(self) -> None:
        for name, inst in self._installed.items():
            modules = dict(self.transformers[name].named_modules())
            for path, proc in inst.processors.items():
                _set_processor(modules[path], proc)

    def stats(self, all_ranks: bool = False, group=None) -> AttentionStats:
        """Per-call records of the latest run (see :class:`AttentionStats`); synchronises CUDA when timed.

        Under context parallelism each rank records its own calls, over the heads it holds. With
        ``all_ranks=True`` the records of every rank of ``group`` are gathered (a collective: every rank
        calls it; the default group is the transformers' context-parallel group, else the default process
        group) and merged into the whole model's: the ranks must have recorded the same calls; ``density``
        is the mean over ranks, ``time_ms`` the slowest rank's, ``rank_density`` lists each rank's, and the
        memory figures are summed over ranks (``ranks``: their number). See
        :func:`dit_accel.parallel.merge_rank_stats`. Without an initialised process group it is the local
        stats.
        """
        records = self.runtime.records
        if any(isinstance(r.time, tuple) for r in records) and torch.cuda.is_available():
            torch.cuda.synchronize()
        graphs = Counter()
        for inst in self._installed.values():
            if inst.hook is not None and inst.hook.graphs is not None:
                graphs.update(inst.hook.graphs.report())
        stats = AttentionStats(
            self.method.name, [_as_dict(r) for r in records], self.method.memory(), dict(graphs)
        )
        if not all_ranks:
            return stats
        if group is None:
            group = stats_group(self.transformers.values())
        return gather_stats(stats, group)

    def reset(self) -> None:
        """Start a new run now (step counts from 0, cached plans dropped). Pipelines that reset stateful
        hooks at the end of a call (most) do this themselves."""
        self.tracker.reset()

    def remove(self) -> None:
        """Restore what every transformer of this handle held before :func:`apply`.

        Processors that something else set after ``apply`` (an IP-adapter's) stay; so do hooks and
        ``forward`` wrappers installed after it (accelerate's offload hook): only what dit_accel added goes.
        """
        if self._removed:
            return
        for name, inst in self._installed.items():
            transformer = self.transformers[name]
            for path, original in inst.originals.items():
                module = inst.modules[path]
                if inst.serves(path):
                    _set_processor(module, original)
                elif hasattr(module, "processor"):
                    _log_skipped(
                        f"{name}.{path}: keeping {type(module.processor).__name__}, set after dit_accel.apply"
                    )
                unbind(module, inst.processors[path])
            if inst.hook is not None:
                _remove_tracker(transformer, inst)
            for block_hook in inst.block_hooks:
                block_hook.remove()
            if getattr(transformer, _HANDLE_ATTR, None) is self:
                delattr(transformer, _HANDLE_ATTR)
        if not isinstance(self.target, torch.nn.Module) and getattr(self.target, _HANDLE_ATTR, None) is self:
            delattr(self.target, _HANDLE_ATTR)
        self.method.new_run()
        self._removed = True


def _remove_tracker(transformer: torch.nn.Module, inst: _Installed) -> None:
    """Take the step-tracker hook out of the transformer's forward chain, keeping what others added since."""
    inst.hook.deactivate()
    _remove_module_hook(
        transformer,
        TRACKER_HOOK_NAME,
        inst.hook,
        inst.forward_installed,
        inst.forward_before,
        inst.had_registry,
    )


def _remove_module_hook(
    module: torch.nn.Module, name: str, hook, forward_installed, forward_before, had_registry: bool
) -> None:
    """Take dit_accel's hook ``name`` out of ``module``'s forward chain, keeping what others added since."""
    registry = hook_registry(module)
    if registry is None:
        return
    if registry.get_hook(name) is hook:
        current = module.__dict__.get("forward", _MISSING)
        registry.remove_hook(name, recurse=False)
        below = module.__dict__.get("forward", _MISSING)
        if current is not forward_installed and current is not _MISSING:
            # Someone wrapped the forward after apply. diffusers' remove_hook just put back the forward from
            # before apply: keep theirs, and point it past ours where we know how (accelerate's
            # add_hook_to_module calls the wrapped forward through _old_forward). Other wrappers call the
            # hook's forward, now a pass-through.
            module.forward = current
            if getattr(module, "_old_forward", None) is forward_installed and below is not _MISSING:
                module._old_forward = below
    if registry.hooks:
        return
    forward = module.__dict__.get("forward", _MISSING)
    if (
        forward_before is _MISSING
        and inspect.ismethod(forward)
        and forward.__self__ is module
        and forward.__func__ is type(module).forward
    ):
        del module.__dict__["forward"]
    if not had_registry:
        drop_registry(module)


def _as_dict(r: LayerRecord) -> dict:
    t = r.time
    if isinstance(t, tuple):
        t = t[0].elapsed_time(t[1])
    return {
        "run": r.run,
        "component": r.component,
        "context": r.context,
        "step": r.step,
        "layer": r.layer,
        "kind": r.kind,
        "density": r.density,
        "time_ms": t,
    }


def _log_skipped(msg: str) -> None:
    from .processors.base import _log_once

    _log_once(msg)


def _existing_handles(target) -> list[SparseAttentionHandle]:
    handles = []
    for obj in [target, *(m for _, m in _transformers(target))]:
        h = getattr(obj, _HANDLE_ATTR, None)
        if h is not None and h not in handles:
            handles.append(h)
    return handles


def _check_dense_layers(config: SparseAttentionConfig, handle: SparseAttentionHandle) -> None:
    """Every ``dense_layers`` index names a replaced layer of every transformer of the handle."""
    for name, inst in handle._installed.items():
        n = len(inst.processors)
        bad = [i for i in config.dense_layers or () if not -n <= i < n]
        if bad:
            raise ValueError(
                f"dense_layers {bad} name no layer of {name}, which has {n} replaced attention layers "
                f"(indices 0..{n - 1}, or -{n}..-1 from the end)"
            )


def _check_backend(config: SparseAttentionConfig) -> None:
    """Refuse ``backend="triton"`` before any model runs where Triton cannot run at all."""
    if config.backend == "triton":
        reason = triton_runtime_unavailable_reason()
        if reason is not None:
            raise ValueError(
                f"backend='triton' cannot run here: {reason}. Allowed here: ['auto', 'torch'] ('auto' runs "
                "Triton where it can, else the torch reference, and logs why)"
            )


def _new_handle(target, config, knobs) -> SparseAttentionHandle:
    config = SparseAttentionConfig.from_knobs(config, **knobs)
    components = _transformers(target)
    families = [(name, tr, family_for(tr)) for name, tr in components]
    _check_backend(config)
    method = create_method(config)
    config = method.configure(config, tuple(dict.fromkeys(family for _, _, family in families)))
    for h in _existing_handles(target):
        h.remove()
    tracker = StepTracker(target if _is_pipeline(target) else None)
    handle = SparseAttentionHandle(target, config, method, tracker)
    tracker.add_run_start(handle._check_layers)
    try:
        for name, tr, family in families:
            handle._build(name, tr, family)
        _check_dense_layers(config, handle)
        if hasattr(method, "set_models"):
            method.set_models(
                {
                    name: (type(tr).__name__, len(inst.processors))
                    for name, inst in handle._installed.items()
                    for tr in [handle.transformers[name]]
                }
            )
    except Exception:
        handle.remove()
        raise
    if _is_pipeline(target):
        setattr(target, _HANDLE_ATTR, handle)
    return handle


def apply(target, config: SparseAttentionConfig | None = None, **knobs) -> SparseAttentionHandle:
    """Replace the self-attention processors of a pipeline's transformer(s), or of one transformer.

    Applying again replaces the earlier installation (it is removed first); it never stacks.

    Args:
        target: a diffusers pipeline (every ``transformer*`` component is accelerated, sharing one step
            tracker, as Wan 2.2's two experts need) or a supported transformer module.
        config: a :class:`SparseAttentionConfig`; ``knobs`` override its fields (``method="window"``,
            ``dense_steps=0.25``, ...) and unknown knobs become method options (``density=0.1``).

    Returns:
        a :class:`SparseAttentionHandle` (``.stats()``, ``.reset()``, ``.remove()``).

    Raises:
        ValueError: the transformer is not supported (the message names the supported ones) or the
            knobs are invalid. NotImplementedError: a method name that is reserved but not available yet.
    """
    handle = _new_handle(target, config, knobs)
    handle._activate()
    return handle


def attn_processors(
    transformer: torch.nn.Module, config: SparseAttentionConfig | None = None, **knobs
) -> dict[str, object]:
    """Processors for ``transformer.set_attn_processor(...)``: one entry per attention layer of the model.

    Self-attention layers get dit_accel processors; the rest keep their current processor. The step
    tracker hook is installed on ``transformer`` now; :func:`remove` undoes both. A transformer without
    ``set_attn_processor`` (Mochi) takes them by assignment:
    ``module.processor = procs[f"{path}.processor"]``.

    Args:
        transformer: a supported diffusers transformer.
        config, knobs: as in :func:`apply`.

    Returns:
        dict "<module path>.processor" -> processor.
    """
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"attn_processors takes a transformer module, got {type(transformer).__name__}")
    handle = _new_handle(transformer, config, knobs)
    (inst,) = handle._installed.values()
    if hasattr(transformer, "set_attn_processor"):
        current = dict(transformer.attn_processors)
    else:
        current = {
            f"{p}.processor": m.processor for p, m in transformer.named_modules() if hasattr(m, "processor")
        }
    return {key: inst.processors.get(key[: -len(".processor")], proc) for key, proc in current.items()}


def remove(target) -> bool:
    """Undo :func:`apply` / :func:`attn_processors` on ``target``: original processors and hooks are restored.

    Returns:
        True when something was removed.
    """
    handles = _existing_handles(target)
    for h in handles:
        h.remove()
    return bool(handles)


def get_handle(target) -> SparseAttentionHandle | None:
    """The handle installed on a pipeline or transformer, if any."""
    handles = _existing_handles(target)
    return handles[0] if handles else None
