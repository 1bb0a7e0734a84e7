"""`BlockSparseMask`: the compact block-sparse attention mask every kernel of the library consumes.

Storage: compressed rows (CSR), memory in proportion to the active blocks:

``kv_ptr``   int64 (B, H, Nq + 1): query block ``i`` of (b, h) attends to the key blocks
             ``kv_cols[kv_ptr[b, h, i] : kv_ptr[b, h, i + 1]]``. Rows follow each other: the first
             pointer is 0, each head's last pointer is the next head's first, the last is ``nnz``.
``kv_cols``  int16 (int32 when Nk > 32,768) (nnz or more,): the active key-block ids, each at most
             once a row (the library's own masks list them ascending). Entries past ``nnz`` are
             unused capacity: inside ``torch.compile`` the masks the library builds have a size known
             before they run (B * H * Nq * Nk ids, half the bytes of an int32 table), because a
             data-dependent size would break the graph; eager masks hold exactly ``nnz``.
``block_size``  tokens per block on both sides (64 in Kandinsky 5).
``seq_len_q``, ``seq_len_kv``  token counts (``Nq * block_size`` and ``Nk * block_size``).
``token_valid`` optional bool (B, S_kv): False marks padding tokens (from
                :func:`kandinsky_kernels.fractal_flatten` of a grid whose H or W is not a multiple of
                the tile). Pad keys are never attended to; pad queries produce values no real token
                depends on. ``None`` means every token is real.

At Kandinsky 5 Pro's S = 93,696 (Nq = Nk = 1,464), H = 32 and 10 % density this is 14 MB a layer
where the FlexAttention-style dense index table ``(B, H, Nq, Nk)`` int32 takes 274 MB; the backward's
transpose (:meth:`BlockSparseMask.transpose`, built by a kernel) is as large again. The FlexAttention
form is still available: :attr:`kv_num_blocks`, :attr:`kv_indices` (materialised on request) and the
constructor, which takes it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kandinsky_kernels import _ext
from kandinsky_kernels._validation import (
    check_csr_contents,
    check_mask_contents,
    check_positive_int,
    check_tensor,
    mark_mask_checked,
)

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from kandinsky_kernels.ops.fractal import FractalLayout

__all__ = ["BlockSparseMask"]

_NOT_OURS = object()  # what a mask_mod that to_flex_block_mask did not make "recovers"
_INT16_LIMIT = 32768  # ids of at most this many blocks fit int16


def _ids_dtype(n: int) -> torch.dtype:
    """Dtype of block ids below ``n``: int16 where they fit, else int32."""
    return torch.int16 if n <= _INT16_LIMIT else torch.int32


def _ptr_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Row pointers int64 (Bm, Hm, N + 1) of consecutive rows with ``counts`` (Bm, Hm, N) entries."""
    bm, hm, n = counts.shape
    c = counts.reshape(bm * hm, n).to(torch.int64)
    ends = torch.cumsum(c.reshape(-1), 0).reshape(bm * hm, n) if n else c
    head_end = torch.cumsum(c.sum(-1), 0)  # each head's last pointer (works for N = 0 too)
    starts = ends - c
    return torch.cat([starts, head_end[:, None]], -1).reshape(bm, hm, n + 1)


def _row_counts(ptr: torch.Tensor) -> torch.Tensor:
    """Entries a row, int64 (Bm, Hm, N)."""
    return ptr[..., 1:] - ptr[..., :-1]


def _entry_rows(ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """For each of the ``nnz`` stored ids, its flat row (head * N + i), int64 (nnz,): the last row
    starting at or before it (a search, so no host sync and no data-dependent size under compile)."""
    starts = ptr[..., :-1].reshape(-1)
    return torch.searchsorted(starts, torch.arange(nnz, device=ptr.device), right=True) - 1


def _nnz_of(ptr: torch.Tensor) -> torch.Tensor:
    """The last row pointer (the number of ids in use) as a 0-d tensor (0 for an empty mask)."""
    return ptr.reshape(-1)[-1] if ptr.numel() else ptr.new_zeros(())


def _used(ptr: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bool (len(cols),): which ids are in use (the rest is capacity). Fixed shape: traceable."""
    return torch.arange(cols.numel(), device=cols.device) < _nnz_of(ptr)


def _dense_from_csr(ptr: torch.Tensor, cols: torch.Tensor, nk: int) -> torch.Tensor:
    bm, hm, n1 = ptr.shape
    size = bm * hm * (n1 - 1) * nk
    dense = torch.zeros(size + 1, dtype=torch.bool, device=ptr.device)  # + a slot the capacity goes to
    at = torch.where(_used(ptr, cols), _entry_rows(ptr, cols.numel()) * nk + cols.long(), size)
    dense[at] = True
    return dense[:size].reshape(bm, hm, n1 - 1, nk)


def _csr_from_dense(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (Bm, Hm, Nq, Nk) -> (ptr, cols), ids ascending in each row; exactly nnz ids, or (while
    compiling) Bm * Hm * Nq * Nk, the size known before it runs."""
    nk = dense.shape[-1]
    dtype = _ids_dtype(nk)
    ptr = _ptr_from_counts(dense.sum(-1, dtype=torch.int64))
    if not torch.compiler.is_compiling():
        cols = torch.nonzero(dense.reshape(-1, nk))[:, 1].to(dtype) if nk else \
            torch.zeros(0, dtype=dtype, device=dense.device)
        mark_mask_checked(ptr, cols)  # valid by construction
        return ptr, cols
    d = dense.reshape(-1, nk)
    cap = d.numel()
    slot = torch.cumsum(d, -1, dtype=torch.int64) - 1 + ptr[..., :-1].reshape(-1, 1)
    at = torch.where(d, slot, cap).reshape(-1)
    ids = torch.arange(nk, device=dense.device, dtype=dtype).expand_as(d).reshape(-1)
    cols = torch.zeros(cap + 1, dtype=dtype, device=dense.device).scatter_(0, at, ids)
    return ptr, cols[:cap]


def _compact(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bool (..., Nq, Nk) -> the FlexAttention-style table: (counts int32 (..., Nq), indices
    int32 (..., Nq, Nk)), active ids first then inactive ids, each ascending (two int32 cumulative
    sums instead of an int64 argsort)."""
    nk = dense.shape[-1]
    d32 = dense.to(torch.int32)
    counts = d32.sum(-1, dtype=torch.int32)
    pos_active = torch.cumsum(d32, -1, dtype=torch.int32) - 1
    pos_inactive = counts.unsqueeze(-1) + torch.cumsum(1 - d32, -1, dtype=torch.int32) - 1
    pos = torch.where(dense, pos_active, pos_inactive).long()
    ids = torch.arange(nk, dtype=torch.int32, device=dense.device).expand_as(d32)
    return counts, torch.empty_like(d32).scatter_(-1, pos, ids)


def _transpose_torch(ptr: torch.Tensor, cols: torch.Tensor, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose on any device with torch ops (a stable sort by key block keeps the query blocks
    ascending). int64 (nnz,) temporaries; the C++ kernel is a counting sort without them."""
    bm, hm, n1 = ptr.shape
    nq = n1 - 1
    nnz = int(_nnz_of(ptr))
    rows = _entry_rows(ptr, nnz)
    head, qi = rows // max(nq, 1), rows % max(nq, 1)
    key = head * nk + cols[:nnz].long()
    order = torch.sort(key, stable=True).indices
    tcols = torch.zeros(cols.numel(), dtype=_ids_dtype(nq), device=cols.device)  # the input's length
    tcols[:nnz] = qi[order].to(tcols.dtype)
    tcounts = torch.bincount(key, minlength=bm * hm * nk).reshape(bm, hm, nk)
    return _ptr_from_counts(tcounts), tcols


@torch.library.custom_op("kandinsky_kernels::block_mask_transpose", mutates_args=())
def _transpose_op(ptr: torch.Tensor, cols: torch.Tensor, num_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    op = _ext.cpp_op("bsa_mask_transpose") if ptr.device.type == "cpu" else None
    if op is not None:
        tptr, tcols = op(ptr.contiguous(), cols.contiguous(), num_kv_blocks)
    else:
        tptr, tcols = _transpose_torch(ptr, cols, num_kv_blocks)
    if not torch.compiler.is_compiling():
        mark_mask_checked(tptr, tcols)
    return tptr, tcols


@_transpose_op.register_fake
def _(ptr, cols, num_kv_blocks):
    bm, hm, n1 = ptr.shape
    return ptr.new_empty((bm, hm, num_kv_blocks + 1)), cols.new_empty(cols.shape, dtype=_ids_dtype(n1 - 1))


def _transpose_csr(ptr: torch.Tensor, cols: torch.Tensor, num_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_ptr int64 (Bm, Hm, Nk + 1), q_cols (nnz,)): the mask seen from the key side, query-block ids
    ascending in each row. A custom op (C++ counting sort on the CPU, torch ops elsewhere)."""
    return _transpose_op(ptr, cols, num_kv_blocks)


class BlockSparseMask:
    """A block-sparse attention mask in compressed rows (see the module docstring for the layout).

    ``BlockSparseMask(kv_num_blocks, kv_indices, block_size=64, seq_len_q=None, seq_len_kv=None,
    token_valid=None)`` takes the FlexAttention-style dense table (``kv_num_blocks`` int32 (B, H, Nq),
    ``kv_indices`` int32 (B, H, Nq, Nk), each row's first ``kv_num_blocks`` entries active, any order,
    the rest never read) and compresses it; :meth:`from_csr` takes compressed rows as they are;
    :meth:`from_dense_blocks` a bool block mask; :meth:`from_flex_block_mask` a FlexAttention
    ``BlockMask``. B and H of the mask may be 1 (broadcast over the attention's batch and heads).
    """

    kv_ptr: torch.Tensor
    kv_cols: torch.Tensor
    block_size: int
    seq_len_q: int
    seq_len_kv: int
    token_valid: torch.Tensor | None

    def __init__(
        self,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        block_size: int = 64,
        seq_len_q: int | None = None,
        seq_len_kv: int | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> None:
        check_tensor("kv_num_blocks", kv_num_blocks, ndim=3, dtypes=(torch.int32,))
        check_tensor("kv_indices", kv_indices, ndim=4, dtypes=(torch.int32,))
        if kv_indices.shape[:3] != kv_num_blocks.shape:
            raise ValueError(
                f"kv_indices shape {tuple(kv_indices.shape)} must start with kv_num_blocks shape "
                f"{tuple(kv_num_blocks.shape)} (B, H, Nq)"
            )
        if kv_indices.device != kv_num_blocks.device:
            raise ValueError(f"kv_indices on {kv_indices.device} but kv_num_blocks on {kv_num_blocks.device}")
        nk = kv_indices.shape[3]
        compiling = torch.compiler.is_compiling()
        if not compiling:  # data-dependent; the attention ops check the compressed rows again when run
            check_mask_contents(kv_num_blocks, kv_indices)
        active = torch.arange(nk, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
        ptr = _ptr_from_counts(kv_num_blocks.clamp(0, nk))
        cols = kv_indices[active].to(_ids_dtype(nk))
        if not compiling:
            mark_mask_checked(ptr, cols)
        self._init(ptr, cols, nk, block_size, seq_len_q, seq_len_kv, token_valid)

    @classmethod
    def from_csr(
        cls,
        kv_ptr: torch.Tensor,
        kv_cols: torch.Tensor,
        num_kv_blocks: int,
        block_size: int = 64,
        *,
        seq_len_q: int | None = None,
        seq_len_kv: int | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> "BlockSparseMask":
        """From compressed rows: ``kv_ptr`` int64 (B, H, Nq + 1), ``kv_cols`` int16 or int32 (nnz or more,)
        (layout in the module docstring), ``num_kv_blocks`` = Nk. The tensors are kept, not copied.
        Raises ValueError for a malformed mask (pointers not consecutive rows, an id outside [0, Nk),
        an id twice in a row)."""
        mask = cls.__new__(cls)
        mask._init(kv_ptr, kv_cols, num_kv_blocks, block_size, seq_len_q, seq_len_kv, token_valid)
        return mask

    def _init(self, ptr, cols, nk, block_size, seq_len_q, seq_len_kv, token_valid) -> None:  # noqa: C901
        check_tensor("kv_ptr", ptr, ndim=3, dtypes=(torch.int64,))
        check_tensor("kv_cols", cols, ndim=1, dtypes=(torch.int16, torch.int32))
        check_positive_int("block_size", block_size)
        if isinstance(nk, bool) or not isinstance(nk, int) or nk < 0:
            raise ValueError(f"num_kv_blocks must be an int >= 0, got {nk!r}")
        if ptr.shape[2] < 1:
            raise ValueError(f"kv_ptr must be (B, H, Nq + 1), got shape {tuple(ptr.shape)}")
        if cols.device != ptr.device:
            raise ValueError(f"kv_cols on {cols.device} but kv_ptr on {ptr.device}")
        if cols.dtype == torch.int16 and nk > _INT16_LIMIT:
            raise ValueError(f"kv_cols is int16 but Nk={nk} key blocks need int32 ids")
        self.kv_ptr, self.kv_cols, self._nk, self.block_size = ptr, cols, nk, block_size
        self._transposed: tuple[torch.Tensor, torch.Tensor] | None = None
        if not torch.compiler.is_compiling():  # data-dependent; the attention ops check again when run
            check_csr_contents(ptr, cols, nk)
        nq = ptr.shape[2] - 1
        self.seq_len_q = nq * block_size if seq_len_q is None else seq_len_q
        self.seq_len_kv = nk * block_size if seq_len_kv is None else seq_len_kv
        for name, s, n in (("seq_len_q", self.seq_len_q, nq), ("seq_len_kv", self.seq_len_kv, nk)):
            if s != n * block_size:
                raise ValueError(f"{name}={s} does not equal {n} blocks x block_size {block_size}")
        self.token_valid = None
        if token_valid is not None:
            tv = token_valid
            check_tensor("token_valid", tv, ndim=(1, 2), dtypes=(torch.bool,))
            if tv.dim() == 1:
                tv = tv.unsqueeze(0)
            b = ptr.shape[0]
            # A mask shared by the batch (B = 1) may still carry per-sample padding.
            if tv.shape[-1] != self.seq_len_kv or (b != 1 and tv.shape[0] not in (1, b)):
                raise ValueError(
                    f"token_valid shape {tuple(token_valid.shape)} must be (S,) or (B, S) with "
                    f"B={b} (or any B when the mask's B is 1), S={self.seq_len_kv}"
                )
            if tv.device != ptr.device:
                raise ValueError(f"token_valid on {tv.device} but the mask is on {ptr.device}")
            self.token_valid = tv.expand(max(b, tv.shape[0]), -1)

    # ----------------------------------------------------------------------------------- shape facts
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Nq, Nk)."""
        b, h, n1 = self.kv_ptr.shape
        return (b, h, n1 - 1, self._nk)

    @property
    def num_q_blocks(self) -> int:
        return self.kv_ptr.shape[2] - 1

    @property
    def num_kv_blocks(self) -> int:
        return self._nk

    @property
    def nnz(self) -> int:
        """Active (query block, key block) pairs over all batches and heads of the mask (the last row
        pointer; a host sync on a GPU)."""
        return int(_nnz_of(self.kv_ptr))

    @property
    def device(self) -> torch.device:
        return self.kv_ptr.device

    @property
    def nbytes(self) -> int:
        """Bytes the mask holds (row pointers and ids, unused capacity included; a cached transpose and
        token_valid excluded)."""
        return self.kv_ptr.nbytes + self.kv_cols.nbytes

    @property
    def kv_num_blocks(self) -> torch.Tensor:
        """int32 (B, H, Nq): active key blocks of each query block (FlexAttention's ``kv_num_blocks``)."""
        return _row_counts(self.kv_ptr).to(torch.int32)

    @property
    def kv_indices(self) -> torch.Tensor:
        """int32 (B, H, Nq, Nk): FlexAttention's ``kv_indices`` table, active ids first, then the
        inactive ones, each ascending. Materialised on each access, O(Nq * Nk) memory: for interop."""
        counts, indices = _compact(self.to_dense_blocks())
        mark_mask_checked(counts, indices)
        return indices

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs that are computed, over all batches and heads
        (0.0 for a mask with no pairs)."""
        b, h, nq, nk = self.shape
        pairs = b * h * nq * nk
        return self.nnz / pairs if pairs else 0.0

    def validate(self) -> "BlockSparseMask":
        """Check the contents again (consecutive row pointers, ids in [0, Nk), none twice in a row),
        e.g. after changing the tensors in place; raises ValueError. The constructors and the attention
        ops do this already."""
        check_csr_contents(self.kv_ptr, self.kv_cols, self._nk, force=True)
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
        ptr, cols = _csr_from_dense(mask)
        return cls.from_csr(ptr, cols, mask.shape[-1], block_size, token_valid=token_valid)

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
        return _dense_from_csr(self.kv_ptr, self.kv_cols, self._nk)

    def to_dense_tokens(self) -> torch.Tensor:
        """Bool (B, H, S_q, S_kv) token-level mask (blocks expanded, pad keys removed). For tests."""
        bs = self.block_size
        dense = self.to_dense_blocks().repeat_interleave(bs, -2).repeat_interleave(bs, -1)
        if self.token_valid is not None:
            dense = dense & self.token_valid[:, None, None, :]
        return dense

    def transpose_csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed rows of the transpose, ``(q_ptr int64 (B, H, Nk + 1), q_cols (nnz,))``: row
        ``j`` lists the query blocks that attend to key block ``j``, ascending. Built once by a kernel
        (a counting sort on the CPU) and cached on the mask; what a backward that accumulates dK/dV
        per key block walks."""
        if self._transposed is None:
            self._transposed = _transpose_csr(self.kv_ptr, self.kv_cols, self._nk)
        return self._transposed

    def transpose(self, *, token_valid: torch.Tensor | None = None) -> "BlockSparseMask":
        """The same pattern seen from the key side: row ``j`` lists the query blocks that attend to key
        block ``j`` (ascending), a mask (B, H, Nk, Nq). ``token_valid`` is not carried over (it
        describes keys); pass ``token_valid=`` (bool (S_q,) or (B, S_q)) for the new keys, the
        original queries. Built from the cached :meth:`transpose_csr`.
        """
        tptr, tcols = self.transpose_csr()
        return BlockSparseMask.from_csr(tptr, tcols, self.num_q_blocks, self.block_size,
                                        seq_len_q=self.seq_len_kv, seq_len_kv=self.seq_len_q,
                                        token_valid=token_valid)

    def with_dense_keys(self, num_tokens: int, *, where: str = "after") -> "BlockSparseMask":
        """This mask with a key part every query attends to: ``num_tokens`` keys (text tokens, say,
        as in joint text + video attention) placed ``"after"`` or ``"before"`` the mask's keys, in
        ceil(num_tokens / block_size) key blocks active in every row; the pad keys that fill the last
        block are marked invalid in ``token_valid``. The attention's k and v must hold the keys in the
        same order, the dense part padded to whole blocks (its pad values are never read).

        Returns a mask (B, H, Nq, Nk + ceil(num_tokens / block_size)); the existing ``token_valid``
        (or all-valid) is extended over the new keys. Built in compressed rows (no dense table).
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        if where not in ("after", "before"):
            raise ValueError(f"where must be 'after' or 'before', got {where!r}")
        bs, dev = self.block_size, self.device
        nd = -(-num_tokens // bs)
        b, h, nq, nk = self.shape
        nk_new = nk + nd
        counts = _row_counts(self.kv_ptr).reshape(-1)
        rows = counts.numel()
        ptr = _ptr_from_counts((counts + nd).reshape(b, h, nq))
        starts = ptr[..., :-1].reshape(-1)  # each row's first slot in the new ids
        dtype = _ids_dtype(nk_new)
        old = self.kv_cols.numel()  # nnz, or more (capacity): sizes stay known before running
        cap = old + rows * nd
        cols = torch.zeros(cap + 1, dtype=dtype, device=dev)  # + a slot the old capacity goes to
        old_rows = _entry_rows(self.kv_ptr, old)
        rank = torch.arange(old, device=dev) - self.kv_ptr[..., :-1].reshape(-1)[old_rows]
        used = _used(self.kv_ptr, self.kv_cols)
        dense_slot = torch.arange(nd, device=dev)
        if where == "after":  # the row's own ids, then the dense blocks nk .. nk + nd - 1
            cols[torch.where(used, starts[old_rows] + rank, cap)] = self.kv_cols.to(dtype)
            at = (starts + counts)[:, None] + dense_slot
            cols[at.reshape(-1)] = (nk + dense_slot).to(dtype).repeat(rows)
        else:  # the dense blocks 0 .. nd - 1, then the row's own ids shifted by nd
            cols[torch.where(used, starts[old_rows] + nd + rank, cap)] = (self.kv_cols.to(torch.int64) + nd).to(dtype)
            at = starts[:, None] + dense_slot
            cols[at.reshape(-1)] = dense_slot.to(dtype).repeat(rows)
        cols = cols[:cap]
        if not torch.compiler.is_compiling():
            mark_mask_checked(ptr, cols)
        tv = self.token_valid
        if tv is None:
            tv = torch.ones(1, self.seq_len_kv, dtype=torch.bool, device=dev)
        dense_tv = (torch.arange(nd * bs, device=dev) < num_tokens).expand(tv.shape[0], -1)
        tvs = [tv, dense_tv] if where == "after" else [dense_tv, tv]
        return BlockSparseMask.from_csr(ptr, cols, nk_new, bs, token_valid=torch.cat(tvs, -1))

    def to(self, device: torch.device | str) -> "BlockSparseMask":
        tv = None if self.token_valid is None else self.token_valid.to(device)
        ptr, cols = self.kv_ptr.to(device), self.kv_cols.to(device)
        if ptr is not self.kv_ptr or cols is not self.kv_cols:
            check_csr_contents(self.kv_ptr, self.kv_cols, self._nk)  # a no-op for a checked mask
            mark_mask_checked(ptr, cols)
        return BlockSparseMask.from_csr(ptr, cols, self._nk, self.block_size, seq_len_q=self.seq_len_q,
                                        seq_len_kv=self.seq_len_kv, token_valid=tv)

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
