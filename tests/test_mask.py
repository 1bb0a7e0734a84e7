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
    # The same contents written into a valid mask after construction: validate() finds them.
    m = BlockSparseMask.from_dense_blocks(torch.ones(2, 2, dtype=torch.bool))
    m.kv_num_blocks.copy_(counts)
    m.kv_indices.copy_(indices)
    with pytest.raises(ValueError, match=match):
        m.validate()


def test_inactive_tail_may_hold_anything():
    m = BlockSparseMask(torch.tensor([[[1, 0]]], dtype=torch.int32),
                        torch.tensor([[[[1, 1], [-5, 99]]]], dtype=torch.int32))
    assert m.to_dense_blocks().tolist() == [[[[False, True], [False, False]]]]
    assert m.density == 0.25


def test_checked_mask_is_checked_again_after_in_place_change():
    from kandinsky_kernels._validation import check_mask_contents

    m = BlockSparseMask.from_dense_blocks(torch.ones(1, 2, 2, dtype=torch.bool))
    check_mask_contents(m.kv_num_blocks, m.kv_indices)  # marked: a no-op
    m.kv_indices[0, 0, 0, 1] = 0
    with pytest.raises(ValueError, match="repeats"):
        check_mask_contents(m.kv_num_blocks, m.kv_indices)
    # Other counts paired with checked indices are checked too.
    m2 = BlockSparseMask.from_dense_blocks(torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_num_blocks must lie"):
        check_mask_contents(torch.full_like(m2.kv_num_blocks, 3), m2.kv_indices)


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
