"""Block plans: which key blocks each query block attends.

A plan is the sparse-attention analogue of FlexAttention's ``kv_num_blocks`` / ``kv_indices``: per
(batch, head, query block) a sorted list of key-block indices and a count. Counts may differ per head and
per row; entries past the count are ignored (:meth:`BlockPlan.from_block_mask` pads them with the last valid
index, or 0).

A plan built with the constructor is checked in full, contents included; the internal constructors
(:meth:`BlockPlan.from_block_mask`, :meth:`BlockPlan.dense`, :meth:`BlockPlan.expand`, :meth:`BlockPlan.to`)
build valid plans and check only shapes, dtypes and sizes, so a plan built per step costs no host
synchronisation beyond its own construction.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

__all__ = ["BlockPlan", "num_blocks"]


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size ``block`` that cover ``length`` tokens (the last may be partial)."""
    return -(-int(length) // int(block))


def _check_block_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int (tokens per block), got {value!r}")
    return int(value)


def _position(flags: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(flags)[0].tolist())


@dataclass(frozen=True)
class BlockPlan:
    """Per (batch, head, query block): the sorted key blocks to attend.

    Attributes:
        block_q: query block size in tokens.
        block_k: key block size in tokens.
        kv_indices: int32 [B, H, n_qblocks, max_k], strictly ascending within the first ``kv_counts``
            entries (the kernels rely on it: a row with every block runs a dense loop), each in
            [0, num_kv_blocks). Entries past the count are ignored.
        kv_counts: int32 [B, H, n_qblocks], 0 <= count <= max_k.
        num_kv_blocks: number of key blocks of the key sequence the plan was built for.

    B and H may be 1 to broadcast over the batch or heads of the attention call.

    The constructor checks all of this, contents included (a host synchronisation when the tensors are on a
    GPU); :meth:`from_block_mask`, :meth:`dense`, :meth:`expand` and :meth:`to` build plans that are valid
    by construction and skip the content checks. A plan is immutable: editing its tensors in place
    bypasses the checks.
    """

    block_q: int
    block_k: int
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    num_kv_blocks: int

    def __post_init__(self):
        self._check_structure()
        self._check_contents()

    @classmethod
    def _trusted(cls, block_q, block_k, kv_indices, kv_counts, num_kv_blocks) -> BlockPlan:
        """A plan whose contents are valid by construction: structure checked, no host synchronisation."""
        plan = cls.__new__(cls)
        for name, value in (
            ("block_q", block_q),
            ("block_k", block_k),
            ("kv_indices", kv_indices),
            ("kv_counts", kv_counts),
            ("num_kv_blocks", num_kv_blocks),
        ):
            object.__setattr__(plan, name, value)
        plan._check_structure()
        return plan

    def _check_structure(self) -> None:
        object.__setattr__(self, "block_q", _check_block_size("block_q", self.block_q))
        object.__setattr__(self, "block_k", _check_block_size("block_k", self.block_k))
        n = self.num_kv_blocks
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"num_kv_blocks must be an int >= 0, got {n!r}")
        object.__setattr__(self, "num_kv_blocks", int(n))
        for name in ("kv_indices", "kv_counts"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be an int32 torch.Tensor, got {type(t).__name__}")
        if self.kv_indices.dim() != 4 or self.kv_counts.dim() != 3:
            raise ValueError(
                "kv_indices must be [B, H, n_qblocks, max_k] and kv_counts [B, H, n_qblocks], got "
                f"{tuple(self.kv_indices.shape)} and {tuple(self.kv_counts.shape)}"
            )
        if self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(
                f"kv_indices {tuple(self.kv_indices.shape)} and kv_counts "
                f"{tuple(self.kv_counts.shape)} disagree"
            )
        if self.kv_indices.dtype != torch.int32 or self.kv_counts.dtype != torch.int32:
            raise ValueError(
                "kv_indices and kv_counts must be int32, got "
                f"{self.kv_indices.dtype} and {self.kv_counts.dtype}"
            )
        if self.kv_indices.device != self.kv_counts.device:
            raise ValueError(
                f"kv_indices is on {self.kv_indices.device}, kv_counts on {self.kv_counts.device}"
            )

    def _check_contents(self) -> None:
        if self.kv_counts.numel() == 0:
            return
        max_k, n = self.max_k, self.num_kv_blocks
        counts = self.kv_counts.long()
        idx = self.kv_indices.long()
        bad_count = (counts < 0) | (counts > max_k)
        valid = torch.arange(max_k, device=idx.device) < counts.clamp(0, max_k).unsqueeze(-1)
        out_of_range = valid & ((idx < 0) | (idx >= n))
        not_ascending = valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
        flags = torch.stack([bad_count.any(), out_of_range.any(), not_ascending.any()]).tolist()
        if flags[0]:
            pos = _position(bad_count)
            raise ValueError(
                f"kv_counts{list(pos)} = {int(counts[pos])}: counts must lie in [0, max_k={max_k}] "
                "(max_k = kv_indices.shape[-1])"
            )
        if flags[1]:
            pos = _position(out_of_range)
            raise ValueError(
                f"kv_indices{list(pos)} = {int(idx[pos])} is outside [0, num_kv_blocks={n}); the first "
                f"kv_counts{list(pos[:3])} = {int(counts[pos[:3]])} entries of a row must be key-block "
                "indices"
            )
        if flags[2]:
            b, h, p, j = _position(not_ascending)
            raise ValueError(
                f"kv_indices[{b}, {h}, {p}] is not strictly ascending within its count: entry {j} is "
                f"{int(idx[b, h, p, j])}, entry {j + 1} is {int(idx[b, h, p, j + 1])} (sorted, no duplicates)"
            )

    # --- shape ---------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_counts.shape[2]

    @property
    def max_k(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block_q: int, block_k: int) -> BlockPlan:
        """Build a plan from a boolean block mask [B, H, n_qblocks, n_kblocks]."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a tensor [B, H, n_qblocks, n_kblocks], got {shape}")
        mask = mask.to(torch.bool)
        n_kb = mask.shape[-1]
        counts = mask.sum(-1, dtype=torch.int32)
        max_k = max(int(counts.max().item()) if counts.numel() else 0, 1)
        # A stable sort of the negated mask puts kept blocks first, in ascending index order.
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :max_k]
        order = order.to(torch.int32)
        # Pad slots past the count with the row's last valid index (or 0 for an empty row).
        slot = torch.arange(max_k, device=mask.device, dtype=torch.int32)
        last = torch.gather(order, -1, (counts.clamp(min=1) - 1).long().unsqueeze(-1))
        pad = torch.where(counts.unsqueeze(-1) > 0, last, torch.zeros_like(last))
        order = torch.where(slot < counts.unsqueeze(-1), order, pad)
        return cls._trusted(block_q, block_k, order.contiguous(), counts.contiguous(), n_kb)

    @classmethod
    def dense(cls, q_len: int, k_len: int, block_q: int = 128, block_k: int = 128, device=None) -> BlockPlan:
        """The plan that computes every block (B = H = 1)."""
        block_q, block_k = _check_block_size("block_q", block_q), _check_block_size("block_k", block_k)
        for name, length in (("q_len", q_len), ("k_len", k_len)):
            if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
                raise ValueError(f"{name} must be an int >= 0, got {length!r}")
        n_qb, n_kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
        mask = torch.ones(1, 1, n_qb, n_kb, dtype=torch.bool, device=device)
        return cls.from_block_mask(mask, block_q, block_k)

    # --- views ---------------------------------------------------------------------------------
    def to_block_mask(self) -> torch.Tensor:
        """Boolean block mask [B, H, n_qblocks, num_kv_blocks]."""
        slot = torch.arange(self.max_k, device=self.device)
        valid = slot < self.kv_counts.unsqueeze(-1)
        mask = torch.zeros(*self.kv_counts.shape, self.num_kv_blocks, dtype=torch.uint8, device=self.device)
        if self.num_kv_blocks == 0:
            return mask.bool()
        idx = self.kv_indices.long().clamp(0, max(self.num_kv_blocks - 1, 0))
        mask.scatter_reduce_(-1, idx, valid.to(torch.uint8), reduce="amax")
        mask = mask.bool()
        return mask

    def to_token_mask(self, q_len: int, k_len: int) -> torch.Tensor:
        """Boolean element mask [B, H, q_len, k_len] (for oracles and pictures; O(S^2) memory)."""
        bm = self.to_block_mask()
        rows = torch.arange(q_len, device=self.device) // self.block_q
        cols = torch.arange(k_len, device=self.device) // self.block_k
        return bm[:, :, rows][:, :, :, cols]

    def density(self) -> float:
        """Computed blocks over all blocks (averaged over batch and heads)."""
        total = self.kv_counts.numel() * self.num_kv_blocks
        return float(self.kv_counts.sum().item()) / total if total else 0.0

    def expand(self, batch: int, heads: int) -> BlockPlan:
        """Broadcast a plan with B or H of 1 to (batch, heads) (a view, no copy)."""
        if self.batch not in (1, batch) or self.heads not in (1, heads):
            raise ValueError(f"plan of B={self.batch}, H={self.heads} cannot broadcast to ({batch}, {heads})")
        return BlockPlan._trusted(
            self.block_q,
            self.block_k,
            self.kv_indices.expand(batch, heads, -1, -1),
            self.kv_counts.expand(batch, heads, -1),
            self.num_kv_blocks,
        )

    def to(self, device) -> BlockPlan:
        return BlockPlan._trusted(
            self.block_q,
            self.block_k,
            self.kv_indices.to(device),
            self.kv_counts.to(device),
            self.num_kv_blocks,
        )

    def nbytes(self) -> int:
        return self.kv_indices.numel() * 4 + self.kv_counts.numel() * 4
