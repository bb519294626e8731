"""dit_accel under diffusers' context parallelism (``transformer.enable_parallelism(config=...)``).

Ulysses (``ContextParallelConfig(ulysses_degree=P)``): diffusers' ``_cp_plan`` hooks shard the sequence, so
each rank's processors see their rank's tokens, q/k/v of shape [B, S/P, H, D]. A dit_accel processor
exchanges them with diffusers' own all-to-all (``SeqAllToAllDim``, the collective its Ulysses attention
uses) into [B, S, H/P, D]: every token, for the rank's H/P heads. It puts the tokens back in the model's
order (below), runs the handle's method on those heads exactly as a single-GPU call runs it (the
:class:`dit_accel.methods.AttentionCall` has H/P heads: static plans broadcast over heads, searched plans,
cached LSEs and re-ttention's corrections are per local head and stay on their rank), and exchanges the
output back to [B, S/P, H, D]. Dense steps and dense layers run the stock attention op (the
dispatcher's backend) on the exchanged tensors, as diffusers' own Ulysses attention does. What couples heads
differs from one GPU: adaspa's head-adaptive tiers rank the heads of one rank (logged once;
``head_adaptive=False`` gives the single-GPU plans).

Token order. The all-to-all returns the sequence rank-major: rank 0's tokens, then rank 1's. For Wan and LTX
(one stream, sharded contiguously) that is the model's order. Where the processor joins a text stream and
an image stream that were sharded separately (Flux: text first; Qwen-Image), each rank's tokens are
[text shard, image shard], so the exchanged sequence interleaves them; dit_accel regroups it into
[all text, all image] before the method runs (patterns are positional) and back after.

Geometry. The step tracker reads the latent grid and text length from the transformer's forward arguments.
diffusers' HookRegistry runs the hook registered last first, so with ``dit_accel.apply`` after
``enable_parallelism`` the tracker sees the whole inputs before the ``_cp_plan`` hook on the transformer
shards them. With ``apply`` first, the split hook runs first and the tracker sees shards: then the tracker
gathers back the inputs that hook sharded (:func:`unsharded_arguments`, a collective per forward, logged
once) and so still records the whole model's geometry. For Wan and Qwen-Image the plan shards inside the
model (``blocks.0``, ``transformer_blocks.0``) and the tracker sees the whole input in either order.

Not served by dit_accel (one log line each, then diffusers' stock context-parallel attention runs those
calls, unchanged): ring attention (``ring_degree > 1``, also combined with Ulysses), the "anything" modes
(``ulysses_anything``, uneven shards), calls with an attention mask or padded text under context
parallelism, and head counts not divisible by the Ulysses degree. Ring would need a sparse plan restricted
to each key shard and the merge of partial outputs by their LSE
(:func:`dit_accel.kernels.merge_partial_attention`); searched plans and corrections need the whole row's
statistics, which ring never holds in one place.

Stats: each rank records its own calls (over its heads); ``handle.stats(all_ranks=True)`` gathers them over
the context-parallel group (:func:`gather_stats`) and averages density over ranks per call, which with an
equal share of heads per rank is the density over all heads of the layer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch

from ._diffusers import (
    context_parallel_group,
    dispatch_attention_fn,
    outer_split_hooks,
    seq_all_to_all,
    ulysses_group,
    unshard_input,
)

__all__ = ["attend", "gather_stats", "merge_rank_stats", "stats_group", "unsharded_arguments"]

logger = logging.getLogger("dit_accel")


@functools.cache
def _log_once(msg: str) -> None:
    logger.warning(msg)


def _cp_config(parallel_config):
    return getattr(parallel_config, "context_parallel_config", None)


def _unsupported(cp) -> str | None:
    if cp.ring_degree > 1:
        mode = "Ulysses x ring" if cp.ulysses_degree > 1 else "ring attention"
        return f"{mode} (ring_degree={cp.ring_degree})"
    if cp.ulysses_anything:
        return "ulysses_anything (uneven shards)"
    return None


def _fallback(processor, dense_fn: Callable[[], torch.Tensor], reason: str) -> torch.Tensor:
    if torch.compiler.is_compiling():  # logging would break the graph; the eager calls log it
        return dense_fn()
    _log_once(
        f"{type(processor).__name__}: dit_accel does not run its method under {reason}; diffusers' stock "
        "context-parallel attention runs those calls. dit_accel runs its methods under Ulysses "
        "(ContextParallelConfig(ulysses_degree=N))."
    )
    return dense_fn()


def _forward_info(processor):
    info = processor.runtime.tracker.current
    if info is None and processor._captures:  # a checkpoint recomputation replays the recorded forward
        info = processor._captures[-1].info
    return info


def _to_token_order(x: torch.Tensor, segments: tuple[int, ...], degree: int) -> torch.Tensor:
    """[B, P * L, ...] rank-major (each rank's L tokens are its shards of the segments, in order) ->
    segment-major: every rank's shard of segment 0, then of segment 1, ..."""
    if len(segments) == 1:
        return x
    x = x.unflatten(1, (degree, -1))
    return torch.cat([part.flatten(1, 2) for part in x.split(segments, dim=2)], dim=1)


def _to_rank_order(x: torch.Tensor, segments: tuple[int, ...], degree: int) -> torch.Tensor:
    """The inverse of :func:`_to_token_order`."""
    if len(segments) == 1:
        return x
    parts = x.split([degree * n for n in segments], dim=1)
    return torch.cat([part.unflatten(1, (degree, -1)) for part in parts], dim=2).flatten(1, 2)


def attend(
    processor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str,
    dense_fn: Callable[[], torch.Tensor],
    kv_len: torch.Tensor | None,
    text_len: int | None,
    text_position: str | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """One attention call of ``processor`` on its rank's sequence shard under context parallelism.

    q, k, v are the rank's shard ([B, S/P, H, D] for "bshd", [B, H, S/P, D] for "bhsd"); ``text_len`` is
    the rank's share of the text tokens (None: the forward's text length, as in Flux's single blocks).
    Returns the rank's shard of the output in ``layout``.
    """
    cp = _cp_config(processor._parallel_config)
    if cp is None:  # a parallel config without context parallelism leaves attention whole on each rank
        return processor._run_method(
            q, k, v, layout=layout, dense_fn=dense_fn, kv_len=kv_len, text_len=text_len,
            text_position=text_position, attention_mask=attention_mask,
        )  # fmt: skip
    reason = _unsupported(cp)
    if reason is None and attention_mask is not None:
        reason = "context parallelism with an attention mask"
    if reason is None and kv_len is not None:
        reason = "context parallelism with padded text (a key-length mask)"
    degree = cp.ulysses_degree
    q, k, v = (x.transpose(1, 2) if layout == "bhsd" else x for x in (q, k, v))
    heads, local = q.shape[2], q.shape[1]
    if reason is None and heads % degree:
        reason = f"Ulysses with {heads} heads over {degree} ranks (not divisible)"
    if reason is not None:
        return _fallback(processor, dense_fn, reason)

    info = _forward_info(processor)
    if text_len is None:
        full_text = info.text_len if info is not None else 0
        text_position = info.text_position if info is not None else None
        if full_text % degree:
            raise RuntimeError(
                f"{processor.layer}: {full_text} text tokens do not split over {degree} context-parallel "
                "ranks"
            )
        text_len = full_text // degree
    else:
        full_text = text_len * degree
    if text_len and text_position == "first":
        segments = (text_len, local - text_len)
    elif text_len and text_position == "last":
        segments = (local - text_len, text_len)
    else:
        segments = (local,)

    group = ulysses_group(cp)
    qf, kf, vf = (_to_token_order(seq_all_to_all(x, group, True), segments, degree) for x in (q, k, v))
    if info is not None and info.grid is not None:
        tokens = math.prod(info.grid) + full_text
        if tokens != qf.shape[1]:
            raise RuntimeError(
                f"{processor.layer}: under context parallelism the attention sequence has {qf.shape[1]} "
                f"tokens but the step tracker recorded a grid {info.grid} with {full_text} text tokens "
                f"({tokens}): the tracker did not see the whole input. Apply dit_accel after "
                "enable_parallelism."
            )
    _warn_head_coupling(processor)

    def dense() -> torch.Tensor:
        return dispatch_attention_fn(qf, kf, vf, backend=processor._attention_backend)

    out = processor._run_method(
        qf, kf, vf, layout="bshd", dense_fn=dense, kv_len=None, text_len=full_text,
        text_position=text_position,
    )  # fmt: skip
    out = seq_all_to_all(_to_rank_order(out, segments, degree), group, False)
    return out.transpose(1, 2) if layout == "bhsd" else out


def _warn_head_coupling(processor) -> None:
    if torch.compiler.is_compiling():
        return
    pattern = getattr(processor.runtime.method, "pattern", None)
    knobs = pattern.knobs() if pattern is not None else {}
    if knobs.get("head_adaptive"):
        _log_once(
            f"{processor.runtime.method.name}: head-adaptive sparsity ranks the heads each context-parallel "
            "rank holds, not all heads of the layer: the searched plans differ from a single-GPU run's "
            "(head_adaptive=False gives the same plans)"
        )


def unsharded_arguments(module: torch.nn.Module, hook_name: str, arguments: dict) -> dict:
    """The forward arguments of ``module`` as they were before the context-parallel split hooks that run
    ahead of the hook ``hook_name`` (registered after it) sharded them: those inputs are gathered from every
    rank (a collective). ``arguments`` itself when no such hook exists."""
    if getattr(module, "_parallel_config", None) is None:
        return arguments
    hooks = outer_split_hooks(module, hook_name)
    if not hooks:
        return arguments
    arguments = dict(arguments)
    gathered = []
    for hook in hooks:  # registration order: the innermost (the last to have sharded) first
        for name in hook.metadata:
            if name in arguments:
                value = unshard_input(hook, name, arguments[name])
                if value is not arguments[name]:
                    gathered.append(name)
                    arguments[name] = value
    if gathered:
        _log_once(
            f"{type(module).__name__}: dit_accel was applied before enable_parallelism, so diffusers shards "
            f"{gathered} before dit_accel's step tracker sees them; the tracker gathers them back every "
            "forward. Apply dit_accel after enable_parallelism to skip that."
        )
    return arguments


def stats_group(transformers) -> object | None:
    """The process group that holds one model between ``transformers``' ranks: the context-parallel group
    of the first transformer with one, else None (the default group)."""
    for transformer in transformers:
        cp = _cp_config(getattr(transformer, "_parallel_config", None))
        if cp is not None and getattr(cp, "_flattened_mesh", None) is not None:
            return context_parallel_group(cp)
    return None


_IDENTITY = ("run", "component", "context", "step", "layer", "kind")


def merge_rank_stats(per_rank: list[tuple[list[dict], dict]]) -> tuple[list[dict], dict]:
    """Records and memory of the whole model from each rank's ``(records, memory)``.

    Every rank must have recorded the same calls (run, component, context, step, layer, kind), in the same
    order; a difference raises RuntimeError naming the first one. Per call: ``density`` is the mean over ranks
    (NaN-free ranks), ``time_ms`` the slowest rank's, ``rank_density`` each rank's. Memory: byte figures and
    counts summed over ranks, ``budget`` (per device) as rank 0's, ``ranks`` the number of ranks.
    """
    if not per_rank:
        raise ValueError("no rank's stats to merge")
    first = per_rank[0][0]
    for r, (records, _) in enumerate(per_rank[1:], 1):
        if len(records) != len(first):
            raise RuntimeError(
                f"rank {r} recorded {len(records)} attention calls, rank 0 recorded {len(first)}: the ranks "
                "did not run the same forwards (or stats were read at different times)"
            )
        for a, b in zip(first, records):
            ka, kb = (tuple(x[key] for key in _IDENTITY) for x in (a, b))
            if ka != kb:
                raise RuntimeError(
                    f"ranks 0 and {r} disagree on an attention call: {dict(zip(_IDENTITY, ka))} vs "
                    f"{dict(zip(_IDENTITY, kb))}"
                )
    merged = []
    for i, record in enumerate(first):
        densities = [records[i]["density"] for records, _ in per_rank]
        finite = [d for d in densities if not math.isnan(d)]
        times = [records[i]["time_ms"] for records, _ in per_rank if records[i]["time_ms"] is not None]
        merged.append(
            {
                **record,
                "density": sum(finite) / len(finite) if finite else float("nan"),
                "time_ms": max(times) if times else None,
                "rank_density": densities,
            }
        )
    return merged, _merge_memory([memory for _, memory in per_rank])


def _merge_memory(memories: list[dict]) -> dict:
    if not any(memories):
        return {}
    out: dict = {}
    for key in dict.fromkeys(k for m in memories for k in m):
        values = [m.get(key) for m in memories]
        if key == "budget":
            out[key] = values[0]
        elif all(isinstance(v, dict) or v is None for v in values):
            counts: dict = {}
            for v in values:
                for name, n in (v or {}).items():
                    counts[name] = counts.get(name, 0) + n
            out[key] = counts
        else:
            out[key] = sum(v for v in values if isinstance(v, (int, float)))
    out["ranks"] = len(memories)
    return out


def gather_stats(stats, group=None):
    """``stats`` (one rank's :class:`dit_accel.AttentionStats`) merged with every other rank's of ``group``
    (:func:`merge_rank_stats`). A collective: every rank of the group must call it. Without an initialised
    process group, ``stats`` itself."""
    import torch.distributed as dist

    from .api import AttentionStats

    if not (dist.is_available() and dist.is_initialized()):
        return stats
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (stats.records, stats.memory), group=group)
    records, memory = merge_rank_stats(gathered)
    return AttentionStats(stats.method, records, memory)
