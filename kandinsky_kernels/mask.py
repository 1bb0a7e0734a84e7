"""`BlockSparseMask`: the compact block-sparse attention mask every kernel of the library consumes.

Layout (the FlexAttention ``BlockMask`` convention, restricted to what block-sparse kernels need):

``kv_num_blocks``  int32 (B, H, Nq): how many key blocks query block ``i`` attends to.
``kv_indices``     int32 (B, H, Nq, Nk): for each query block, the active key-block ids first (each
                   at most once, any order; the library's own masks list them ascending, then the
                   inactive ids ascending); kernels read only the first ``kv_num_blocks`` entries, and
                   the rest of a row may hold anything.
``block_size``     tokens per block on both sides (64 in Kandinsky 5).
``seq_len_q``, ``seq_len_kv``  token counts (``Nq * block_size`` and ``Nk * block_size``).
``token_valid``    optional bool (B, S_kv): False marks padding tokens (from
                   :func:`kandinsky_kernels.fractal_flatten` of a grid whose H or W is not a multiple
                   of the tile). Pad keys are never attended to; pad queries produce values no real
                   token depends on. ``None`` means every token is real.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kandinsky_kernels._validation import (
    check_mask_contents,
    check_positive_int,
    check_tensor,
    mark_mask_checked,
)

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from kandinsky_kernels.ops.fractal import FractalLayout


def _compact(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bool (..., Nq, Nk) -> (counts int32 (..., Nq), indices int32 (..., Nq, Nk)).

    Active ids first then inactive ids, each ascending: a stable partition computed with two
    int32 cumulative sums instead of an int64 argsort.
    """
    nk = dense.shape[-1]
    d32 = dense.to(torch.int32)
    counts = d32.sum(-1, dtype=torch.int32)
    pos_active = torch.cumsum(d32, -1, dtype=torch.int32) - 1
    pos_inactive = counts.unsqueeze(-1) + torch.cumsum(1 - d32, -1, dtype=torch.int32) - 1
    pos = torch.where(dense, pos_active, pos_inactive).long()
    ids = torch.arange(nk, dtype=torch.int32, device=dense.device).expand_as(d32)
    indices = torch.empty_like(d32).scatter_(-1, pos, ids)
    mark_mask_checked(counts, indices)  # valid by construction: no check when a mask wraps them
    return counts, indices


__all__ = ["BlockSparseMask"]

_NOT_OURS = object()  # what a mask_mod that to_flex_block_mask did not make "recovers"


@dataclass
class BlockSparseMask:
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int = 64
    seq_len_q: int | None = None
    seq_len_kv: int | None = None
    token_valid: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("kv_num_blocks", self.kv_num_blocks, ndim=3, dtypes=(torch.int32,))
        check_tensor("kv_indices", self.kv_indices, ndim=4, dtypes=(torch.int32,))
        check_positive_int("block_size", self.block_size)
        if self.kv_indices.shape[:3] != self.kv_num_blocks.shape:
            raise ValueError(
                f"kv_indices shape {tuple(self.kv_indices.shape)} must start with kv_num_blocks shape "
                f"{tuple(self.kv_num_blocks.shape)} (B, H, Nq)"
            )
        if self.kv_indices.device != self.kv_num_blocks.device:
            raise ValueError(
                f"kv_indices on {self.kv_indices.device} but kv_num_blocks on {self.kv_num_blocks.device}"
            )
        nq, nk = self.kv_indices.shape[2], self.kv_indices.shape[3]
        if not torch.compiler.is_compiling():  # data-dependent; the attention ops check again when run
            check_mask_contents(self.kv_num_blocks, self.kv_indices)
        if self.seq_len_q is None:
            self.seq_len_q = nq * self.block_size
        if self.seq_len_kv is None:
            self.seq_len_kv = nk * self.block_size
        for name, s, n in (("seq_len_q", self.seq_len_q, nq), ("seq_len_kv", self.seq_len_kv, nk)):
            if s != n * self.block_size:
                raise ValueError(f"{name}={s} does not equal {n} blocks x block_size {self.block_size}")
        if self.token_valid is not None:
            tv = self.token_valid
            check_tensor("token_valid", tv, ndim=(1, 2), dtypes=(torch.bool,))
            if tv.dim() == 1:
                tv = tv.unsqueeze(0)
            b = self.kv_num_blocks.shape[0]
            # A mask shared by the batch (B = 1) may still carry per-sample padding.
            if tv.shape[-1] != self.seq_len_kv or (b != 1 and tv.shape[0] not in (1, b)):
                raise ValueError(
                    f"token_valid shape {tuple(self.token_valid.shape)} must be (S,) or (B, S) with "
                    f"B={b} (or any B when the mask's B is 1), S={self.seq_len_kv}"
                )
            if tv.device != self.kv_indices.device:
                raise ValueError(f"token_valid on {tv.device} but the mask is on {self.kv_indices.device}")
            self.token_valid = tv.expand(max(b, tv.shape[0]), -1)

    # ----------------------------------------------------------------------------------- shape facts
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Nq, Nk)."""
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs that are computed, over all batches and heads
        (0.0 for a mask with no pairs). A property (reads the counts: one host sync on a GPU)."""
        b, h, nq, nk = self.shape
        pairs = b * h * nq * nk
        return self.kv_num_blocks.sum(dtype=torch.int64).item() / pairs if pairs else 0.0

    def validate(self) -> "BlockSparseMask":
        """Check the contents again (counts in [0, Nk], active ids in range and distinct), e.g. after
        changing the tensors in place; raises ValueError. The constructor and the attention ops do
        this already."""
        check_mask_contents(self.kv_num_blocks, self.kv_indices, force=True)
        return self

    # ------------------------------------------------------------------------------- conversions
    @classmethod
    def from_dense_blocks(
        cls,
        mask: torch.Tensor,
        block_size: int = 64,
        *,
        token_valid: torch.Tensor | None = None,
        grid: "FractalLayout | tuple[int, int, int] | None" = None,
    ) -> "BlockSparseMask":
        """Build from a bool block mask of shape (Nq, Nk), (H, Nq, Nk) or (B, H, Nq, Nk).

        ``token_valid``: optional bool (S_kv,) or (B, S_kv), False for pad keys. ``grid``: optional
        token grid (T, H, W) in tokens, or a :class:`kandinsky_kernels.FractalLayout`, of a fractal
        sequence of Nk blocks: its padding tokens (H or W not a multiple of the tile) are marked
        invalid too (AND-ed with ``token_valid``); its tile must be sqrt(``block_size``). Without
        either, every token counts as real, so a mask over a padded grid would attend pad keys.
        """
        check_tensor("mask", mask, ndim=(2, 3, 4), dtypes=(torch.bool,))
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if grid is not None:
            from kandinsky_kernels.ops.fractal import _grid_token_valid

            check_positive_int("block_size", block_size)
            _, token_valid = _grid_token_valid(grid, token_valid, mask.shape[-1] * block_size, block_size,
                                               mask.device, name="the mask")
        counts, indices = _compact(mask)
        return cls(counts, indices, block_size, token_valid=token_valid)

    @classmethod
    def from_flex_block_mask(
        cls,
        block_mask,
        *,
        token_valid: torch.Tensor | None = None,
        partial_blocks_as_full: bool = False,
    ) -> "BlockSparseMask":
        """The inverse of :meth:`to_flex_block_mask`: a ``torch.nn.attention.flex_attention.BlockMask``
        with equal query and key block sizes and sequence lengths that are whole blocks, as a
        BlockSparseMask. Its partial and full blocks together become the active blocks.

        A BlockMask made by :meth:`to_flex_block_mask` round-trips exactly, padding (``token_valid``)
        included. Any other BlockMask's partial blocks carry an element-wise ``mask_mod`` that this
        mask cannot express: that raises ValueError unless ``partial_blocks_as_full=True`` (every
        element of a partial block attended to; pass ``token_valid=`` (bool (S_kv,) or (B, S_kv)) for
        pad keys). A ``token_valid`` given here replaces a recovered one.
        """
        from torch.nn.attention.flex_attention import BlockMask, noop_mask

        if not isinstance(block_mask, BlockMask):
            raise ValueError(
                f"block_mask must be a flex_attention BlockMask, got {type(block_mask).__name__}"
            )
        bq, bk = block_mask.BLOCK_SIZE
        if bq != bk:
            raise ValueError(f"block_mask has BLOCK_SIZE (Q, KV) = ({bq}, {bk}); a BlockSparseMask needs "
                             "one block size for queries and keys")
        sq, sk = block_mask.seq_lengths
        if sq % bq or sk % bk:
            raise ValueError(f"block_mask has seq_lengths (Sq, Skv) = ({sq}, {sk}), not whole blocks of "
                             f"{bq} tokens; a BlockSparseMask needs S a multiple of the block size")
        nq, nk = sq // bq, sk // bk
        partial = block_mask.kv_num_blocks
        recovered = getattr(block_mask.mask_mod, "_kk_token_valid", _NOT_OURS)
        ours = block_mask.mask_mod is noop_mask or recovered is not _NOT_OURS
        if not ours and not partial_blocks_as_full and bool((partial > 0).any()):
            raise ValueError(
                "block_mask has partial blocks with a mask_mod that a BlockSparseMask cannot express "
                "element by element; pass partial_blocks_as_full=True to attend to every element of "
                "them (and token_valid= for pad keys)"
            )
        dense = None
        for counts, indices in ((partial, block_mask.kv_indices),
                                (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
            if counts is None:
                continue
            counts, indices = counts[..., :nq], indices[..., :nq, :nk].to(torch.int32)
            part = cls(counts.to(torch.int32).contiguous(), indices.contiguous(), bq).to_dense_blocks()
            dense = part if dense is None else dense | part
        if token_valid is None and recovered is not _NOT_OURS:
            token_valid = recovered
        return cls.from_dense_blocks(dense, bq, token_valid=token_valid)

    def to_dense_blocks(self) -> torch.Tensor:
        """Bool (B, H, Nq, Nk): True where query block i attends to key block j."""
        nk = self.num_kv_blocks
        slot = torch.arange(nk, device=self.device, dtype=torch.int32)
        active = slot < self.kv_num_blocks.unsqueeze(-1)
        # Inactive slots go to a spare column: only the active part of a row is meaningful.
        ids = torch.where(active, self.kv_indices, nk).long()
        dense = torch.zeros((*self.shape[:3], nk + 1), dtype=torch.bool, device=self.device)
        return dense.scatter_(-1, ids, active)[..., :nk]

    def to_dense_tokens(self) -> torch.Tensor:
        """Bool (B, H, S_q, S_kv) token-level mask (blocks expanded, pad keys removed). For tests."""
        bs = self.block_size
        dense = self.to_dense_blocks().repeat_interleave(bs, -2).repeat_interleave(bs, -1)
        if self.token_valid is not None:
            dense = dense & self.token_valid[:, None, None, :]
        return dense

    def transpose(self, *, token_valid: torch.Tensor | None = None) -> "BlockSparseMask":
        """The same pattern seen from the key side: row ``j`` lists the query blocks that attend to key
        block ``j`` (ascending). Shapes (B, H, Nk) and (B, H, Nk, Nq). What a backward kernel that
        accumulates dK/dV per key block walks. ``token_valid`` is not carried over (it describes keys);
        pass ``token_valid=`` (bool (S_q,) or (B, S_q)) for the new keys, the original queries.
        """
        counts, indices = _compact(self.to_dense_blocks().transpose(-1, -2))
        return BlockSparseMask(
            counts, indices, self.block_size, seq_len_q=self.seq_len_kv, seq_len_kv=self.seq_len_q,
            token_valid=token_valid,
        )

    def with_dense_keys(self, num_tokens: int, *, where: str = "after") -> "BlockSparseMask":
        """This mask with a key part every query attends to: ``num_tokens`` keys (text tokens, say,
        as in joint text + video attention) placed ``"after"`` or ``"before"`` the mask's keys, in
        ceil(num_tokens / block_size) key blocks active in every row; the pad keys that fill the last
        block are marked invalid in ``token_valid``. The attention's k and v must hold the keys in the
        same order, the dense part padded to whole blocks (its pad values are never read).

        Returns a mask (B, H, Nq, Nk + ceil(num_tokens / block_size)); the existing ``token_valid``
        (or all-valid) is extended over the new keys.
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        if where not in ("after", "before"):
            raise ValueError(f"where must be 'after' or 'before', got {where!r}")
        bs = self.block_size
        nd = -(-num_tokens // bs)
        blocks = self.to_dense_blocks()
        ones = torch.ones((*blocks.shape[:3], nd), dtype=torch.bool, device=self.device)
        parts = [blocks, ones] if where == "after" else [ones, blocks]
        tv = self.token_valid
        if tv is None:
            tv = torch.ones(1, self.seq_len_kv, dtype=torch.bool, device=self.device)
        dense_tv = (torch.arange(nd * bs, device=self.device) < num_tokens).expand(tv.shape[0], -1)
        tvs = [tv, dense_tv] if where == "after" else [dense_tv, tv]
        counts, indices = _compact(torch.cat(parts, -1))
        return BlockSparseMask(counts, indices, bs, token_valid=torch.cat(tvs, -1))

    def to(self, device: torch.device | str) -> "BlockSparseMask":
        tv = None if self.token_valid is None else self.token_valid.to(device)
        counts, indices = self.kv_num_blocks.to(device), self.kv_indices.to(device)
        if counts is not self.kv_num_blocks or indices is not self.kv_indices:
            check_mask_contents(self.kv_num_blocks, self.kv_indices)  # a no-op for a checked mask
            mark_mask_checked(counts, indices)
        return BlockSparseMask(
            counts,
            indices,
            self.block_size,
            self.seq_len_q,
            self.seq_len_kv,
            tv,
        )

    def to_flex_block_mask(self, full_blocks: bool | None = None) -> "BlockMask":
        """A ``torch.nn.attention.flex_attention.BlockMask`` with exactly this pattern.

        ``full_blocks``: pass the active blocks as *full* blocks (no per-element ``mask_mod``, what the
        official code does) or as *partial* blocks with a ``mask_mod``. ``None`` picks full blocks on
        CUDA when there is no padding, partial otherwise: compiled Flex on CPU fails to compile
        full-block-only masks, and padding needs the per-element ``mask_mod``. Eager (uncompiled)
        Flex ignores the block indices on CPU; use it with ``torch.compile(flex_attention)``.
        """
        from torch.nn.attention.flex_attention import BlockMask

        if full_blocks is None:
            full_blocks = self.device.type == "cuda" and self.token_valid is None
        if full_blocks and self.token_valid is not None:
            raise ValueError("full_blocks=True cannot express padding (token_valid); use partial blocks")
        seq_lengths = (self.seq_len_q, self.seq_len_kv)
        if full_blocks:
            return BlockMask.from_kv_blocks(
                torch.zeros_like(self.kv_num_blocks),
                self.kv_indices,
                self.kv_num_blocks,
                self.kv_indices,
                BLOCK_SIZE=self.block_size,
                mask_mod=None,
                seq_lengths=seq_lengths,
            )
        if self.token_valid is None:

            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= 0  # every element of an active block

        else:
            valid = self.token_valid

            def mask_mod(b, h, q_idx, kv_idx):
                return valid[b, kv_idx]

        # Lets from_flex_block_mask recover what the element-wise mask_mod means.
        mask_mod._kk_token_valid = self.token_valid

        return BlockMask.from_kv_blocks(
            self.kv_num_blocks,
            self.kv_indices,
            BLOCK_SIZE=self.block_size,
            mask_mod=mask_mod,
            seq_lengths=seq_lengths,
        )

    def __repr__(self) -> str:
        b, h, nq, nk = self.shape
        pad = "" if self.token_valid is None else ", padded"
        return (
            f"BlockSparseMask(B={b}, H={h}, Nq={nq}, Nk={nk}, block_size={self.block_size}, "
            f"density={self.density:.3f}{pad}, device={self.device})"
        )
