"""nabla_block_mask on every backend against the official sort-based reference.

Comparison rule. The masks must be equal element for element, and the compact form must be exactly
the compaction of the dense mask. The kernels reproduce the reference's rule bit for bit (stable order,
double-accumulated prefix rounded to fp32, compared with fp32(1 - thr)), but their block probabilities
can differ from torch's in the last bit (another summation order or exp). That can change a decision
only in a row where the reference's own prefix sum lies within rounding of 1 - thr, or where the last
dropped and the first kept probability are equal up to rounding (they may swap). Such rows, and only
those, may differ, and only rarely (`_assert_matches_reference`); in the CPU runs of this file none
occur (they do appear at ~1 row in 2,000 for 1,000 near-uniform blocks). Adversarial inputs are built
from exactly representable values, so pooling and logits are exact on every backend and tied blocks
tie exactly.
"""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, assert_exact, backend_and_device

from kandinsky_kernels import BlockSparseMask, _ext, nabla_block_mask, sta_block_mask, use_backend
from kandinsky_kernels.reference.nabla import (
    block_map_ref,
    nabla_block_mask_ref,
    nabla_official,
    per_video_ref,
    pool_blocks_ref,
)

AMBIGUOUS_ABS = 1e-5  # |reference prefix - (1 - thr)| below which a decision may legitimately flip
AMBIGUOUS_REL = 1e-6  # relative gap below which the boundary pair of probabilities may swap


@pytest.fixture(params=["reference", "cpu", "triton"])
def backend(request):
    """(backend name, device) for every backend that can run here."""
    return backend_and_device(request, "nabla_block_mask")


def _run(backend, q, k, thr, sta=None, block_size=64, token_valid=None) -> BlockSparseMask:
    name, device = backend

    def move(t):
        return None if t is None else t.to(device)

    with use_backend(name):
        out = nabla_block_mask(move(q), move(k), thr, move(sta), block_size, token_valid=move(token_valid))
    return out.to("cpu")


def _assert_matches_reference(out, q, k, thr, sta=None, block_size=64, token_valid=None):
    ref = nabla_block_mask_ref(q, k, thr, sta, block_size, token_valid)
    dense = out.to_dense_blocks()
    diff_rows = (dense != ref).any(-1)
    if diff_rows.any():
        qp = pool_blocks_ref(q, block_size, token_valid)
        vals = block_map_ref(qp, pool_blocks_ref(k, block_size, token_valid)).sort(dim=-1, stable=True).values
        near_threshold = (vals.double().cumsum(-1) - (1.0 - thr)).abs().amin(-1) <= AMBIGUOUS_ABS
        first_kept = (vals.cumsum(-1) < 1 - thr).sum(-1, keepdim=True)
        hi = vals.gather(-1, first_kept.clamp(max=vals.shape[-1] - 1))
        lo = vals.gather(-1, (first_kept - 1).clamp(min=0))
        inside = (first_kept > 0) & (first_kept < vals.shape[-1])
        near_tie = (inside & (hi - lo <= AMBIGUOUS_REL * hi)).squeeze(-1)
        clear = diff_rows & ~near_threshold & ~near_tie
        where = clear.nonzero()[:3].tolist()
        assert not clear.any(), f"{int(clear.sum())} rows differ beyond rounding, first {where}"
        rare = diff_rows.sum() <= max(1, diff_rows.numel() // 100)
        assert rare, f"{int(diff_rows.sum())} rows differ (rounding-level, but too many)"
    expected = BlockSparseMask.from_dense_blocks(dense, block_size)
    assert_exact(out.kv_ptr, expected.kv_ptr, "kv_ptr")  # the compressed rows themselves
    assert_exact(out.kv_cols.long(), expected.kv_cols.long(), "kv_cols")
    assert_exact(out.kv_indices, expected.kv_indices, "kv_indices")
    return ref


def _assert_minimal_top_set(out, q, k, thr, block_size=64, token_valid=None):
    """Independent check in fp64: the kept set is a top set, holds >= thr of the mass, and is minimal."""
    qp = pool_blocks_ref(q.double(), block_size, token_valid)
    kp = pool_blocks_ref(k.double(), block_size, token_valid)
    p = torch.softmax(qp @ kp.transpose(-1, -2) / qp.shape[-1] ** 0.5, -1)
    kept = out.to_dense_blocks()
    assert kept.any(-1).all(), "every row keeps at least one block"
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    min_kept = torch.where(kept, p, inf).amin(-1)
    max_dropped = torch.where(kept, -inf, p).amax(-1)
    mass = torch.where(kept, p, 0.0).sum(-1)
    tol = 1e-5
    assert (min_kept >= max_dropped - tol).all(), "kept blocks must be the most probable ones"
    assert (mass >= thr - tol).all(), f"kept mass {mass.min().item()} below threshold {thr}"
    assert (mass - min_kept <= thr + tol).all(), "kept set is not minimal"


def _qk(b, n, h, d, dtype, scale=1.0, block_size=64):
    q = (torch.randn(b, n * block_size, h, d) * scale).to(dtype)
    k = (torch.randn(b, n * block_size, h, d) * scale).to(dtype)
    return q, k


# ------------------------------------------------------------------------------------ random inputs
_SHAPES = [  # (blocks, head dim, dtype, block size)
    (1, 16, torch.float32, 64),
    (3, 64, torch.bfloat16, 64),
    (7, 128, torch.float16, 16),
    (13, 64, torch.float32, 16),
]
_THR_SCALES = [(0.05, 1), (0.5, 4), (0.9, 16), (1.0, 1), (0.9, 1), (0.5, 16)]


def _random_cases():
    for i, shape in enumerate(_SHAPES):
        for j, (thr, scale) in enumerate(_THR_SCALES):
            for name in ("reference", "cpu", "triton"):
                # The Triton interpreter is slow: on CPU it runs a third of the grid (every shape and
                # every (thr, scale) pair still appear).
                if name == "triton" and not HAS_CUDA and (i + j) % 3:
                    continue
                n, d, dtype, _ = shape
                case_id = f"{name}-n{n}-d{d}-{str(dtype)[6:]}-thr{thr}-x{scale}"
                yield pytest.param(name, *shape, thr, scale, id=case_id)


@pytest.mark.parametrize(
    "backend, n, d, dtype, block_size, thr, scale", list(_random_cases()), indirect=["backend"]
)
def test_random_matches_reference(backend, n, d, dtype, block_size, thr, scale):
    q, k = _qk(2, n, 3, d, dtype, scale, block_size)
    out = _run(backend, q, k, thr, block_size=block_size)
    _assert_matches_reference(out, q, k, thr, block_size=block_size)
    _assert_minimal_top_set(out, q, k, thr, block_size)
    if thr == 1.0:
        assert (out.kv_num_blocks == n).all()


def test_matches_official_pipeline(backend):
    """The compact form equals the official pipeline's (stable argsort) on (B, H, S, D) views."""
    q, k = _qk(1, 12, 2, 64, torch.bfloat16, 4)
    sta = sta_block_mask(3, 2, 2, (3, 1, 1))
    out = _run(backend, q, k, 0.7, sta)
    counts, indices = nabla_official(q.transpose(1, 2), k.transpose(1, 2), 0.7, sta)
    assert_exact(out.kv_num_blocks, counts, "kv_num_blocks")
    assert_exact(out.kv_indices, indices, "kv_indices")


def test_sta_union(backend):
    q, k = _qk(2, 18, 3, 16, torch.float32, 4)
    sta = sta_block_mask(2, 3, 3, (1, 3, 1))
    out = _run(backend, q, k, 0.5, sta)
    ref = _assert_matches_reference(out, q, k, 0.5, sta)
    assert (out.to_dense_blocks() | ~sta).all(), "the STA blocks are always kept"
    assert not torch.equal(ref, sta.expand_as(ref)), "the CDF part adds blocks beyond the window"


def test_noncontiguous_inputs(backend):
    """q, k given as (B, S, H, D) views of (B, H, S, D) storage, as the official model holds them."""
    q, k = _qk(2, 5, 3, 16, torch.float32, 4)
    qv, kv = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    out = _run(backend, qv, kv, 0.8)
    _assert_matches_reference(out, q, k, 0.8)


def test_inputs_requiring_grad(backend):
    """The mask is integer data: inputs that require grad are fine and nothing is recorded."""
    q, k = _qk(1, 4, 2, 16, torch.float32, 1, 16)
    out = _run(backend, q.requires_grad_(), k.requires_grad_(), 0.5, block_size=16)
    assert not out.kv_num_blocks.requires_grad and not out.kv_indices.requires_grad
    _assert_matches_reference(out, q.detach(), k.detach(), 0.5, block_size=16)


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("batched", [False, True])
def test_token_valid(backend, batched):
    n, bs = 6, 16
    q, k = _qk(2, n, 3, 16, torch.bfloat16, 4, bs)
    valid = torch.rand(2 if batched else 1, n * bs) > 0.4
    valid[:, ::bs] = True  # no fully padded block here
    valid = valid if batched else valid[0]
    out = _run(backend, q, k, 0.6, block_size=bs, token_valid=valid)
    _assert_matches_reference(out, q, k, 0.6, block_size=bs, token_valid=valid)
    _assert_minimal_top_set(out, q, k, 0.6, bs, valid)
    assert torch.equal(out.token_valid, valid.expand(2, -1))
    # The padding really is left out of the pooling.
    unmasked = nabla_block_mask_ref(q, k, 0.6, block_size=bs)
    assert not torch.equal(out.to_dense_blocks(), unmasked)


def test_fully_padded_block_pools_to_zero(backend):
    """A block without real tokens pools to the zero vector: its query row is uniform, its key logit 0."""
    n, bs = 5, 16
    q, k = _qk(1, n, 2, 16, torch.float32, 4, bs)
    valid = torch.ones(n * bs, dtype=torch.bool)
    valid[2 * bs : 3 * bs] = False
    out = _run(backend, q, k, 0.5, block_size=bs, token_valid=valid)
    _assert_matches_reference(out, q, k, 0.5, block_size=bs, token_valid=valid)
    # Uniform row 2: the stable order drops the lowest indices first, so the top indices are kept.
    assert out.to_dense_blocks()[0, :, 2].tolist() == [[False, False, True, True, True]] * 2


# ---------------------------------------------------------------------------------- adversarial rows
def _blocks(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, N, H, D) per-block constant vectors -> (B, N*block_size, H, D) tokens (pooling is exact)."""
    return values.repeat_interleave(block_size, dim=1)


@pytest.mark.parametrize("thr", [0.05, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n", [1, 7, 10])
def test_uniform_rows(backend, thr, n):
    """q = 0: every row is exactly uniform, all entries tie; the highest block ids are kept."""
    q = torch.zeros(1, n * 16, 2, 16)
    k = torch.randn(1, n * 16, 2, 16)
    out = _run(backend, q, k, thr, block_size=16)
    _assert_matches_reference(out, q, k, thr, block_size=16)
    dense = out.to_dense_blocks()
    count = out.kv_num_blocks[0, 0, 0].item()
    assert (out.kv_num_blocks == count).all()
    assert dense[..., n - count :].all() and not dense[..., : n - count].any()
    assert count >= thr * n - 1e-6 and (count - 1) < thr * n + 1e-6


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("d", [16, 64])
def test_tied_probabilities(backend, thr, d):
    """Key blocks copy three prototypes, every value exactly representable: rows of three tie groups."""
    n, h = 13, 3
    protos = torch.randint(-2, 3, (3, h, d)).float() / 4
    k = _blocks(protos[torch.arange(n) % 3].expand(2, n, h, d), 16)
    q = _blocks((torch.randint(-2, 3, (2, n, h, d)).float() / 4), 16)
    out = _run(backend, q, k, thr, block_size=16)
    _assert_matches_reference(out, q, k, thr, block_size=16)
    _assert_minimal_top_set(out, q, k, thr, 16)


@pytest.mark.parametrize(
    "levels, thr", [((0.0, 2.0), 0.5), ((-1.0, 0.25, 3.0), 0.9), ((0.5, 1.0, 2.0, 4.0), 0.3), ((1.0,), 0.7)]
)
def test_discrete_logits(backend, levels, thr):
    """One-hot key blocks make query values the logits: rows of a few levels with random multiplicities."""
    n, h, bs = 23, 3, 4
    values = torch.tensor(levels)
    q = _blocks(values[torch.randint(len(levels), (2, n, h, n))], bs)
    k = _blocks(torch.eye(n)[None, :, None, :].expand(2, n, h, n), bs)
    out = _run(backend, q, k, thr, block_size=bs)
    _assert_matches_reference(out, q, k, thr, block_size=bs)
    _assert_minimal_top_set(out, q, k, thr, bs)


@pytest.mark.parametrize("thr", [1e-6, 0.05, 0.9, 0.999, 1.0])
def test_one_dominant_block(backend, thr):
    """Key block 4 aligned with every query: it holds nearly all the mass and is the only block kept."""
    n, d = 9, 16
    q = _blocks(torch.ones(1, n, 2, d), 16)
    kv = torch.randint(-1, 2, (1, n, 2, d)).float() / 8
    kv[:, 4] = 4.0  # logit 16 against at most 0.5 elsewhere: mass 1 - 2e-6
    k = _blocks(kv, 16)
    out = _run(backend, q, k, thr, block_size=16)
    _assert_matches_reference(out, q, k, thr, block_size=16)
    expected = n if thr == 1.0 else 1
    assert (out.kv_num_blocks == expected).all()
    assert (out.kv_indices[..., 0] == (0 if thr == 1.0 else 4)).all()


@pytest.mark.parametrize("thr", [1e-3, 0.5])
def test_underflowing_probabilities(backend, thr):
    """Huge logits: most probabilities underflow to exactly 0 (a large tie group at the bottom)."""
    q, k = _qk(2, 11, 2, 16, torch.float32, 64, 16)
    out = _run(backend, q, k, thr, block_size=16)
    _assert_matches_reference(out, q, k, thr, block_size=16)
    _assert_minimal_top_set(out, q, k, thr, 16)


# ---------------------------------------------------------------------------------------- bad input
def _bad_inputs():
    q = torch.randn(1, 128, 2, 16)
    sta = torch.ones(2, 2, dtype=torch.bool)
    return [
        ((q[0], q, 0.5), {}, "q must have 4 dims"),
        ((q, q[..., :8], 0.5), {}, r"same shape \(B, S, H, D\), got \(1, 128, 2, 16\) and \(1, 128, 2, 8\)"),
        ((q, q.half(), 0.5), {}, "same dtype"),
        ((q.int(), q.int(), 0.5), {}, "q must have dtype in"),
        ((q, q.to("meta"), 0.5), {}, "one device"),
        ((q[:, :100], q[:, :100], 0.5), {}, "S=100 .* not a multiple of block_size=64"),
        ((q, q, 0.0), {}, r"threshold must be a number in \(0, 1\], got 0.0"),
        ((q, q, 1.5), {}, r"threshold must be a number in \(0, 1\], got 1.5"),
        ((q, q, float("nan")), {}, "threshold must be a number"),
        ((q, q, True), {}, "threshold must be a number"),
        ((q, q, 0.5, sta.int()), {}, "sta must have dtype in"),
        ((q, q, 0.5, sta[:1]), {}, r"sta must have shape \(Nq, Nk\) = \(2, 2\) .*got \(1, 2\)"),
        ((q, q, 0.5, None, 0), {}, "block_size must be a positive int"),
        ((q, q, 0.5), {"token_valid": torch.ones(127, dtype=torch.bool)}, r"token_valid must have shape"),
        ((q, q, 0.5), {"token_valid": torch.ones(128)}, "token_valid must have dtype in"),
    ]


@pytest.mark.parametrize("args, kwargs, match", _bad_inputs())
def test_value_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        nabla_block_mask(*args, **kwargs)


@pytest.mark.skipif(_ext.cpp_op("nabla_block_mask") is None, reason="compiled op not available")
def test_cpp_op_value_errors():
    op = _ext.cpp_op("nabla_block_mask")
    q = torch.randn(1, 128, 2, 16)
    with pytest.raises(ValueError, match="same shape"):
        op(q, q[..., :8], 0.5, None, 64, None)
    with pytest.raises(ValueError, match="multiple of block_size"):
        op(q, q, 0.5, None, 48, None)
    with pytest.raises(ValueError, match="threshold must lie in"):
        op(q, q, 0.0, None, 64, None)
    with pytest.raises(ValueError, match="sta must be a bool"):
        op(q, q, 0.5, torch.ones(3, 3, dtype=torch.bool), 64, None)
    with pytest.raises(ValueError, match="token_valid must be a bool"):
        op(q, q, 0.5, None, 64, torch.ones(1, 64, dtype=torch.bool))


# -------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph():
    q, k = _qk(1, 4, 2, 16, torch.float32, 4, 16)
    sta = sta_block_mask(2, 2, 1, (1, 1, 1))

    def fn(q, k):
        mask = nabla_block_mask(q, k, 0.7, sta, 16)
        return mask.kv_num_blocks, mask.kv_indices

    counts, indices = torch.compile(fn, fullgraph=True, dynamic=False)(q, k)
    eager = nabla_block_mask(q, k, 0.7, sta, 16)
    assert_exact(counts, eager.kv_num_blocks, "kv_num_blocks")
    assert_exact(indices, eager.kv_indices, "kv_indices")


# ------------------------------------------------------------------------------------ packed videos
def _cu(block_counts, block_size):
    return torch.tensor([0, *torch.tensor(block_counts).cumsum(0).tolist()], dtype=torch.int32) * block_size


def _per_video_oracle(q, k, thr, sta, block_size, token_valid, cu):
    """Each video alone through the plain reference (no cu_seqlens), placed on the block diagonal."""
    def one(qv, kv, sta_v, valid_v, first_block):
        return nabla_block_mask_ref(qv, kv, thr, sta_v, block_size, valid_v)

    return per_video_ref(one, q, k, sta, block_size, token_valid, cu)


@pytest.mark.parametrize("thr", [0.9, 1.0])
@pytest.mark.parametrize("with_sta", [False, True], ids=["no-sta", "sta"])
@pytest.mark.parametrize("with_valid", [False, True], ids=["dense", "token-valid"])
@pytest.mark.parametrize(
    "videos, tail",
    [([6], 0), ([2, 5], 1), ([1, 4, 3], 2), ([3, 1, 5, 2], 0), ([2, 0, 3], 3)],
    ids=["1-video", "2-videos-tail", "3-videos-tail", "4-videos", "empty-video-tail"],
)
def test_cu_seqlens_equals_videos_alone(backend, videos, tail, with_valid, with_sta, thr):
    """Every backend equals each video computed alone, on the block diagonal, exactly."""
    bs = 16
    n = sum(videos) + tail
    cu = _cu(videos, bs)
    q, k = _qk(1, n, 2, 16, torch.float32, 4, bs)
    valid = None
    if with_valid:
        valid = torch.rand(n * bs) > 0.3
        valid[::bs] = True
    # A window three blocks wide spans every video boundary (and the tail): the AND must remove it there.
    sta = sta_block_mask(n, 1, 1, (3, 1, 1)) if with_sta else None
    name, device = backend
    with use_backend(name):
        out = nabla_block_mask(q.to(device), k.to(device), thr, None if sta is None else sta.to(device), bs,
                               token_valid=None if valid is None else valid.to(device),
                               cu_seqlens=cu.to(device)).to("cpu")
    want = _per_video_oracle(q, k, thr, sta, bs, valid, cu)
    dense = out.to_dense_blocks()
    assert_exact(dense, want, "dense mask")
    expected = BlockSparseMask.from_dense_blocks(want, bs)
    assert_exact(out.kv_num_blocks, expected.kv_num_blocks, "kv_num_blocks")
    assert_exact(out.kv_indices, expected.kv_indices, "kv_indices")
    # Spelled out: nothing across videos, nothing for the blocks past the end.
    seg = torch.full((n,), -1)
    for i, (lo, hi) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        seg[lo // bs : hi // bs] = i
    cross = (seg[:, None] != seg[None, :]) | (seg[:, None] < 0)
    assert not (dense & cross).any(), "a block pair across videos is active"
    assert (out.kv_num_blocks[..., seg < 0] == 0).all(), "query blocks past the end must have no block"
    if valid is not None:
        assert torch.equal(out.token_valid, valid.expand(1, -1))


def test_cu_seqlens_one_video_of_everything_is_unchanged(backend):
    """cu_seqlens = [0, S] gives exactly the mask without cu_seqlens."""
    bs, n = 16, 7
    q, k = _qk(1, n, 2, 16, torch.float32, 4, bs)
    sta = sta_block_mask(n, 1, 1, (3, 1, 1))
    packed = _run_cu(backend, q, k, 0.8, sta, bs, torch.tensor([0, n * bs], dtype=torch.int32))
    plain = _run(backend, q, k, 0.8, sta, bs)
    assert_exact(packed.kv_num_blocks, plain.kv_num_blocks, "kv_num_blocks")
    assert_exact(packed.kv_indices, plain.kv_indices, "kv_indices")


def test_cu_seqlens_ignores_tokens_past_the_end(backend):
    """NaN past cu_seqlens[-1] belongs to no video: no error, and the same mask as finite values there."""
    bs = 16
    q, k = _qk(1, 6, 2, 16, torch.float32, 4, bs)
    cu = _cu([2, 2], bs)
    clean = _run_cu(backend, q, k, 0.7, None, bs, cu)
    q[:, 4 * bs :] = float("nan")
    k[:, 4 * bs + 3] = float("inf")
    dirty = _run_cu(backend, q, k, 0.7, None, bs, cu)
    assert_exact(dirty.kv_indices, clean.kv_indices, "kv_indices")
    assert_exact(dirty.kv_num_blocks, clean.kv_num_blocks, "kv_num_blocks")
    q[:, 5] = float("nan")  # inside video 0: its rows have no meaning, as without cu_seqlens
    with pytest.raises(ValueError, match="finite block logits"):
        _run_cu(backend, q, k, 0.7, None, bs, cu)


def _run_cu(backend, q, k, thr, sta, block_size, cu, compiled=False) -> BlockSparseMask:
    name, device = backend

    def move(t):
        return None if t is None else t.to(device)

    fn = nabla_block_mask
    if compiled:
        torch._dynamo.reset()  # the backend is fixed per compiled graph
        fn = torch.compile(nabla_block_mask)
    with use_backend(name):
        out = fn(move(q), move(k), thr, move(sta), block_size, cu_seqlens=move(cu))
    return out.to("cpu")


_BAD_CU = [  # S = 96 = 6 blocks of 16
    ([0, 24, 96], r"cu_seqlens\[1\]=24 is not a multiple of block_size=16"),
    ([0, 32, 88], r"cu_seqlens\[2\]=88 is not a multiple of block_size=16"),
    ([0, 64, 32], "non-decreasing"),
    ([0, 32, 112], "end <= S=96"),
    ([16, 32], "start at 0"),
]


_BAD_CU_IDS = ["misaligned", "misaligned-end", "decreasing", "past-S", "not-at-0"]
_BAD_CU_CASES = [pytest.param(*case, False, id=f"{i}-eager") for case, i in zip(_BAD_CU, _BAD_CU_IDS)] + [
    pytest.param(*case, True, id=f"{i}-compiled")  # compiling is slow: the three kinds of error
    for case, i in zip(_BAD_CU, _BAD_CU_IDS)
    if i in ("misaligned", "decreasing", "past-S")
]


@pytest.mark.parametrize("offsets, match, compiled", _BAD_CU_CASES)
def test_cu_seqlens_value_errors(backend, offsets, match, compiled):
    """Misaligned, decreasing, past-S offsets raise on every backend, eagerly and under torch.compile
    (inside the custom op for cpu and triton, where a compiled graph cannot skip the check)."""
    q, k = _qk(1, 6, 2, 16, torch.float32, 1, 16)
    with pytest.raises(ValueError, match=match):
        _run_cu(backend, q, k, 0.9, None, 16, torch.tensor(offsets, dtype=torch.int32), compiled)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q: (q, torch.tensor([0, 64])), "cu_seqlens must have dtype in"),
        (lambda q: (q, torch.tensor([[0, 64]], dtype=torch.int32)), "cu_seqlens must have 1 dims"),
        (lambda q: (q, torch.tensor([0], dtype=torch.int32)), "at least 2 offsets"),
        (lambda q: (q.expand(2, -1, -1, -1), torch.tensor([0, 64], dtype=torch.int32)), "needs B == 1"),
        (lambda q: (q, torch.tensor([0, 64], dtype=torch.int32, device="meta")), "one device"),
    ],
    ids=["int64", "2d", "one-offset", "batch-2", "device"],
)
def test_cu_seqlens_shape_errors(make, match):
    q, cu = make(torch.randn(1, 128, 2, 16))
    with pytest.raises(ValueError, match=match):
        nabla_block_mask(q, q, 0.9, None, 64, cu_seqlens=cu)


@pytest.mark.skipif(_ext.cpp_op("nabla_block_mask") is None, reason="compiled op not available")
def test_cpp_op_cu_seqlens_value_errors():
    """The C++ op checks every offset itself before using any."""
    op = _ext.cpp_op("nabla_block_mask")
    q = torch.randn(1, 128, 2, 16)
    for offsets, match in [
        ([0, 24, 128], r"cu_seqlens\[1\]=24 is not a multiple of block_size=16"),
        ([0, 64, 32], "non-decreasing"),
        ([0, 144], "end <= S=128"),
        ([16, 32], "start at 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            op(q, q, 0.5, None, 16, None, torch.tensor(offsets, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        op(q, q, 0.5, None, 16, None, torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="B == 1"):
        op(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), 0.5, None, 16, None,
           torch.tensor([0, 64], dtype=torch.int32))


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("sta_window", [None, (3, 1, 1)], ids=["no-sta", "sta"])
def test_nabla_attention_cu_seqlens_equals_videos_alone(name, sta_window, request):
    """nabla_attention(cu_seqlens=...) equals each video run alone; tokens past the end give zeros.

    Videos are whole frames of a (T, 1, 2) block grid, so the STA window of the whole grid restricted to
    a video is that video's own window (sta_block_mask does not clamp at the borders)."""
    from conftest import assert_close_to_reference

    from kandinsky_kernels import nabla_attention
    from kandinsky_kernels.reference.attention import block_sparse_attention_reference

    if name == "cpu" and _ext.cpp_op("nabla_block_mask") is None:
        pytest.skip(f"compiled nabla_block_mask not available ({_ext.EXT_ERROR})")
    device = request.getfixturevalue("triton_device") if name == "triton" else "cpu"
    frames, tail, per_frame = [2, 3], 1, 2  # blocks of 64 tokens
    t = sum(frames) + tail
    s = t * per_frame * 64
    cu = _cu([f * per_frame for f in frames], 64)
    q, k, v = (torch.randn(1, s, 2, 16) * 2 for _ in range(3))
    grid = (t, 8, 8 * per_frame)  # tokens: blocks (t, 1, per_frame)
    with use_backend(name):
        out, mask = nabla_attention(q.to(device), k.to(device), v.to(device), 0.8, sta_window, grid=grid,
                                    return_mask=True, cu_seqlens=cu.to(device))
    out, mask = out.to("cpu"), mask.to("cpu")
    sta = None if sta_window is None else sta_block_mask(t, 1, per_frame, sta_window)
    assert_exact(mask.to_dense_blocks(), _per_video_oracle(q, k, 0.8, sta, 64, None, cu), "mask")
    offsets = cu.tolist()
    for i, (start, end) in enumerate(zip(offsets, offsets[1:])):
        qi, ki, vi = (x[:, start:end] for x in (q, k, v))
        sta_i = None if sta_window is None else sta_block_mask(frames[i], 1, per_frame, sta_window)
        mask_i = BlockSparseMask.from_dense_blocks(nabla_block_mask_ref(qi, ki, 0.8, sta_i, 64), 64)
        ref = block_sparse_attention_reference(qi.double(), ki.double(), vi.double(), mask_i)
        t_out = block_sparse_attention_reference(qi, ki, vi, mask_i, upcast=False)
        assert_close_to_reference(out[:, start:end], ref, t_out, name=f"video {i}")
    assert (out[:, offsets[-1] :] == 0).all(), "tokens past the end must give zeros"


# ------------------------------------------------------------------- the caller's grid, in tokens
def _padded_qkv(grid=(2, 12, 20), h=2, d=16):
    """q, k, v (1, S, h, d) of a fractal sequence of the token grid ``grid`` and its FractalLayout."""
    from kandinsky_kernels import FractalLayout

    layout = FractalLayout(*grid)
    q, k, v = (torch.randn(1, layout.seq_len, h, d) * 2 for _ in range(3))
    return q, k, v, layout


@pytest.mark.parametrize("how", ["tuple", "layout"])
def test_nabla_attention_token_grid_never_attends_padding(backend, how):
    """A grid whose H and W are not multiples of 8, given in tokens: at threshold 1 (every block kept)
    the output equals dense attention over the real keys only (before: the tuple was read in tiles,
    and grid=None or a tile tuple attended the pad keys, 0.10 relative error)."""
    from conftest import assert_close_to_reference

    from kandinsky_kernels import nabla_attention
    from kandinsky_kernels.reference.attention import block_sparse_attention_reference

    name, device = backend
    q, k, v, layout = _padded_qkv()
    grid = layout if how == "layout" else (2, 12, 20)
    with use_backend(name):
        out, mask = nabla_attention(q.to(device), k.to(device), v.to(device), 1.0, None, grid=grid,
                                    return_mask=True)
    out, mask = out.to("cpu"), mask.to("cpu")
    assert torch.equal(mask.token_valid[0], layout.token_valid())
    n = layout.num_blocks
    dense = BlockSparseMask.from_dense_blocks(torch.ones(n, n, dtype=torch.bool),
                                              token_valid=layout.token_valid())
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), dense)
    assert_close_to_reference(out, ref, block_sparse_attention_reference(q, k, v, dense, upcast=False))


def test_nabla_attention_token_grid_with_sta_window():
    """The STA window is laid on the blocks of the token grid (its tile grid), padding masked."""
    from kandinsky_kernels import block_sparse_attention, nabla_attention

    q, k, v, layout = _padded_qkv((3, 12, 20))
    out, mask = nabla_attention(q, k, v, 0.5, (1, 1, 1), grid=(3, 12, 20), return_mask=True)
    sta = sta_block_mask(*layout.tile_grid, (1, 1, 1))
    expect = nabla_block_mask(q, k, 0.5, sta, token_valid=layout.token_valid())
    assert_exact(mask.to_dense_blocks(), expect.to_dense_blocks(), "mask")
    assert torch.equal(out, block_sparse_attention(q, k, v, expect))


@pytest.mark.parametrize(
    "grid, match",
    [
        ((2, 2, 3), r"grid=\(2, 2, 3\) is read as the token grid \(T, H, W\).*fits S as \(T, h_tiles, "
                    r"w_tiles\) in 8x8-token tiles, which grid no longer takes.*\(T, 16, 24\)"),
        ((2, 12, 25), r"grid=\(2, 12, 25\) is read as the token grid \(T, H, W\), padded to 8x8 tiles: "
                      r"T\*Hp\*Wp = 2\*16\*32 = 1024 tokens, but q has S=768"),
        ((2, 12), "grid must be the token grid"),
    ],
)
def test_nabla_attention_refuses_grids_that_do_not_fit(grid, match):
    from kandinsky_kernels import nabla_attention

    q, k, v, _ = _padded_qkv()
    with pytest.raises(ValueError, match=match):
        nabla_attention(q, k, v, 0.9, None, grid=grid)


def test_nabla_attention_grid_none_needs_token_valid():
    """grid=None cannot tell padding from q: refused unless token_valid says which keys are real."""
    from kandinsky_kernels import nabla_attention

    q, k, v, layout = _padded_qkv()
    with pytest.raises(ValueError, match="grid=None and no token_valid, so it cannot tell padding"):
        nabla_attention(q, k, v, 0.9, None)
    with pytest.raises(ValueError, match="needs grid"):
        nabla_attention(q, k, v, 0.9, (3, 3, 3), token_valid=layout.token_valid())
    out = nabla_attention(q, k, v, 0.9, None, token_valid=layout.token_valid())
    assert torch.equal(out, nabla_attention(q, k, v, 0.9, None, grid=layout))
    # token_valid with a grid: AND-ed with the grid's padding
    drop = layout.token_valid().clone()
    drop[:64] = False
    out, mask = nabla_attention(q, k, v, 0.9, None, grid=(2, 12, 20), token_valid=drop, return_mask=True)
    assert torch.equal(mask.token_valid[0], drop & layout.token_valid())


def test_nabla_block_mask_takes_the_token_grid():
    q, k, _, layout = _padded_qkv()
    by_grid = nabla_block_mask(q, k, 0.7, grid=(2, 12, 20))
    by_valid = nabla_block_mask(q, k, 0.7, token_valid=layout.token_valid())
    assert_exact(by_grid.kv_indices, by_valid.kv_indices, "kv_indices")
    assert torch.equal(by_grid.token_valid, by_valid.token_valid)
    assert nabla_block_mask(q, k, 0.7, grid=layout).token_valid is not None
    with pytest.raises(ValueError, match="which grid no longer takes"):
        nabla_block_mask(q, k, 0.7, grid=layout.tile_grid)
    with pytest.raises(ValueError, match=r"grid has tile 8 \(64-token blocks\) but block_size is 16"):
        nabla_block_mask(q, k, 0.7, None, 16, grid=layout)
    # A tuple is read with tile sqrt(block_size): 16-token blocks are 4x4 tiles.
    from kandinsky_kernels import FractalLayout

    small = FractalLayout(2, 6, 10, tile=4)
    qs, ks = q[:, :small.seq_len], k[:, :small.seq_len]
    by_grid = nabla_block_mask(qs, ks, 0.7, None, 16, grid=(2, 6, 10))
    assert torch.equal(by_grid.token_valid[0], small.token_valid())
    with pytest.raises(ValueError, match="block_size = tile \\* tile"):
        nabla_block_mask(q, k, 0.7, None, 32, grid=(2, 12, 20))
    with pytest.raises(ValueError, match=r"token_valid must have shape \(S,\) or \(B, S\) with S=768"):
        nabla_block_mask(q, k, 0.7, grid=(2, 12, 20), token_valid=torch.ones(5, dtype=torch.bool))


# ------------------------------------------------------------------ errors in the caller's terms
def test_bhsd_input_gets_a_layout_hint():
    """(B, H, S, D) passed where (B, S, H, D) is expected: the error says so and how to fix it."""
    from kandinsky_kernels import block_sparse_attention, nabla_attention

    x = torch.randn(1, 4, 4096, 64)
    hint = r"q has shape \(B, S, H, D\) = \(1, 4, 4096, 64\): S=4 is not a multiple of block_size=64"
    with pytest.raises(ValueError, match=hint + r"; did you pass \(B, H, S, D\)\? use q.transpose\(1, 2\)"):
        nabla_block_mask(x, x, 0.9)
    mask = BlockSparseMask.from_dense_blocks(torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"S=4 is not a multiple of the mask block_size=64; did you pass "
                                         r"\(B, H, S, D\)\? use q.transpose\(1, 2\)"):
        block_sparse_attention(x, x, x, mask)
    with pytest.raises(ValueError, match=r"q looks like \(B, H, S, D\) = \(1, 4, 4096, 64\).*"
                                         r"use q.transpose\(1, 2\)"):
        nabla_attention(x, x, x, 0.9, None, grid=(1, 64, 64))


def test_sta_shape_error_names_the_grid_units():
    q, k, _, layout = _padded_qkv()
    token_grid_sta = sta_block_mask(2, 12, 20, (3, 3, 3))  # the token grid, passed as tiles
    with pytest.raises(ValueError, match=r"sta must have shape \(Nq, Nk\) = \(12, 12\).*got \(480, 480\).*"
                                         r"block grid in tiles \(FractalLayout.tile_grid"):
        nabla_block_mask(q, k, 0.9, token_grid_sta)
    with pytest.raises(ValueError, match="per-batch or per-head STA mask is not supported"):
        nabla_block_mask(q, k, 0.9, sta_block_mask(*layout.tile_grid).expand(2, 1, 12, 12))


@pytest.mark.parametrize("lead", [(), (1,), (1, 1)], ids=["NN", "1NN", "11NN"])
def test_broadcast_sta_mask(backend, lead):
    """A (1, 1, N, N) (or (1, N, N)) STA mask is OR-ed into every (b, h), like an (N, N) one."""
    q, k = _qk(2, 6, 2, 16, torch.float32, 4, 16)
    sta = sta_block_mask(2, 3, 1, (1, 1, 1))
    out = _run(backend, q, k, 0.3, sta.reshape(*lead, 6, 6), 16)
    ref = nabla_block_mask_ref(q, k, 0.3, sta, 16)
    assert_exact(out.to_dense_blocks(), ref, "mask")


# ------------------------------------------------------------------------ one graph for every grid
def test_nabla_attention_compiles_once_for_all_grids():
    """torch.compile(dynamic=True): padded and unpadded grids of any size share one graph (the padding
    check used to guard on H % 8 and recompile)."""
    import torch._dynamo.testing

    from kandinsky_kernels import nabla_attention

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")

    def fn(q, k, v, grid):
        return nabla_attention(q, k, v, 0.9, (3, 3, 3), grid=grid)

    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    # Padded and unpadded, in either order; every tile count >= 2 (torch specialises sizes of 1).
    for grid in [(2, 12, 20), (2, 16, 24), (3, 20, 12), (2, 24, 16)]:
        q, k, v, _ = _padded_qkv(grid)
        assert_exact(compiled(q, k, v, grid), fn(q, k, v, grid), f"grid {grid}")
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 4 grids"
    layout_counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    by_layout = torch.compile(fn, backend=layout_counter, dynamic=True, fullgraph=True)
    for grid in [(2, 16, 16), (3, 12, 20)]:
        q, k, v, layout = _padded_qkv(grid)
        assert_exact(by_layout(q, k, v, layout), fn(q, k, v, layout), f"layout {grid}")
    assert layout_counter.frame_count == 1


# ------------------------------------------------------------------ NABLA attention, mask recomputed
def _fused_vs_two_step(backend, q, k, v, thr, sta, bs, token_valid=None, cu=None, fwd_backend=None):
    """Outputs and gradients of the recomputing path and of nabla_block_mask + block_sparse_attention."""
    from kandinsky_kernels import block_sparse_attention
    from kandinsky_kernels.ops.nabla import _nabla_sparse_attention

    name, device = backend
    q, k, v = (t.to(device) for t in (q, k, v))
    sta, token_valid, cu = (None if t is None else t.to(device) for t in (sta, token_valid, cu))
    dout = torch.randn_like(q)
    res = []
    for fused in (True, False):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with use_backend(fwd_backend or name):
            if fused:
                out = _nabla_sparse_attention(*x, thr, sta, bs, token_valid, cu)
            else:
                mask = nabla_block_mask(x[0], x[1], thr, sta, bs, token_valid=token_valid, cu_seqlens=cu)
                out = block_sparse_attention(*x, mask, cu_seqlens=cu)
        # the backward outside the backend block: it must still use the forward's backend
        grads = torch.autograd.grad(out, x, dout)
        res.append((out.detach().cpu(), [g.cpu() for g in grads]))
    return res


@pytest.mark.parametrize("case", ["plain", "padded", "packed"])
def test_recomputing_nabla_attention_equals_the_two_steps(backend, case):
    q, k = _qk(1, 8, 2, 32, torch.float32, 2, 64)
    v = torch.randn_like(q)
    sta = sta_block_mask(2, 2, 2, (1, 1, 1))
    tv = cu = None
    if case == "padded":
        tv = torch.ones(1, q.shape[1], dtype=torch.bool)
        tv[:, 60:64] = False
    if case == "packed":
        cu = torch.tensor([0, 192, 448], dtype=torch.int32)
    (a, ga), (b, gb) = _fused_vs_two_step(backend, q, k, v, 0.7, sta, 64, tv, cu)
    assert_exact(a, b, "out")
    for x, y, n in zip(ga, gb, "qkv"):
        assert_exact(x, y, f"d{n}")


def test_recomputing_nabla_attention_keeps_no_mask_for_the_backward():
    """What autograd saves between forward and backward: q, k, v, out, lse and the small inputs; no
    compressed rows (int64 pointers of (B, H, N + 1), int16 ids)."""
    from kandinsky_kernels.ops.nabla import _nabla_sparse_attention

    q, k = (t.requires_grad_() for t in _qk(1, 8, 2, 32, torch.float32, 2, 64))
    v = torch.randn_like(q, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _nabla_sparse_attention(q, k, v, 0.7)
    n = q.shape[1] // 64
    assert saved and not [t for t in saved if t.dtype == torch.int16 or t.shape[-1:] == (n + 1,)]
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_recomputing_nabla_attention_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    from kandinsky_kernels.ops.nabla import _nabla_sparse_attention

    q, k = _qk(1, 8, 2, 32, torch.float32, 2, 64)
    v = torch.randn_like(q)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda q, k, v: _nabla_sparse_attention(q, k, v, 0.7), backend="aot_eager",
                       fullgraph=True)
    out = fn(*x)
    grads = torch.autograd.grad(out.square().sum(), x)
    y = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = _nabla_sparse_attention(*y, 0.7)
    ref_grads = torch.autograd.grad(ref.square().sum(), y)
    assert_exact(out, ref, "out")
    for a, b, n in zip(grads, ref_grads, "qkv"):
        assert_exact(a, b, f"d{n}")
    assert not counters["graph_break"]


def test_public_nabla_attention_recomputes_unless_the_mask_is_returned(monkeypatch):
    from kandinsky_kernels.ops import nabla as nabla_mod

    calls = []
    real = nabla_mod._nabla_sparse_attention
    monkeypatch.setattr(nabla_mod, "_nabla_sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k = _qk(1, 4, 2, 32, torch.float32, 2, 64)
    v = torch.randn_like(q)
    from kandinsky_kernels import nabla_attention

    out = nabla_attention(q, k, v, 0.7, grid=(4, 8, 8))
    out2, mask = nabla_attention(q, k, v, 0.7, grid=(4, 8, 8), return_mask=True)
    assert calls == [1]
    assert_exact(out, out2, "out with and without return_mask")
