"""BlockSparseMask: compact form, conversions, validation, and its FlexAttention BlockMask."""
import pytest
import torch
from conftest import assert_close_to_reference, assert_exact

from kandinsky_kernels import BlockSparseMask
from kandinsky_kernels.reference.attention import block_sparse_attention_reference


def _random_dense(shape, density, gen=None):
    return torch.rand(shape, generator=gen) < density


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 3, 5), (2, 3, 7, 7), (1, 2, 13, 4)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_dense_round_trip_and_compact_order(shape, density):
    dense = _random_dense(shape, density)
    m = BlockSparseMask.from_dense_blocks(dense, block_size=16)
    m.validate()
    assert_exact(m.to_dense_blocks(), dense)
    assert_exact(m.kv_num_blocks, dense.sum(-1).to(torch.int32), "kv_num_blocks")
    # Active ids first, ascending; then inactive ids, ascending.
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape[:3]]).tolist():
        row, n, ind = dense[tuple(idx)], int(m.kv_num_blocks[tuple(idx)]), m.kv_indices[tuple(idx)]
        assert ind[:n].tolist() == row.nonzero().flatten().tolist()
        assert ind[n:].tolist() == (~row).nonzero().flatten().tolist()
    assert m.density == pytest.approx(dense.float().mean().item())


def test_lower_rank_masks_broadcast_to_4d():
    dense = _random_dense((5, 6), 0.5)
    m = BlockSparseMask.from_dense_blocks(dense, 64)
    assert m.shape == (1, 1, 5, 6)
    assert m.seq_len_q == 5 * 64 and m.seq_len_kv == 6 * 64
    assert BlockSparseMask.from_dense_blocks(dense[None], 64).shape == (1, 1, 5, 6)


def test_transpose():
    dense = _random_dense((2, 3, 5, 9), 0.4)
    m = BlockSparseMask.from_dense_blocks(dense, 32)
    t = m.transpose().validate()
    assert t.shape == (2, 3, 9, 5)
    assert_exact(t.to_dense_blocks(), dense.transpose(-1, -2))
    assert (t.seq_len_q, t.seq_len_kv) == (9 * 32, 5 * 32)
    assert_exact(t.transpose().to_dense_blocks(), dense)
    valid = torch.ones(5 * 32, dtype=torch.bool)
    valid[-3:] = False
    assert torch.equal(m.transpose(token_valid=valid).token_valid, valid.expand(2, -1))


def test_token_valid_expands_and_masks_tokens():
    dense = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    valid = torch.ones(8, dtype=torch.bool)
    valid[3] = False
    m = BlockSparseMask.from_dense_blocks(dense, 4, token_valid=valid)
    assert m.token_valid.shape == (2, 8)
    tok = m.to_dense_tokens()
    assert tok.shape == (2, 1, 8, 8)
    assert not tok[..., 3].any() and tok[..., 2].all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_num_blocks=torch.zeros(1, 1, 2), kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.int32)),
         "kv_num_blocks must have dtype"),
        (dict(kv_num_blocks=torch.zeros(1, 2, dtype=torch.int32),
              kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.int32)), "kv_num_blocks must have 3 dims"),
        (dict(kv_num_blocks=torch.zeros(1, 1, 3, dtype=torch.int32),
              kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.int32)), "must start with kv_num_blocks"),
        (dict(kv_num_blocks=torch.zeros(1, 1, 2, dtype=torch.int32),
              kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.int32), block_size=0), "block_size"),
        (dict(kv_num_blocks=torch.zeros(1, 1, 2, dtype=torch.int32),
              kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.int32), block_size=4, seq_len_q=9),
         "seq_len_q=9"),
        (dict(kv_num_blocks=torch.zeros(1, 1, 2, dtype=torch.int32),
              kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.int32), block_size=4,
              token_valid=torch.ones(7, dtype=torch.bool)), "token_valid shape"),
    ],
)
def test_constructor_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseMask(**kwargs)


@pytest.mark.parametrize(
    "counts, indices, match",
    [
        ([[[3, 3]]], [[[[0, 1], [0, 1]]]], "kv_num_blocks must lie"),
        ([[[-1, 0]]], [[[[0, 1], [0, 1]]]], "kv_num_blocks must lie"),
        ([[[1, 1]]], [[[[2, 0], [0, 1]]]], "kv_indices must lie"),
        ([[[1, 1]]], [[[[0, 1], [-1, 0]]]], "kv_indices must lie"),
        ([[[2, 1]]], [[[[1, 1], [0, 1]]]], "repeats key block 1"),
    ],
)
def test_constructor_and_validate_reject_bad_content(counts, indices, match):
    counts = torch.tensor(counts, dtype=torch.int32)
    indices = torch.tensor(indices, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        BlockSparseMask(counts, indices)


def test_inactive_tail_may_hold_anything():
    m = BlockSparseMask(torch.tensor([[[1, 0]]], dtype=torch.int32),
                        torch.tensor([[[[1, 1], [-5, 99]]]], dtype=torch.int32))
    assert m.to_dense_blocks().tolist() == [[[[False, True], [False, False]]]]
    assert m.density == 0.25


def test_checked_mask_is_checked_again_after_in_place_change():
    from kandinsky_kernels._validation import check_csr_contents, check_mask_contents

    m = BlockSparseMask.from_dense_blocks(torch.ones(1, 2, 2, dtype=torch.bool))
    check_csr_contents(m.kv_ptr, m.kv_cols, 2)  # marked: a no-op
    m.kv_cols[1] = 0
    with pytest.raises(ValueError, match="appears twice"):
        check_csr_contents(m.kv_ptr, m.kv_cols, 2)
    with pytest.raises(ValueError, match="appears twice"):
        m.validate()
    # Other row pointers paired with checked ids are checked too.
    m2 = BlockSparseMask.from_dense_blocks(torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="row pointers"):
        check_csr_contents(m2.kv_ptr + 1, m2.kv_cols, 2)
    # The FlexAttention-style table check, used by the table constructor.
    counts, indices = m2.kv_num_blocks, m2.kv_indices
    check_mask_contents(counts, indices)
    indices[0, 0, 0, 1] = 0
    with pytest.raises(ValueError, match="repeats"):
        check_mask_contents(counts, indices)


# --------------------------------------------------------------------------- compressed rows
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 3, 5), (2, 3, 7, 7), (1, 2, 13, 4), (0, 2, 3, 3)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compressed_rows_layout(shape, density):
    """ptr / cols are CSR over (B, H, Nq) rows in order, ids ascending: written out by hand."""
    dense = _random_dense(shape, density, torch.Generator().manual_seed(1))
    m = BlockSparseMask.from_dense_blocks(dense)
    b, h, nq, nk = shape
    ptr, cols, at = [], [], 0
    for bi in range(b):
        for hi in range(h):
            head = []
            for i in range(nq):
                head.append(at)
                ids = dense[bi, hi, i].nonzero()[:, 0].tolist()
                cols += ids
                at += len(ids)
            ptr.append(head + [at])
    assert m.kv_ptr.dtype == torch.int64 and m.kv_cols.dtype == torch.int16
    assert m.kv_ptr.reshape(-1).tolist() == [x for head in ptr for x in head]
    assert m.kv_cols.tolist() == cols
    assert m.nnz == int(dense.sum()) and m.shape == shape
    assert m.nbytes == m.kv_ptr.nbytes + m.kv_cols.nbytes
    back = BlockSparseMask.from_csr(m.kv_ptr, m.kv_cols, nk)
    assert_exact(back.to_dense_blocks(), dense, "from_csr round trip")


def test_table_constructor_keeps_the_callers_order_and_compresses():
    counts = torch.tensor([[[2, 1]]], dtype=torch.int32)
    indices = torch.tensor([[[[1, 0], [0, 77]]]], dtype=torch.int32)  # row 0 lists 1 before 0
    m = BlockSparseMask(counts, indices)
    assert m.kv_ptr.tolist() == [[[0, 2, 3]]] and m.kv_cols.tolist() == [1, 0, 0]
    assert_exact(m.kv_num_blocks, counts, "kv_num_blocks")
    assert m.kv_indices.tolist() == [[[[0, 1], [0, 1]]]]  # the table: active ascending, then the rest


def test_int32_ids_beyond_int16():
    nk = 40000  # more key blocks than int16 ids can name
    dense = torch.zeros(1, 1, 2, nk, dtype=torch.bool)
    dense[0, 0, 0, [0, 39999]] = True
    dense[0, 0, 1, 35000] = True
    m = BlockSparseMask.from_dense_blocks(dense, 16)
    assert m.kv_cols.dtype == torch.int32 and m.kv_cols.tolist() == [0, 39999, 35000]
    t = m.transpose()
    assert t.kv_cols.dtype == torch.int16 and t.nnz == 3  # query-block ids (2 blocks) fit int16
    assert t.kv_ptr[0, 0, 35000:35002].tolist() == [1, 2]
    with pytest.raises(ValueError, match="int32 ids"):
        BlockSparseMask.from_csr(m.kv_ptr, m.kv_cols.to(torch.int16), nk, 16)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p, c: (p.flip(-1).contiguous(), c), "row pointers"),
        (lambda p, c: (p + 1, c), "row pointers"),
        (lambda p, c: (p, c[:-1].clone()), "row pointers"),
        (lambda p, c: (p, c.clone().fill_(9)), "block ids must lie in"),
        (lambda p, c: (p, c.to(torch.float32)), "kv_cols must have dtype"),
        (lambda p, c: (p.to(torch.int32), c), "kv_ptr must have dtype"),
        (lambda p, c: (p[0], c), "kv_ptr must have 3 dims"),
    ],
)
def test_from_csr_rejects_malformed(corrupt, match):
    m = BlockSparseMask.from_dense_blocks(torch.eye(3, dtype=torch.bool) | torch.eye(3, dtype=torch.bool).roll(1, 0))
    ptr, cols = corrupt(m.kv_ptr, m.kv_cols)
    with pytest.raises(ValueError, match=match):
        BlockSparseMask.from_csr(ptr, cols, 3)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("shape", [(1, 1, 5, 3), (2, 3, 9, 11), (1, 2, 1, 1), (1, 1, 4, 4)])
def test_transpose_kernels_match_dense(backend, shape):
    """Both transpose builders (C++ counting sort, torch sort) equal the dense transpose, ids ascending."""
    from kandinsky_kernels import _ext
    from kandinsky_kernels.mask import _transpose_torch

    dense = _random_dense(shape, 0.4, torch.Generator().manual_seed(3))
    m = BlockSparseMask.from_dense_blocks(dense)
    if backend == "cpp":
        op = _ext.cpp_op("bsa_mask_transpose")
        if op is None:
            pytest.skip("the C++ extension is not built")
        tptr, tcols = op(m.kv_ptr, m.kv_cols, shape[-1])
    else:
        tptr, tcols = _transpose_torch(m.kv_ptr, m.kv_cols, shape[-1])
    want = BlockSparseMask.from_dense_blocks(dense.transpose(-1, -2).contiguous())
    assert_exact(tptr, want.kv_ptr, "q_ptr")
    assert_exact(tcols.long(), want.kv_cols.long(), "q_cols")


def test_transpose_is_cached_on_the_mask():
    m = BlockSparseMask.from_dense_blocks(_random_dense((1, 2, 6, 6), 0.5, torch.Generator().manual_seed(4)))
    first = m.transpose_csr()
    assert m.transpose_csr() is first
    assert_exact(m.transpose().transpose().to_dense_blocks(), m.to_dense_blocks(), "double transpose")


def test_cpp_transpose_rejects_malformed():
    from kandinsky_kernels import _ext

    op = _ext.cpp_op("bsa_mask_transpose")
    if op is None:
        pytest.skip("the C++ extension is not built")
    m = BlockSparseMask.from_dense_blocks(torch.ones(1, 2, 3, 3, dtype=torch.bool))
    bad = m.kv_cols.clone()
    bad[4] = 3
    with pytest.raises(ValueError, match="block ids must lie in"):
        op(m.kv_ptr, bad, 3)
    ptr = m.kv_ptr.clone()
    ptr[0, 1, 0] += 1  # the second head does not start where the first ended
    with pytest.raises(ValueError, match="row pointers"):
        op(ptr.view_as(m.kv_ptr), m.kv_cols, 3)


@pytest.mark.parametrize("where", ["after", "before"])
def test_with_dense_keys_in_compressed_rows(where):
    dense = _random_dense((2, 2, 5, 3), 0.4, torch.Generator().manual_seed(5))
    m = BlockSparseMask.from_dense_blocks(dense, 16)
    j = m.with_dense_keys(20, where=where)  # 2 dense blocks of 16, the last half padding
    ones = torch.ones(2, 2, 5, 2, dtype=torch.bool)
    want = torch.cat([dense, ones] if where == "after" else [ones, dense], -1)
    assert_exact(j.to_dense_blocks(), want, "blocks")
    assert j.kv_cols.dtype == torch.int16
    j.validate()  # ids ascending or not, the rows are well formed
    tv = j.token_valid[0].tolist()
    dense_tv = [True] * 20 + [False] * 12
    assert tv == ([True] * 48 + dense_tv if where == "after" else dense_tv + [True] * 48)


def test_mask_memory_at_pro_shape_is_a_fraction_of_the_dense_table():
    """Kandinsky 5 Pro: S = 93,696 (1,464 blocks of 64), H = 32, 10 % density. The mask with its
    transpose must take <= 15 % of the FlexAttention-style table (B, H, Nq, Nk) int32 + counts; a
    random 10 % pattern built straight into compressed rows (no dense (N, N) tensor here)."""
    n, h, density = 93_696 // 64, 32, 0.10
    g = torch.Generator().manual_seed(0)
    per_row = int(n * density)
    counts = torch.full((1, h, n), per_row, dtype=torch.int64)
    from kandinsky_kernels.mask import _ptr_from_counts

    ptr = _ptr_from_counts(counts)
    # per_row distinct ids a row: a random offset plus a fixed stride pattern, sorted
    base = torch.arange(per_row, dtype=torch.int64) * (n // per_row)
    shift = torch.randint(0, n // per_row, (h * n, 1), generator=g)
    cols = (base + shift).reshape(-1).to(torch.int16)
    m = BlockSparseMask.from_csr(ptr, cols, n, 64)
    tptr, tcols = m.transpose_csr()
    ours = m.nbytes + tptr.nbytes + tcols.nbytes
    dense_table = h * n * n * 4 + h * n * 4
    assert abs(m.density - density) < 0.001
    assert ours <= 0.15 * dense_table, (ours, dense_table)


@pytest.mark.parametrize("padded", [False, True])
def test_flex_block_mask_matches_dense_masked_sdpa(padded):
    from torch.nn.attention.flex_attention import flex_attention

    b, h, nb, bs, d = 1, 2, 5, 64, 32
    s = nb * bs
    dense = _random_dense((b, h, nb, nb), 0.35) | torch.eye(nb, dtype=torch.bool)
    valid = None
    if padded:
        valid = torch.ones(s, dtype=torch.bool)
        valid[bs - 7: bs] = False  # a partially padded block
        valid[3 * bs + 60:] = False
    m = BlockSparseMask.from_dense_blocks(dense, bs, token_valid=valid)
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))
    ref = block_sparse_attention_reference(q, k, v, m).float()
    # Flex takes (B, H, S, D).
    q32, k32, v32 = (x.float().transpose(1, 2) for x in (q, k, v))
    out = torch.compile(flex_attention, dynamic=False)(q32, k32, v32, block_mask=m.to_flex_block_mask())
    assert_close_to_reference(out.transpose(1, 2), ref)


def test_batch_shared_mask_keeps_per_sample_padding():
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 6:] = False
    m = BlockSparseMask.from_dense_blocks(torch.ones(2, 2, dtype=torch.bool), 4, token_valid=valid)
    assert m.shape[0] == 1 and m.token_valid.shape == (2, 8)
    tok = m.to_dense_tokens()
    assert tok.shape == (2, 1, 8, 8)
    assert tok[0].all() and not tok[1, ..., 6:].any()
    with pytest.raises(ValueError, match="token_valid shape"):
        BlockSparseMask.from_dense_blocks(torch.ones(3, 1, 2, 2, dtype=torch.bool), 4, token_valid=valid)


def test_density_is_a_property():
    m = BlockSparseMask.from_dense_blocks(torch.eye(4, dtype=torch.bool), 16)
    assert isinstance(type(m).density, property)
    assert m.density == 0.25
    assert "density=0.250" in repr(m)


# -------------------------------------------------------------------------- grids in tokens
def test_from_dense_blocks_takes_the_token_grid():
    """grid=(T, H, W) in tokens (or a FractalLayout) marks the padding keys itself, AND-ed with
    token_valid; a tuple in tile units is refused with an explanation."""
    from kandinsky_kernels import FractalLayout

    layout = FractalLayout(2, 12, 20)
    n = layout.num_blocks
    dense = _random_dense((n, n), 0.5) | torch.eye(n, dtype=torch.bool)
    for grid in [(2, 12, 20), layout]:
        m = BlockSparseMask.from_dense_blocks(dense, grid=grid)
        assert torch.equal(m.token_valid[0], layout.token_valid())
        assert_exact(m.to_dense_blocks()[0, 0], dense)
    extra = torch.ones(layout.seq_len, dtype=torch.bool)
    extra[:5] = False
    m = BlockSparseMask.from_dense_blocks(dense, token_valid=extra, grid=(2, 12, 20))
    assert torch.equal(m.token_valid[0], extra & layout.token_valid())
    assert BlockSparseMask.from_dense_blocks(dense[:4, :4], grid=(1, 16, 16)).token_valid is None
    with pytest.raises(ValueError, match=r"\(T, h_tiles, w_tiles\) in 8x8-token tiles, which grid no longer"):
        BlockSparseMask.from_dense_blocks(dense, grid=layout.tile_grid)
    with pytest.raises(ValueError, match="block_size = tile \\* tile"):
        BlockSparseMask.from_dense_blocks(dense, 48, grid=(2, 12, 20))


# ------------------------------------------------------------------------------- Flex interop
# Full blocks cannot express padding (to_flex_block_mask refuses that pair).
@pytest.mark.parametrize("padded, full_blocks", [(False, False), (False, True), (True, False)],
                         ids=["partial", "full", "padded-partial"])
def test_flex_block_mask_round_trip(padded, full_blocks):
    dense = _random_dense((2, 3, 6, 6), 0.4)
    valid = None
    if padded:
        valid = torch.ones(2, 6 * 32, dtype=torch.bool)
        valid[1, 100:] = False
    m = BlockSparseMask.from_dense_blocks(dense, 32, token_valid=valid)
    back = BlockSparseMask.from_flex_block_mask(m.to_flex_block_mask(full_blocks=full_blocks))
    assert back.block_size == 32 and back.shape == m.shape
    assert_exact(back.kv_num_blocks, m.kv_num_blocks, "kv_num_blocks")
    assert_exact(back.kv_indices, m.kv_indices, "kv_indices")
    assert (back.token_valid is None) == (valid is None)
    if padded:
        assert torch.equal(back.token_valid, m.token_valid)


def test_from_flex_block_mask_partial_and_full_blocks_and_foreign_mask_mod():
    from torch.nn.attention.flex_attention import BlockMask

    num = torch.tensor([[[1, 1, 0]]], dtype=torch.int32)
    idx = torch.tensor([[[[2, 0, 1], [0, 1, 2], [0, 1, 2]]]], dtype=torch.int32)
    full_num = torch.tensor([[[1, 0, 2]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[0, 1, 2], [0, 1, 2], [1, 2, 0]]]], dtype=torch.int32)
    expect = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    foreign = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=16, mask_mod=causal)
    with pytest.raises(ValueError, match="partial blocks with a mask_mod"):
        BlockSparseMask.from_flex_block_mask(foreign)
    m = BlockSparseMask.from_flex_block_mask(foreign, partial_blocks_as_full=True)
    assert_exact(m.to_dense_blocks()[0, 0], expect)
    only_full = BlockMask.from_kv_blocks(torch.zeros_like(num), idx, full_num, full_idx, BLOCK_SIZE=16,
                                         mask_mod=causal)
    assert_exact(BlockSparseMask.from_flex_block_mask(only_full).to_dense_blocks()[0, 0],
                 torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="one block size for queries and keys"):
        BlockSparseMask.from_flex_block_mask(
            BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(16, 32), seq_lengths=(48, 96)))
    with pytest.raises(ValueError, match="must be a flex_attention BlockMask"):
        BlockSparseMask.from_flex_block_mask(expect)


def test_unused_capacity_past_the_last_pointer_is_ignored_everywhere():
    """What a compiled graph carries: ids past nnz (here garbage) are never read by the conversions,
    the transpose (C++ and torch), validation or the attention backends, forward and backward."""
    from kandinsky_kernels import _ext, block_sparse_attention
    from kandinsky_kernels.backends import available_backends, use_backend
    from kandinsky_kernels.mask import _transpose_torch

    dense = _random_dense((1, 2, 4, 4), 0.5, torch.Generator().manual_seed(6)) | torch.eye(4, dtype=torch.bool)
    exact = BlockSparseMask.from_dense_blocks(dense, 16)
    cols = torch.cat([exact.kv_cols, torch.full((11,), 3, dtype=exact.kv_cols.dtype)])  # 3 repeats: garbage
    padded = BlockSparseMask.from_csr(exact.kv_ptr, cols, 4, 16)
    assert padded.nnz == exact.nnz and padded.nbytes > exact.nbytes
    assert_exact(padded.to_dense_blocks(), dense, "to_dense_blocks")
    assert_exact(padded.kv_indices, exact.kv_indices, "kv_indices")
    assert_exact(padded.with_dense_keys(20).to_dense_blocks(), exact.with_dense_keys(20).to_dense_blocks(),
                 "with_dense_keys")
    for name, (tptr, tcols) in {"torch": _transpose_torch(padded.kv_ptr, padded.kv_cols, 4),
                                "mask": padded.transpose_csr()}.items():
        want_ptr, want_cols = exact.transpose_csr()
        assert tcols.numel() == cols.numel(), name
        assert_exact(tptr, want_ptr, f"{name} q_ptr")
        assert_exact(tcols[:exact.nnz].long(), want_cols.long(), f"{name} q_cols")
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    impl = {"cpu": _ext.cpp_op("bsa_fwd") is not None, "triton": False}
    for backend in available_backends("block_sparse_attention", "cpu", impl):
        with use_backend(backend):
            a = block_sparse_attention(q, k, v, exact)
            ga = torch.autograd.grad(a.sum(), (q, k, v))
            b = block_sparse_attention(q, k, v, padded)
            gb = torch.autograd.grad(b.sum(), (q, k, v))
        assert_exact(b, a, f"{backend} out")
        for x, y, n in zip(gb, ga, "qkv"):
            assert_exact(x, y, f"{backend} d{n}")
