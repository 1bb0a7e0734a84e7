"""fractal_flatten / fractal_unflatten / FractalLayout against the reference, on every backend.

The op is a permutation, so every comparison is exact (``assert_exact``), gradients included.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_exact

from kandinsky_kernels import FractalLayout, _ext, fractal_flatten, fractal_unflatten
from kandinsky_kernels.backends import use_backend
from kandinsky_kernels.ops import fractal as fractal_ops
from kandinsky_kernels.reference.fractal import fractal_flatten_ref, fractal_unflatten_ref

HAS_CPP = fractal_ops._CPP["fractal_flatten"] is not None
NO_CPP = f"no fractal ops in the compiled extension ({_ext.EXT_ERROR or 'built without csrc/fractal.cpp'})"

# (T, H, W): T=1, H and W in {1, 3, 7, 8, 9, 16, 17, 23}, aligned and padded, square and not.
GRIDS = [(1, 1, 1), (1, 3, 7), (1, 8, 8), (2, 9, 16), (1, 17, 23), (3, 7, 9), (2, 16, 17), (1, 23, 3),
         (2, 8, 1)]
# Trailing dims (at least one): one channel (1, 3, 64), and a RoPE table (D/2, 2, 2).
RESTS = [(1,), (3,), (64,), (4, 2, 2)]


@pytest.fixture(params=["reference", "cpu", "triton"])
def device(request):
    """Forces one backend for the test and yields the device its tensors live on."""
    if request.param == "cpu" and not HAS_CPP:
        pytest.skip(NO_CPP)
    dev = request.getfixturevalue("triton_device") if request.param == "triton" else "cpu"
    with use_backend(request.param):
        yield dev


def _grid_tensor(grid, rest, device, dtype=torch.float32, batch=2):
    return torch.randn(batch, *grid, *rest, device=device).to(dtype)


@pytest.mark.parametrize("rest", RESTS, ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_matches_reference_and_round_trips(device, grid, rest):
    x = _grid_tensor(grid, rest, device)
    y, layout = fractal_flatten(x, return_layout=True)
    assert layout == FractalLayout(*grid)
    assert_exact(y, fractal_flatten_ref(x), "flatten")
    assert_exact(fractal_unflatten(y, grid), x, "round trip")
    # unflatten must ignore whatever sits at padding positions
    y_any = torch.randn_like(y)
    assert_exact(fractal_unflatten(y_any, layout), fractal_unflatten_ref(y_any, *grid), "unflatten")


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool, torch.complex64],
    ids=str,
)
def test_dtypes(device, dtype):
    grid = (2, 9, 17)
    x = _grid_tensor(grid, (3,), device, dtype)
    y = fractal_flatten(x)
    assert_exact(y, fractal_flatten_ref(x))
    assert_exact(fractal_unflatten(y, grid), x)


@pytest.mark.parametrize("tile", [1, 3, 4, 16])
def test_other_tiles(device, tile):
    grid = (2, 9, 17)
    x = _grid_tensor(grid, (2,), device)
    y = fractal_flatten(x, tile)
    assert_exact(y, fractal_flatten_ref(x, tile))
    assert_exact(fractal_unflatten(y, grid, tile=tile), x)
    assert_exact(fractal_unflatten(y, FractalLayout(*grid, tile)), x)  # the layout's tile wins


def test_large_grid_cpu_kernel():
    """Big enough that the C++ kernel splits rows over threads; padded in H and W."""
    if not HAS_CPP:
        pytest.skip(NO_CPP)
    x = torch.randn(2, 5, 30, 45, 96)
    with use_backend("cpu"):
        y = fractal_flatten(x)
        assert_exact(y, fractal_flatten_ref(x))
        assert_exact(fractal_unflatten(y, (5, 30, 45)), x)


@pytest.mark.parametrize("grid", [(2, 16, 24), (2, 9, 10)], ids=str)
def test_official_order(device, grid):
    """Independent of the reference: block k is one 8x8 tile, padding slots are zero (id -1 + 1)."""
    t, h, w = grid
    ids = torch.arange(1, t * h * w + 1, device=device).view(1, t, h, w, 1)  # 0 is left for padding
    y = fractal_flatten(ids)[0, :, 0].cpu()
    layout = FractalLayout(*grid)
    assert y.shape == (layout.seq_len,)
    padded = torch.zeros(t, layout.hp, layout.wp, dtype=ids.dtype)
    padded[:, :h, :w] = ids.view(t, h, w).cpu()
    k = 0
    for frame in range(t):
        for tr in range(layout.h_tiles):
            for tc in range(layout.w_tiles):
                tile = padded[frame, 8 * tr : 8 * tr + 8, 8 * tc : 8 * tc + 8].reshape(64)
                assert torch.equal(y[64 * k : 64 * k + 64], tile), f"block {k}"
                k += 1
    assert k == layout.num_blocks
    if not layout.is_padded:  # the official recipe verbatim: (T,1,H/8,8,W/8,8) -> (T,H/8,W/8,1,8,8)
        official = ids.view(t, 1, h // 8, 8, w // 8, 8).permute(0, 2, 4, 1, 3, 5).reshape(-1)
        assert torch.equal(y, official.cpu())


def test_padding_and_token_valid(device):
    grid = (2, 9, 17)
    x = _grid_tensor(grid, (3,), device) + 10.0  # no real token is zero
    y, layout = fractal_flatten(x, return_layout=True)
    valid = layout.token_valid(device)
    assert valid.dtype == torch.bool and valid.shape == (layout.seq_len,) and valid.device == y.device
    assert int(valid.sum()) == 2 * 9 * 17
    assert bool((y[:, ~valid] == 0).all()) and bool((y[:, valid] != 0).all())
    counts = layout.block_valid_counts(device)
    assert counts.dtype == torch.int32 and counts.shape == (layout.num_blocks,)
    assert_exact(counts, valid.view(-1, layout.block_size).sum(1, dtype=torch.int32))


def test_layout():
    layout = FractalLayout(2, 9, 17)
    assert (layout.hp, layout.wp, layout.h_tiles, layout.w_tiles) == (16, 24, 2, 3)
    assert (layout.block_size, layout.num_blocks, layout.seq_len) == (64, 12, 768)
    assert layout.is_padded and not FractalLayout(3, 16, 8).is_padded
    assert bool(FractalLayout(3, 16, 8).token_valid().all())
    assert_exact(FractalLayout(1, 8, 16).block_valid_counts(), torch.tensor([64, 64], dtype=torch.int32))
    counts = FractalLayout(1, 3, 10, tile=4).block_valid_counts()
    assert_exact(counts, torch.tensor([12, 12, 6], dtype=torch.int32))
    assert hash(layout) == hash(FractalLayout(2, 9, 17, 8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.h = 3
    for bad in (0, -1, 2.5, True, "8", None):
        with pytest.raises(ValueError, match="must be a positive int"):
            FractalLayout(1, 8, 8, tile=bad)
        with pytest.raises(ValueError, match="FractalLayout.h must be a positive int"):
            FractalLayout(1, bad, 8)


def test_gradcheck():
    x = torch.randn(1, 2, 3, 9, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 2 * 8 * 16, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fractal_flatten_ref, (x,))
    assert torch.autograd.gradcheck(lambda y: fractal_unflatten_ref(y, 2, 3, 9), (y,))
    assert torch.autograd.gradcheck(fractal_flatten, (x,))
    assert torch.autograd.gradcheck(lambda y: fractal_unflatten(y, (2, 3, 9)), (y,))
    assert torch.autograd.gradgradcheck(fractal_flatten, (x,))


@pytest.mark.parametrize("grid", [(1, 3, 7), (2, 9, 16), (2, 8, 8)], ids=str)
def test_gradients_match_reference(device, grid):
    x = _grid_tensor(grid, (3,), device).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, FractalLayout(*grid).seq_len, 3, device=device)
    fractal_flatten(x).backward(g)
    fractal_flatten_ref(x_ref).backward(g)
    assert_exact(x.grad, x_ref.grad, "flatten grad")

    y = torch.randn_like(g).requires_grad_()
    y_ref = y.detach().clone().requires_grad_()
    g = torch.randn(2, *grid, 3, device=device)
    fractal_unflatten(y, grid).backward(g)
    fractal_unflatten_ref(y_ref, *grid).backward(g)
    assert_exact(y.grad, y_ref.grad, "unflatten grad (zero at padding)")


def test_non_contiguous(device):
    grid = (2, 9, 17)
    base = torch.randn(2, 6, 17, 9, 2, device=device)
    x = base.permute(0, 4, 3, 2, 1)[..., ::2]  # (2, 2, 9, 17, 3), permuted and strided
    assert not x.is_contiguous()
    y = fractal_flatten(x)
    assert y.is_contiguous()
    assert_exact(y, fractal_flatten_ref(x))
    y_nc = torch.randn(2, 3, y.shape[1], device=device).transpose(1, 2)
    assert_exact(fractal_unflatten(y_nc, grid), fractal_unflatten_ref(y_nc, *grid))
    # contiguous views at odd storage offsets (the Triton path reinterprets tokens as wider ints)
    for c in (3, 4):
        x_off = torch.randn(1 + 2 * 9 * 17 * c, device=device).to(torch.bfloat16)[1:].view(1, 2, 9, 17, c)
        y_off = fractal_flatten(x_off)
        assert_exact(y_off, fractal_flatten_ref(x_off))
        y_off = torch.randn(1 + y_off.numel(), device=device).to(torch.bfloat16)[1:].view(y_off.shape)
        assert_exact(fractal_unflatten(y_off, grid), fractal_unflatten_ref(y_off, *grid))


def test_empty(device):
    x = torch.randn(0, 2, 3, 5, 4, device=device)
    assert fractal_flatten(x).shape == (0, 2 * 8 * 8, 4)
    x = torch.randn(2, 2, 3, 5, 0, device=device)
    y = fractal_flatten(x)
    assert y.shape == (2, 128, 0)
    assert fractal_unflatten(y, (2, 3, 5)).shape == (2, 2, 3, 5, 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fractal_flatten(torch.zeros(2, 3, 4, 5)), r"shape \(B, T, H, W, \*rest\).*\(2, 3, 4, 5\)"),
        (lambda: fractal_flatten([1, 2]), "x must be a torch.Tensor"),
        (lambda: fractal_flatten(torch.zeros(1, 0, 4, 5, 2)), r"non-empty grid.*\(1, 0, 4, 5, 2\)"),
        (lambda: fractal_flatten(torch.zeros(1, 1, 4, 5, 2), tile=0), "tile must be a positive int, got 0"),
        (lambda: fractal_flatten(torch.zeros(1, 1, 4, 5, 2), tile=2.0), "tile must be a positive int.*2.0"),
        (lambda: fractal_unflatten(torch.zeros(1, 63, 2), (1, 8, 8)), r"S=63 .* needs S = T\*Hp\*Wp = 64"),
        (lambda: fractal_unflatten(torch.zeros(1, 64, 2), (1, 8)), r"grid must be the token grid \(T, H"),
        (lambda: fractal_unflatten(torch.zeros(1, 64, 2), (1, 0, 8)), r"grid must be .* got \(1, 0, 8\)"),
        (lambda: fractal_unflatten(torch.zeros(1, 64, 2), (1, 8, 8), tile=-8), "tile must be a positive int"),
        (lambda: fractal_unflatten(torch.zeros(64), (1, 8, 8)), r"y must have shape \(B, S, \*rest\)"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cpp_errors():
    if not HAS_CPP:
        pytest.skip(NO_CPP)
    ops = torch.ops.kandinsky_kernels_C
    with pytest.raises(ValueError, match="must have shape"):
        ops.fractal_flatten(torch.zeros(2, 3, 4, 5), 8)
    with pytest.raises(ValueError, match="tile must be positive"):
        ops.fractal_flatten(torch.zeros(1, 1, 4, 5, 2), 0)
    with pytest.raises(ValueError, match="needs S=T"):
        ops.fractal_unflatten(torch.zeros(1, 63, 2), 1, 8, 8, 8)


def test_auto_backend_on_cpu():
    expected = "cpu" if HAS_CPP else "reference"
    assert fractal_ops._backend("fractal_flatten", torch.device("cpu")) == expected
    assert fractal_ops._backend("fractal_unflatten", torch.device("cpu")) == expected


def test_opcheck():
    x = torch.randn(2, 2, 9, 10, 3, requires_grad=True)
    torch.library.opcheck(fractal_ops._fractal_flatten_op, (x, 8))
    y = torch.randn(2, 2 * 16 * 16, 3, requires_grad=True)
    torch.library.opcheck(fractal_ops._fractal_unflatten_op, (y, 2, 9, 10, 8))


def test_torch_compile_fullgraph():
    def block(x, rope):
        y, layout = fractal_flatten(x, return_layout=True)
        y = y * fractal_flatten(rope)[..., 0] * layout.token_valid(x.device)[:, None]
        return fractal_unflatten(y, layout)

    x = torch.randn(1, 2, 9, 10, 4, requires_grad=True)
    rope = torch.randn(1, 2, 9, 10, 4, 3)
    out = torch.compile(block, fullgraph=True)(x, rope)
    out.sum().backward()
    grad = x.grad
    x.grad = None
    expected = block(x, rope)
    expected.sum().backward()
    assert_exact(out, expected)
    assert_exact(grad, x.grad)


# ------------------------------------------------------------------------ traps of the caller's grid
def test_flatten_with_grid_refuses_channels_first():
    """Given the grid it expects, fractal_flatten refuses a channels-first (B, C, T, H, W) latent with a
    hint instead of reading it as T = C; a channels-last one passes and equals the call without grid."""
    x = torch.randn(2, 3, 12, 20, 16)  # (B, T, H, W, C)
    assert_exact(fractal_flatten(x, grid=(3, 12, 20)), fractal_flatten(x), "with grid")
    assert_exact(fractal_flatten(x, grid=FractalLayout(3, 12, 20)), fractal_flatten(x), "with layout")
    with pytest.raises(ValueError, match=r"x has shape \(2, 16, 3, 12, 20\), which holds grid \(T, H, W\) = "
                                         r"\(3, 12, 20\) at dims 2-4: a channels-first .* "
                                         r"x.permute\(0, 2, 3, 4, 1\)"):
        fractal_flatten(x.permute(0, 4, 1, 2, 3).contiguous(), grid=(3, 12, 20))
    with pytest.raises(ValueError, match=r"grid \(T, H, W\) = \(3, 16, 24\) \(in tokens\) needs x of shape "
                                         r"\(B, 3, 16, 24, \*rest\)"):
        fractal_flatten(x, grid=(3, 16, 24))
    with pytest.raises(ValueError, match="grid must be the token grid"):
        fractal_flatten(x, grid=(3, 12))


def test_unflatten_refuses_the_padded_grid_of_a_flattened_tensor():
    """fractal_unflatten(y, (T, Hp, Wp)) on the output of fractal_flatten of (T, H, W): S matches, but
    the padding would come back as tokens. Refused, naming the grid the layout expects."""
    x = torch.randn(1, 2, 12, 20, 4)
    y, layout = fractal_flatten(x, return_layout=True)
    with pytest.raises(ValueError, match=r"made by fractal_flatten from the token grid \(T, H, W\) = "
                                         r"\(2, 12, 20\) .* is its padded grid; pass the original grid "
                                         r"\(2, 12, 20\)"):
        fractal_unflatten(y, (2, 16, 24))
    with pytest.raises(ValueError, match=r"pass the original grid \(2, 12, 20\)"):
        fractal_unflatten(y, (2, 16, 17))  # same S, another grid
    assert_exact(fractal_unflatten(y, (2, 12, 20)), x, "original grid")
    assert_exact(fractal_unflatten(y, layout), x, "layout")
    # The record survives torch.save / torch.load(weights_only=True).
    import io

    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="is its padded grid"):
        fractal_unflatten(torch.load(buf, weights_only=True), (2, 16, 24))
    # A grid consistent with the tensor's own S is all that can be checked on a computed tensor.
    assert fractal_unflatten(y * 2, (2, 16, 24)).shape == (1, 2, 16, 24, 4)


def test_layout_tile_grid():
    layout = FractalLayout(3, 12, 20)
    assert layout.tile_grid == (3, 2, 3)
    assert FractalLayout(2, 16, 16, tile=4).tile_grid == (2, 4, 4)
