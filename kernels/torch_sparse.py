"""Dense and block-sparse attention on the CPU without the reference's cost: the path of ``backend="torch"``
on the CPU for calls that need no gradient.

``reference.attention_reference`` (the test oracle, and the path for gradients) computes every score in fp32
torch ops and masks the ones outside the plan. On two CPU cores at the embedded model's 2,496 tokens one call
took about 12x PyTorch's CPU flash-attention kernel, so a sparse render ran slower than a dense one. Here:

- dense (``dense_attention``): PyTorch's CPU flash-attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``), which also returns the log-sum-exp;
- sparse (``sparse_attention``): the plan's rows (batch, head, query block) are grouped by how many key
  blocks they keep; each group gathers its rows' key and value blocks and runs the flash kernel with the
  rows as its batch. The work follows the plan's density, plus the copy of the gathered blocks, paid once
  per query block (so it weighs most with small query blocks). A plan that keeps every block runs dense.

Same contract as the reference: fp32 arithmetic (half-precision inputs are upcast), any strides, sequence
tails and ``kv_len`` masked, a row with no key gives 0 and LSE -inf; out in q's dtype, LSE fp32.
"""

from __future__ import annotations

import threading

import torch

from .plan import BlockPlan, num_blocks

# Gathered key (and value) elements held at once per flash call: bounds the gather's memory.
_CHUNK_ELEMENTS = 1 << 22
# Scores held at once by block_mass: small enough that its passes over them stay in the CPU's caches (2.5x
# faster than 16M at the embedded model's 2,496 tokens on two cores).
_MASS_CHUNK_ELEMENTS = 1 << 21
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def available(q: torch.Tensor, k: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether this path serves these inputs: on the CPU, no gradient wanted, not being traced by
    ``torch.compile`` (the plan checks read tensors on the host), at least one query and one key."""
    return (
        all(t.device.type == "cpu" for t in (q, k, *tensors))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, *tensors)))
        and not torch.compiler.is_compiling()
        and q.shape[2] > 0
        and k.shape[2] > 0
    )


def _attend(q, k, v, scale: float, mask: torch.Tensor | None, has_key: torch.Tensor | None):
    """The flash kernel on fp32 [N, H, S, D] views; rows where ``has_key`` is False get 0 and LSE -inf."""
    out, lse = _flash(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    if has_key is not None:
        out = torch.where(has_key[..., None], out, 0.0)
        lse = torch.where(has_key, lse, float("-inf"))
    return out, lse


def _additive(keep: torch.Tensor) -> torch.Tensor:
    """fp32 additive mask: 0 where ``keep``, -inf elsewhere."""
    return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))


def _key_limit(kv_len: torch.Tensor | None, batch: int, k_len: int, device) -> torch.Tensor | None:
    if kv_len is None:
        return None
    return kv_len.to(device).long().clamp(0, k_len).view(batch, 1, 1, 1)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kv_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over every key (below ``kv_len``): out [B, H, S_q, D] in q's dtype, lse fp32 [B, H, S_q]."""
    batch, _, q_len, _ = q.shape
    k_len = k.shape[2]
    mask = has_key = None
    limit = _key_limit(kv_len, batch, k_len, q.device)
    if limit is not None:
        keep = torch.arange(k_len, device=q.device) < limit  # [B, 1, 1, S_k]
        mask = _additive(keep)
        has_key = (limit > 0).view(batch, 1, 1).expand(batch, q.shape[1], q_len)
    out, lse = _attend(q.float(), k.float(), v.float(), scale, mask, has_key)
    return out.to(q.dtype), lse.contiguous()


_workspace = threading.local()


def _gather(blocks: torch.Tensor, index: torch.Tensor, slot: str) -> torch.Tensor:
    """``blocks.index_select(0, index)`` into a buffer this thread reuses (one per ``slot``; it grows to the
    largest gather: ``_CHUNK_ELEMENTS`` fp32 elements, or one row's blocks where a row holds more). A fresh
    gather of tens of MB pays a page fault per 4 kB on every call: 3x the copy itself on two cores (24 ms
    against 8 ms for 51 MB). The result is valid until the next gather into the same slot."""
    n = index.numel() * blocks.shape[1]
    buf = getattr(_workspace, slot, None)
    if buf is None or buf.numel() < n or buf.dtype != blocks.dtype:
        # A normal tensor even inside inference_mode: an inference tensor could not be written outside it.
        with torch.inference_mode(False):
            buf = torch.empty(n, dtype=blocks.dtype, device=blocks.device)
        setattr(_workspace, slot, buf)
    return torch.index_select(blocks, 0, index, out=buf[:n].view(index.numel(), blocks.shape[1]))


def _blocks(x: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """[B, H, S, D] -> fp32 [B, H, n, block, D], the tail zero-padded."""
    b, h, s, d = x.shape
    x = x.float()
    if n * block != s:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * block - s))
    return x.reshape(b, h, n, block, d)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    kv_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the key blocks ``plan`` lists (its B and H may be 1, broadcast).

    Args:
        q, k, v: [B, H, S_q | S_k, D] (any strides).
        scale: softmax scale; kv_len: optional int [B], keys at or past it are ignored.

    Returns:
        out [B, H, S_q, D] in q's dtype; lse fp32 [B, H, S_q] (-inf for a row with no key, whose output is 0).
    """
    batch, heads, q_len, d = q.shape
    k_len = k.shape[2]
    plan = plan.to(q.device)
    n_qb, n_kb = num_blocks(q_len, plan.block_q), num_blocks(k_len, plan.block_k)
    if plan.max_k == n_kb and bool((plan.kv_counts == n_kb).all()):
        return dense_attention(q, k, v, scale, kv_len)
    limit = _key_limit(kv_len, batch, k_len, q.device)
    if limit is None:
        limit = torch.full((1, 1, 1, 1), k_len, device=q.device)
    out, lse = _gathered(q, k, v, plan, scale, limit, n_qb, n_kb)
    return out[:, :, :q_len].to(q.dtype), lse[:, :, :q_len].contiguous()


def _gathered(q, k, v, plan: BlockPlan, scale, limit, n_qb, n_kb):
    """Rows (batch, head, query block) grouped by how many key blocks they keep: each group gathers exactly
    its rows' blocks (no padding to the longest row) and runs as one batched flash call."""
    batch, heads, _, d = q.shape
    bq, bk = plan.block_q, plan.block_k
    n_rows = batch * heads * n_qb
    idx = plan.kv_indices.long().expand(batch, heads, n_qb, -1).reshape(n_rows, -1)
    cnt = plan.kv_counts.long().expand(batch, heads, n_qb).reshape(n_rows)
    qb = _blocks(q, bq, n_qb).reshape(n_rows, 1, bq, d)
    kb = _blocks(k, bk, n_kb).reshape(batch * heads * n_kb, bk * d)
    vb = _blocks(v, bk, n_kb).reshape(batch * heads * n_kb, bk * d)
    # Keys past the limit (sequence tail, kv_len) can only sit in blocks reaching past it.
    check_keys = bool((limit < n_kb * bk).any())
    row_limit = limit.reshape(-1).expand(batch).repeat_interleave(heads * n_qb)  # [n_rows]
    cols = torch.arange(bk, device=q.device)
    out = torch.zeros(n_rows, 1, bq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n_rows, 1, bq), float("-inf"), dtype=torch.float32, device=q.device)
    for c in torch.unique(cnt).tolist():
        if c == 0:
            continue  # no key: out 0, lse -inf as initialised
        group = torch.nonzero(cnt == c).squeeze(1)
        step = max(_CHUNK_ELEMENTS // (c * bk * d), 1)
        for g0 in range(0, group.numel(), step):
            rows = group[g0 : g0 + step]
            m = rows.numel()
            ii = idx[rows, :c]  # [m, c]
            flat = ((rows // n_qb) * n_kb)[:, None] + ii
            kg = _gather(kb, flat.reshape(-1), "k").view(m, 1, c * bk, d)
            vg = _gather(vb, flat.reshape(-1), "v").view(m, 1, c * bk, d)
            mask = has_key = None
            if check_keys:
                valid = ((ii[..., None] * bk + cols) < row_limit[rows, None, None]).reshape(m, 1, 1, c * bk)
                if not bool(valid.all()):
                    mask = _additive(valid)
                    row_has_key = valid.any(-1)  # [m, 1, 1]
                    if not bool(row_has_key.all()):
                        has_key = row_has_key.expand(m, 1, bq)
            out[rows], lse[rows] = _attend(qb[rows], kg, vg, scale, mask, has_key)
    return out.view(batch, heads, n_qb * bq, d), lse.view(batch, heads, n_qb * bq)


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """W[b, h, p, c] = sum over rows i of query block p and keys j < kv_len[b] of key block c of
    exp(s_ij - lse_i), as ``reference.block_mass_reference``: rows with lse -inf add nothing.

    One matrix product per chunk of query blocks gives s - lse (the LSE enters as the product's bias), one
    in-place exp, zeroed columns for keys past the sequence or ``kv_len``, one sum over the blocks. Padding
    rows (the query tail) get lse = +inf and so add exp(-inf) = 0.
    """
    batch, heads, q_len, d = q.shape
    k_len = k.shape[2]
    n_qb, n_kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    qb = _blocks(q, block_q, n_qb).reshape(batch * heads, n_qb * block_q, d)
    kt = _blocks(k, block_k, n_kb).reshape(batch * heads, n_kb * block_k, d).transpose(1, 2)
    neg = -torch.where(torch.isinf(lse), float("inf"), lse.float())  # a row without keys adds nothing
    neg = torch.nn.functional.pad(neg, (0, n_qb * block_q - q_len), value=float("-inf"))
    neg = neg.reshape(batch * heads, n_qb * block_q, 1)
    limits = [k_len] * batch if kv_len is None else kv_len.clamp(0, k_len).tolist()
    w = torch.empty(batch * heads, n_qb, n_kb, dtype=torch.float32, device=q.device)
    step = max(_MASS_CHUNK_ELEMENTS // max(batch * heads * block_q * n_kb * block_k, 1), 1)  # query blocks
    for p0 in range(0, n_qb, step):
        p1 = min(p0 + step, n_qb)
        r0, r1 = p0 * block_q, p1 * block_q
        p = torch.baddbmm(neg[:, r0:r1], qb[:, r0:r1], kt, alpha=scale).exp_()
        p = p.view(batch, heads, r1 - r0, n_kb * block_k)
        for b, limit in enumerate(limits):
            if limit < n_kb * block_k:
                p[b, :, :, limit:] = 0.0
        w[:, p0:p1] = p.view(batch * heads, p1 - p0, block_q, n_kb, block_k).sum((2, 4))
    return w.view(batch, heads, n_qb, n_kb)
