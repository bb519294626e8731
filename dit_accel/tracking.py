"""Step tracking: a stateful diffusers ``ModelHook`` that tells the attention processors where a run is.

Per transformer forward the tracker publishes a :class:`ForwardInfo`: the CFG context name, the step index and
the number of steps when known, the latent grid in tokens, the text length and position, the CFG batch layout.

Step index rules, in order:

- The pipeline passes ``step_index`` through ``cache_context`` (Wan): used as is, together with its
  ``num_inference_steps``. A step index lower than the last one seen in that context starts a new run.
- Otherwise steps are counted per context name: a call whose timestep equals the previous call's timestep in
  the same context is the same step (a second guidance pass such as SD3's skip-layer guidance; Heun's
  repeated timesteps), any other call advances the step. A new run starts when the count reaches the known
  number of steps, when the run's first timestep comes back, or when the timestep sequence changes direction.
- A change of latent grid (resolution, frame count) starts a new run; so does diffusers resetting stateful
  hooks at the end of a pipeline call (``maybe_free_model_hooks``) and :meth:`StepTracker.reset`.

The number of steps comes from ``cache_context(num_inference_steps=...)``, else from the pipeline's scheduler
(distinct consecutive timesteps from its begin index) when the tracker knows the pipeline, else from the
previous run of the same context. Several transformers may share one tracker (Wan 2.2): one step count.

Gradient checkpointing re-runs each block's forward during backward, outside any transformer forward. A
forward run with grad enabled on a transformer with gradient checkpointing on is *recorded*
(:attr:`StepTracker.recording`): each processor keeps what its call saw, and the recomputation replays it
(see ``dit_accel.processors.base``).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import compiled
from ._diffusers import BaseState, HookRegistry, ModelHook, StateManager, state_context
from .parallel import unsharded_arguments

__all__ = [
    "ForwardInfo",
    "Geometry",
    "StepTracker",
    "StepTrackerHook",
    "TRACKER_HOOK_NAME",
    "in_backward",
    "install_tracker",
]

logger = logging.getLogger("dit_accel")

TRACKER_HOOK_NAME = "dit_accel_step_tracker"
DEFAULT_CONTEXT = "default"


@dataclass(frozen=True)
class Geometry:
    """What a transformer forward attends over.

    Attributes:
        grid: latent grid in tokens (T, H, W), frame-major; None when the tokens do not form one grid.
        text_len: text tokens joined to the self-attention sequence (0: none; padded length when padded).
        text_position: "first", "last" or None.
    """

    grid: tuple[int, int, int] | None
    text_len: int = 0
    text_position: str | None = None


@dataclass(frozen=True)
class ForwardInfo:
    """What the processors of one transformer forward need to know.

    Attributes:
        component: name of the transformer (e.g. "transformer", "transformer_2").
        context: CFG context name from ``cache_context`` ("cond", "uncond", "cond_uncond"), or "default".
        step: step index in this context, from 0.
        num_steps: number of steps of the run, or None when unknown.
        run: run counter; increases at every new run.
        batch: batch size of the call.
        cfg: CFG batch layout: "separate" (this call is one branch, named by ``context``), "batched" (first
            half of the batch is the unconditional branch, second half the conditional one), "none".
        grid, text_len, text_position: see :class:`Geometry`.
        timestep: the largest timestep value of the call (None when the model takes none, or when the
            pipeline passes the step index, as Wan's does: then the value is not read from the device).
    """

    component: str
    context: str
    step: int
    num_steps: int | None
    run: int
    batch: int
    cfg: str
    grid: tuple[int, int, int] | None
    text_len: int
    text_position: str | None
    timestep: float | None


class _ContextState:
    __slots__ = ("step", "first_t", "last_t", "direction", "num_steps")

    def __init__(self, step: int, t, num_steps):
        self.step = step
        self.first_t = t
        self.last_t = t
        self.direction = 0
        self.num_steps = num_steps


def _fingerprint(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.detach().max().item())
    return float(timestep)


def _scheduler_steps(pipe) -> int | None:
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    timesteps = torch.as_tensor(timesteps).detach().flatten().cpu()
    begin = getattr(scheduler, "begin_index", None) or 0
    timesteps = timesteps[begin:]
    if timesteps.numel() == 0:
        return None
    return int(torch.unique_consecutive(timesteps).numel())


def _halves_equal(x: torch.Tensor) -> bool:
    if x.shape[0] % 2:
        return False
    half = x.shape[0] // 2
    return bool(torch.equal(x[:half], x[half:]))


class StepTracker:
    """Run state shared by the step hooks of one or more transformers.

    Args:
        pipeline: the pipeline the transformers belong to, if known (read for its scheduler's step count and
            ``do_classifier_free_guidance``; held by weak reference).
    """

    def __init__(self, pipeline=None):
        self._pipe = weakref.ref(pipeline) if pipeline is not None else None
        self.run = 0
        self.current: ForwardInfo | None = None
        self._contexts: dict[str, _ContextState] = {}
        self._previous_counts: dict[str, int] = {}
        self._grid = None
        self._listeners: list[Callable[[int], None]] = []
        self._run_start: list[Callable[[], None]] = []
        self.recording = False
        # Bumped by every tracked forward under torch.compile; the attention ops read it, which keeps them
        # after their forward's bookkeeping in a compiled graph (dit_accel.compiled).
        self.order = torch.zeros((), dtype=torch.int64)

    @property
    def pipeline(self):
        return self._pipe() if self._pipe is not None else None

    def add_listener(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(run)`` whenever a new run starts."""
        self._listeners.append(fn)

    def add_run_start(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` at the first transformer forward of every run."""
        self._run_start.append(fn)

    def reset(self) -> None:
        """Start a new run: step counts restart from 0 and run-scoped method state is dropped."""
        for name, st in self._contexts.items():
            self._previous_counts[name] = st.step + 1
        self._contexts.clear()
        self._grid = None
        self.current = None
        self.recording = False
        self.run += 1
        for fn in self._listeners:
            fn(self.run)

    def _num_steps(self, name: str, context) -> int | None:
        n = getattr(context, "num_inference_steps", None)
        if n is not None:
            return int(n)
        pipe = self.pipeline
        if pipe is not None:
            n = _scheduler_steps(pipe)
            if n is not None:
                return n
        return self._previous_counts.get(name)

    def _cfg(self, name: str, hidden_states: torch.Tensor) -> str:
        if name in ("cond", "uncond"):
            return "separate"
        do_cfg = getattr(self.pipeline, "do_classifier_free_guidance", None)
        if isinstance(do_cfg, bool):
            return "batched" if do_cfg and hidden_states.shape[0] % 2 == 0 else "none"
        # Pipelines without the property (PixArt) or unknown callers: batched CFG duplicates the latents.
        return "batched" if _halves_equal(hidden_states) else "none"

    def begin(
        self,
        component: str,
        context,
        timestep,
        hidden_states: torch.Tensor,
        geometry: Geometry,
        recording: bool = False,
    ) -> ForwardInfo:
        """Record the start of a transformer forward and return what its processors will see.

        ``recording``: the forward's attention calls may be recomputed in backward (gradient checkpointing).
        """
        name = getattr(context, "name", context) if context is not None else DEFAULT_CONTEXT
        if self._grid is not None and geometry.grid != self._grid:
            self.reset()
        self._grid = geometry.grid
        st = self._contexts.get(name)
        explicit = getattr(context, "step_index", None)
        # Reading the timestep is a host-device sync per forward (it stalls the launch queue, which costs more
        # than the attention saves on small grids); a step index given by the pipeline makes it unnecessary.
        t = None if explicit is not None else _fingerprint(timestep)
        if explicit is not None:
            step = int(explicit)
            if st is not None and step < st.step:
                self.reset()
                st = None
        elif st is None:
            step = 0
        elif t is not None and t == st.last_t:
            step = st.step
        else:
            step = st.step + 1
            direction = 0 if t is None or st.last_t is None else (1 if t > st.last_t else -1)
            restart = (
                (st.num_steps is not None and step >= st.num_steps)
                or (t is not None and t == st.first_t)
                or (st.direction != 0 and direction != 0 and direction != st.direction)
            )
            if restart:
                self.reset()
                st, step = None, 0
            elif st.direction == 0:
                st.direction = direction
        if st is None:
            if not self._contexts:
                for fn in self._run_start:
                    fn()
            st = _ContextState(step, t, self._num_steps(name, context))
            self._contexts[name] = st
        elif getattr(context, "num_inference_steps", None) is not None:
            st.num_steps = int(context.num_inference_steps)
        st.step, st.last_t = step, t
        info = ForwardInfo(
            component=component,
            context=name,
            step=step,
            num_steps=st.num_steps,
            run=self.run,
            batch=int(hidden_states.shape[0]),
            cfg=self._cfg(name, hidden_states),
            grid=geometry.grid,
            text_len=geometry.text_len,
            text_position=geometry.text_position,
            timestep=t,
        )
        self.current = info
        self.recording = recording
        return info

    def end(self) -> None:
        self.current = None
        self.recording = False


def in_backward() -> bool:
    """Whether this thread is running an autograd backward pass (where checkpointed blocks recompute).

    torch has no public query for this; ``torch._C._current_graph_task_id`` (torch 2.x) is -1 outside a
    backward pass. Without it every untracked call is taken for a recomputation.
    """
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is None or graph_task_id() != -1


class _ContextSink(StateManager):
    """Receives the ``cache_context`` that diffusers hands to every stateful hook's StateManager."""

    def __init__(self):
        super().__init__(BaseState)

    @property
    def current(self):
        return state_context(self)


class StepTrackerHook(ModelHook):
    """The hook on one transformer: binds the forward's arguments and feeds the shared :class:`StepTracker`.

    Args:
        tracker: the shared tracker.
        component: the transformer's name in its pipeline.
        geometry_fn: ``fn(transformer, arguments) -> Geometry`` for this model family.
    """

    _is_stateful = True

    def __init__(self, tracker: StepTracker, component: str, geometry_fn: Callable[..., Geometry]):
        super().__init__()
        self.tracker = tracker
        self.component = component
        self.geometry_fn = geometry_fn
        self.context_sink = _ContextSink()
        self._signature = None
        self._names: tuple[str, ...] = ()
        self.active = True
        self.slot = compiled.register(self)
        self.graphs = None  # a dit_accel.graphs.CudaGraphs when the handle replays forwards as CUDA graphs

    def initialize_hook(self, module):
        self._signature = inspect.signature(type(module).forward)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._names = tuple(
            n for n, p in self._signature.parameters.items() if p.kind in positional and n != "self"
        )
        return module

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"cannot pickle or copy a transformer with dit_accel applied ({self.component}): call "
            "dit_accel.remove(...) on it first, and dit_accel.apply(...) again on the loaded or copied model"
        )

    def deactivate(self) -> None:
        """Make the hook a pass-through (for a forward that someone else wrapped after it was registered)."""
        self.active = False

    def pre_forward(self, module, *args, **kwargs):
        if not self.active:
            return args, kwargs
        if torch.compiler.is_compiling():
            # Geometry is shape arithmetic (static in a compiled graph); the bookkeeping runs in an opaque op.
            arguments = dict(zip(self._names, args))
            arguments.update(kwargs)
            geometry = self.geometry_fn(module, arguments)
            compiled.track(
                self,
                arguments.get("hidden_states"),
                arguments.get("timestep"),
                geometry.grid,
                geometry.text_len,
                geometry.text_position,
            )
            return args, kwargs
        return self._pre_forward(module, *args, **kwargs)

    def begin(self, hidden_states, timestep, grid, text_len: int, text_position) -> None:
        """The bookkeeping of one forward from its geometry (the compiled path's entry)."""
        self.tracker.begin(
            self.component,
            self.context_sink.current,
            timestep,
            hidden_states,
            Geometry(grid, text_len, text_position),
        )

    @torch.compiler.disable
    def _pre_forward(self, module, *args, **kwargs):
        bound = self._signature.bind(module, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}) or {})
        # Under context parallelism: the whole inputs, also when diffusers' split hook ran first.
        arguments = unsharded_arguments(module, TRACKER_HOOK_NAME, arguments)
        hidden_states = arguments.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor):
            raise ValueError(f"{type(module).__name__}.forward was called without hidden_states")
        geometry = self.geometry_fn(module, arguments)
        recording = torch.is_grad_enabled() and bool(getattr(module, "is_gradient_checkpointing", False))
        self.tracker.begin(
            self.component,
            self.context_sink.current,
            arguments.get("timestep"),
            hidden_states,
            geometry,
            recording=recording,
        )
        return args, kwargs

    def new_forward(self, module, *args, **kwargs):
        """The transformer's forward, replayed from a CUDA graph where :attr:`graphs` can (after
        :meth:`pre_forward` has published the forward's step)."""
        forward = self.fn_ref.original_forward
        if self.graphs is None or not self.active or torch.compiler.is_compiling():
            return forward(*args, **kwargs)
        return self.graphs.forward(module, forward, args, kwargs)

    def post_forward(self, module, output):
        if self.active and not torch.compiler.is_compiling():
            self.tracker.end()
        return output

    def reset_state(self, module):
        if self.active:
            self.tracker.reset()
        return module


def install_tracker(
    transformer: torch.nn.Module, tracker: StepTracker, component: str, geometry_fn: Callable[..., Geometry]
) -> StepTrackerHook:
    """Register a :class:`StepTrackerHook` on ``transformer`` (replacing an earlier one)."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(TRACKER_HOOK_NAME) is not None:
        registry.remove_hook(TRACKER_HOOK_NAME, recurse=False)
    hook = StepTrackerHook(tracker, component, geometry_fn)
    registry.register_hook(hook, TRACKER_HOOK_NAME)
    return hook
