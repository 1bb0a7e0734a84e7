"""Tiled encode/decode of CausalVideoVAE (kandinsky_model.vae_tiling) and the tile planner.

What is checked, and why this way (reference notes, causal_vae.md section 6):
- tiled vs untiled with random weights differ by design (GroupNorm and attention see only the tile),
  so no tolerance test compares them. Instead a POINTWISE "codec" (``_encode`` / ``_decode`` replaced
  by an exact strided map of the right scale) must make tiled == untiled BIT FOR BIT: that checks the
  tile indices, crops, the leading-frame drop, the 1 + 4k arithmetic and the ragged last tiles, and
  that the blend weights sum to one (identical tiles reproduce their value);
- the blend ramp itself, with a codec that returns one constant per tile;
- the real tiny model, tiled, against an independent straightforward implementation of the same
  algorithm written here (closed-form tile lists, full-size weight masks accumulated in fp64);
- the planner's choices for the report's resolutions, recorded, each within its budget;
- peak memory bounded by the tile (torch profiler allocation events on the CPU);
- bad TilingConfig values.
"""
from __future__ import annotations

import math

import pytest
import torch

from kandinsky_model import CausalVideoVAE, TilingConfig, plan_tiling
from kandinsky_model.vae import CausalVAEConfig
from kandinsky_model.vae_tiling import (
    CPU_DEFAULT_BUDGET_BYTES, MAX_ELEMENTS, _stage_units, estimate_tile_bytes, spatial_tiles, temporal_tiles,
)
from conftest import assert_close_to_reference, assert_exact
from test_vae import make_vae, randomize, tiny_config, video

R, TR = 8, 4  # spatial / temporal compression


# ------------------------------------------------------------------------------ pointwise codec
def pointwise_encode(x: torch.Tensor, latent_channels: int = 8) -> torch.Tensor:
    """(B, 3, 1 + 4k, H, W) -> (B, 2C, 1 + k, H/8, W/8): latent j is frame 4j (frame 0 for j = 0, the
    last frame of its 4-frame group otherwise), pixel (8y, 8x); channels are fixed distinct scalings.
    Exactly what a causal VAE's frame/pixel alignment is, with no mixing, so tiling cannot change it."""
    y = x[:, :, ::TR, ::R, ::R]
    reps = -(-2 * latent_channels // y.shape[1])
    y = y.repeat(1, reps, 1, 1, 1)[:, : 2 * latent_channels]
    scale = torch.arange(1, 2 * latent_channels + 1, dtype=x.dtype).view(1, -1, 1, 1, 1)
    return y * scale


def pointwise_decode(z: torch.Tensor) -> torch.Tensor:
    """(B, C, t, h, w) -> (B, 3, 1 + 4(t - 1), 8h, 8w): frame 0 from latent 0, frames 4j-3..4j from
    latent j (plus the frame's place in its group, so a one-frame shift shows), nearest pixels."""
    first = z[:, :3, :1]
    rest = z[:, :3, 1:].repeat_interleave(TR, dim=2)
    phase = torch.arange(rest.shape[2], dtype=z.dtype).remainder(TR).view(1, 1, -1, 1, 1) * 0.125
    y = torch.cat([first, rest + phase], dim=2)
    return y.repeat_interleave(R, dim=3).repeat_interleave(R, dim=4)


def patch_codec(monkeypatch, vae, enc=pointwise_encode, dec=pointwise_decode):
    """Replace the untiled passes; returns the list of (op, input shape) of every call."""
    calls = []

    def _encode(x):
        calls.append(("encode", tuple(x.shape)))
        return enc(x)

    def _decode(z):
        calls.append(("decode", tuple(z.shape)))
        return dec(z)

    monkeypatch.setattr(vae, "_encode", _encode)
    monkeypatch.setattr(vae, "_decode", _decode)
    return calls


# Ragged everywhere: sizes that are not tile + n * stride, last tiles shorter than a stride, overlap 0,
# k = 1 temporal tiles, a tile larger than the clip, the peers' (diffusers, HY, K5) settings.
CASES = [
    # (F, H, W), TilingConfig kwargs
    ((33, 72, 88), dict(tile_height=32, tile_width=24, spatial_overlap=8, tile_frames=9, temporal_overlap=4)),
    ((37, 40, 64), dict(tile_height=16, tile_width=32, spatial_overlap=0, tile_frames=5, temporal_overlap=0)),
    ((29, 48, 48), dict(tile_height=None, tile_width=40, spatial_overlap=16, tile_frames=13, temporal_overlap=4)),
    ((45, 56, 40), dict(tile_height=32, tile_width=None, spatial_overlap=16, tile_frames=17, temporal_overlap=8)),
    ((21, 24, 24), dict(tile_height=256, tile_width=256, spatial_overlap=64, tile_frames=65, temporal_overlap=16)),
    ((25, 32, 48), dict(tile_height=16, tile_width=16, spatial_overlap=8, tile_frames=9, temporal_overlap=4)),
    ((1, 40, 56), dict(tile_height=24, tile_width=32, spatial_overlap=8, tile_frames=17, temporal_overlap=4)),
]


@pytest.mark.parametrize("fhw,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_pointwise_codec_tiled_equals_untiled_exactly(monkeypatch, fhw, kw):
    vae = CausalVideoVAE(tiny_config())
    calls = patch_codec(monkeypatch, vae)
    f, h, w = fhw
    cfg = TilingConfig(**kw)
    x = video(2, f, h, w, seed=3)
    z_ref = vae.encode(x, tiling="none")
    calls.clear()
    z = vae.encode(x, tiling=cfg)
    assert_exact(z, z_ref, "tiled encode")
    n_enc = len(calls)
    # every tile is itself a valid clip: 1 + 4k frames, H and W multiples of 8
    assert all((s[2] - 1) % TR == 0 and s[3] % R == 0 and s[4] % R == 0 for _, s in calls), calls

    zz = torch.randn(2, 8, (f - 1) // TR + 1, h // R, w // R, generator=torch.Generator().manual_seed(4))
    v_ref = vae.decode(zz, tiling="none")
    calls.clear()
    v = vae.decode(zz, tiling=cfg)
    assert_exact(v, v_ref, "tiled decode")
    assert v.shape == (2, 3, f, h, w)
    # the expected tile counts (closed form, not the library's loops)
    t = (f - 1) // TR + 1
    n_t = n_tiles_t(t, cfg)
    n_h = n_tiles_s(h // R, cfg.tile_height, cfg.spatial_overlap)
    n_w = n_tiles_s(w // R, cfg.tile_width, cfg.spatial_overlap)
    expected = n_t * n_h * n_w
    assert n_enc == expected and len(calls) == expected, (n_enc, len(calls), expected)


def n_tiles_s(n: int, tile_px: int | None, overlap_px: int) -> int:
    if tile_px is None or tile_px // R >= n:
        return 1
    return 1 + math.ceil((n - tile_px // R) / ((tile_px - overlap_px) // R))


def n_tiles_t(t: int, cfg: TilingConfig) -> int:
    if cfg.tile_frames is None:
        return 1
    k, o = (cfg.tile_frames - 1) // TR, cfg.temporal_overlap // TR
    return 1 if k >= t - 1 else 1 + math.ceil((t - 1 - k) / (k - o))


def test_gradients_flow_through_the_tiles(monkeypatch):
    """Autograd through slicing, lerp blending and the in-place stitching: with the pointwise codec the
    input gradient equals the untiled one (weights (1 - w) and w reach the two copies of a value)."""
    vae = CausalVideoVAE(tiny_config())
    patch_codec(monkeypatch, vae)
    cfg = TilingConfig(tile_height=24, tile_width=16, spatial_overlap=8, tile_frames=9, temporal_overlap=4)
    x = video(1, 21, 40, 40, seed=5)
    grads = []
    for tiling in ("none", cfg):
        xi = x.clone().requires_grad_()
        z = vae.encode(xi, tiling=tiling)
        (vae.decode(z, tiling=tiling) * torch.linspace(-1, 1, 40)).sum().backward()
        grads.append(xi.grad)
    assert grads[1].abs().sum() > 0
    assert_close_to_reference(grads[1], grads[0].double(), name="input gradient")


def test_leading_frame_and_alignment(monkeypatch):
    """Tile inputs, frame by frame: tile m >= 1 starts at the LAST frame of latent m (k - o), one frame
    before the 4-frame groups it keeps; the tiles of a 1 + 4 * 10 clip with 9/4 are 0-8, 4-12, ... 36-40."""
    vae = CausalVideoVAE(tiny_config())
    seen = []

    def _encode(x):
        seen.append(x[0, 0, :, 0, 0].tolist())
        return pointwise_encode(x)

    monkeypatch.setattr(vae, "_encode", _encode)
    x = torch.arange(41, dtype=torch.float32).view(1, 1, 41, 1, 1).expand(1, 3, 41, 8, 8).contiguous()
    z = vae.encode(x, tiling=TilingConfig(tile_frames=9, temporal_overlap=4, tile_height=None, tile_width=None))
    assert [(s[0], s[-1], len(s)) for s in seen] == [(0, 8, 9), (4, 12, 9), (8, 16, 9), (12, 20, 9), (16, 24, 9),
                                                     (20, 28, 9), (24, 32, 9), (28, 36, 9), (32, 40, 9)]
    assert z[0, 0, :, 0, 0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    # ragged: 1 + 4 * 8 frames in 13-frame tiles, stride 8 frames: the last tile is 24-32 (9 frames)
    seen.clear()
    z = vae.encode(x[:, :, :33], tiling=TilingConfig(tile_frames=13, temporal_overlap=4, tile_height=None,
                                                      tile_width=None))
    assert [(s[0], len(s)) for s in seen] == [(0, 13), (8, 13), (16, 13), (24, 9)]
    assert z[0, 0, :, 0, 0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    assert temporal_tiles(10, 2, 1) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8), (7, 9)]
    assert temporal_tiles(11, 4, 0) == [(0, 4), (4, 8), (8, 10)]
    assert spatial_tiles(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (9, 11)]
    assert spatial_tiles(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]  # no tail tile inside the last one


def test_blend_ramp_and_bilinear_corners(monkeypatch):
    """A codec returning one constant per tile (its call number): along one axis the overlap reads
    exactly the ramp i/e (0, 1/e, ...) from the previous tile's value to the next; where four tiles meet,
    the bilinear product of the two ramps (separable blending)."""
    vae = CausalVideoVAE(tiny_config())
    count = [0]

    def const_encode(x):
        count[0] += 1
        out = pointwise_encode(x)
        return torch.full_like(out, float(count[0]))

    monkeypatch.setattr(vae, "_encode", const_encode)
    # 1-D along W: latent width 10, tiles of 6 overlapping by 3 -> [0, 6), [3, 9), [6, 10)
    x = video(1, 1, 8, 80)
    z = vae.encode(x, tiling=TilingConfig(tile_height=None, tile_width=48, spatial_overlap=24, tile_frames=None))
    ramp = torch.arange(3, dtype=torch.float64) / 3  # 0, 1/3, 2/3: the next tile's weight
    expected = torch.cat([torch.ones(3), 1 + ramp, 2 + ramp, torch.full((1,), 3.0)]).double()
    assert_close_to_reference(z[0, 0, 0, 0], expected.float(), name="1-D ramp")
    assert (z[0, :, :, :, 3] == 1).all() and (z[0, :, :, :, 9] == 3).all()  # ramp starts at weight 0
    # 2-D: 2 x 2 tiles of 3 latents overlapping by 2 in a 4 x 4 latent frame -> corners bilinear
    count[0] = 0
    x = video(1, 1, 32, 32)
    z = vae.encode(x, tiling=TilingConfig(tile_height=24, tile_width=24, spatial_overlap=8, tile_frames=None))
    a, b, c, d = 1.0, 2.0, 3.0, 4.0  # scan order: (0, 0), (0, 1), (1, 0), (1, 1)
    wy = torch.tensor([0, 0, 0, 1], dtype=torch.float64).view(4, 1)  # ramp over 1 latent: weight 0
    wx = torch.tensor([0, 0, 0, 1], dtype=torch.float64).view(1, 4)
    ref = (1 - wy) * (1 - wx) * a + (1 - wy) * wx * b + wy * (1 - wx) * c + wy * wx * d
    assert_close_to_reference(z[0, 0, 0].double(), ref, name="2-D corners, overlap 1")
    count[0] = 0
    x = video(1, 1, 48, 48)
    z = vae.encode(x, tiling=TilingConfig(tile_height=32, tile_width=32, spatial_overlap=16, tile_frames=None))
    r = torch.tensor([0, 0, 0.0, 0.5, 1, 1], dtype=torch.float64)  # tiles [0,4), [2,6): ramp 0, 1/2 on [2,4)
    wy, wx = r.view(6, 1), r.view(1, 6)
    ref = (1 - wy) * (1 - wx) * a + (1 - wy) * wx * b + wy * (1 - wx) * c + wy * wx * d
    assert_close_to_reference(z[0, 0, 0], ref.float(), name="2-D bilinear corners")


# ------------------------------------------------- real tiny model vs an independent implementation
def ref_axis_tiles(n: int, tile: int | None, overlap: int) -> list[tuple[int, int]]:
    """Closed form: starts i * stride for i < 1 + ceil((n - tile) / stride), the last cut at n."""
    if tile is None or tile >= n:
        return [(0, n)]
    stride = tile - overlap
    count = 1 + math.ceil((n - tile) / stride)
    return [(i * stride, min(i * stride + tile, n)) for i in range(count)]


def ref_weights(tiles: list[tuple[int, int]], n: int) -> list[torch.Tensor]:
    """Full-length fp64 weight of each output-space tile: 1 on its own part, i/e rising over the overlap
    with the previous tile, 1 - i/e falling over the overlap with the next. They must sum to 1."""
    ws = []
    for i, (s, e) in enumerate(tiles):
        w = torch.zeros(n, dtype=torch.float64)
        w[s:e] = 1
        if i > 0 and tiles[i - 1][1] > s:
            ov = tiles[i - 1][1] - s
            w[s:s + ov] = torch.arange(ov, dtype=torch.float64) / ov
        if i + 1 < len(tiles) and tiles[i + 1][0] < e:
            s2 = tiles[i + 1][0]
            ov = e - s2
            w[s2:e] = w[s2:e] * (1 - torch.arange(ov, dtype=torch.float64) / ov)
        ws.append(w)
    total = torch.stack(ws).sum(0)
    assert torch.allclose(total, torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12), total
    return ws


def ref_tiled(vae, x: torch.Tensor, cfg: TilingConfig, op: str) -> torch.Tensor:
    """Straightforward tiled encode ('encode': x video) or decode ('decode': x latents): every tile run
    alone through the untiled pass, placed with full-size weights, accumulated in fp64."""
    fn = vae._encode if op == "encode" else vae._decode
    if op == "encode":
        t, h, w = (x.shape[2] - 1) // TR + 1, x.shape[3] // R, x.shape[4] // R
    else:
        t, h, w = x.shape[2:]
    th = None if cfg.tile_height is None else cfg.tile_height // R
    tw = None if cfg.tile_width is None else cfg.tile_width // R
    o = cfg.spatial_overlap // R
    k = None if cfg.tile_frames is None else (cfg.tile_frames - 1) // TR
    ot = cfg.temporal_overlap // TR
    # temporal tiles in latent frames: tile 0 = [0, k]; tile m = leading latent m(k - ot) + [1, k]
    if k is None or k >= t - 1:
        t_tiles = [(0, t - 1)]
    else:
        count = 1 + math.ceil((t - 1 - k) / (k - ot))
        t_tiles = [(m * (k - ot), min(m * (k - ot) + k, t - 1)) for m in range(count)]
    s_h, s_w = ref_axis_tiles(h, th, o), ref_axis_tiles(w, tw, o)
    sp = 1 if op == "encode" else R  # output units per latent along H, W
    tp = 1 if op == "encode" else TR  # output frames per latent step
    n_out_t = t if op == "encode" else 1 + TR * (t - 1)
    # output-space tiles (kept part, after the leading-frame drop)
    out_t = [(0 if m == 0 else lead * tp + 1, last * tp + 1) for m, (lead, last) in enumerate(t_tiles)]
    out_h = [(a * sp, b * sp) for a, b in s_h]
    out_w = [(a * sp, b * sp) for a, b in s_w]
    wt, wh, ww = ref_weights(out_t, n_out_t), ref_weights(out_h, h * sp), ref_weights(out_w, w * sp)
    acc = None
    for m, (lead, last) in enumerate(t_tiles):
        for i, (h0, h1) in enumerate(s_h):
            for j, (w0, w1) in enumerate(s_w):
                if op == "encode":
                    piece = x[:, :, lead * TR:last * TR + 1, h0 * R:h1 * R, w0 * R:w1 * R]
                else:
                    piece = x[:, :, lead:last + 1, h0:h1, w0:w1]
                y = fn(piece).double()
                if m > 0:
                    y = y[:, :, 1:]
                if acc is None:
                    acc = torch.zeros(*y.shape[:2], n_out_t, h * sp, w * sp, dtype=torch.float64)
                (t0, t1), (a0, a1), (b0, b1) = out_t[m], out_h[i], out_w[j]
                weight = (wt[m][t0:t1].view(-1, 1, 1) * wh[i][a0:a1].view(1, -1, 1) * ww[j][b0:b1].view(1, 1, -1))
                acc[:, :, t0:t1, a0:a1, b0:b1] += weight * y
    return acc


REAL_CASES = [
    ((17, 40, 56), dict(tile_height=24, tile_width=32, spatial_overlap=8, tile_frames=9, temporal_overlap=4)),
    ((21, 32, 40), dict(tile_height=None, tile_width=24, spatial_overlap=8, tile_frames=13, temporal_overlap=0)),
]


@pytest.mark.parametrize("fhw,kw", REAL_CASES, ids=["spatial+temporal", "w-only,no-temporal-blend"])
def test_real_model_tiled_matches_independent_implementation(fhw, kw):
    vae = make_vae()
    cfg = TilingConfig(**kw)
    f, h, w = fhw
    x = video(1, f, h, w, seed=7)
    with torch.no_grad():
        moments = __import__("kandinsky_model.vae_tiling", fromlist=["tiled_encode"]).tiled_encode(vae, x, cfg)
        ref_m = ref_tiled(vae, x, cfg, "encode")
        assert_close_to_reference(moments, ref_m, name="tiled moments")
        z = vae.encode(x, tiling=cfg)
        assert_exact(z, moments[:, :8].contiguous(), "encode returns the tiled mean")
        y = vae.decode(z, tiling=cfg)
        ref_y = ref_tiled(vae, z, cfg, "decode")
        assert y.shape == (1, 3, f, h, w)
        assert_close_to_reference(y, ref_y, name="tiled decode")
        # and the tiling really changed something (tiles see less context), so the test can fail
        assert not torch.allclose(y, vae.decode(z, tiling="none"), atol=1e-3)


def test_auto_plans_per_call_and_none_is_untiled(monkeypatch):
    vae = make_vae()
    x = video(1, 9, 32, 40)
    with torch.no_grad():
        z_none = vae.encode(x, tiling="none")
        assert vae.tiling == "auto"
        assert_exact(vae.encode(x), z_none, "auto on a small clip (one tile) is the untiled path")
        y_none = vae.decode(z_none, tiling="none")
        assert_exact(vae.decode(z_none), y_none, "auto decode on a small clip")
        cfg = TilingConfig(tile_height=None, tile_width=24, spatial_overlap=8, tile_frames=5, temporal_overlap=0)
        asked = []

        def fake_plan(shape, dtype, **kw):
            asked.append((tuple(shape), dtype, kw["op"], kw["device"]))
            return cfg

        monkeypatch.setattr("kandinsky_model.vae.plan_tiling", fake_plan)
        z_auto = vae.encode(x)
        assert_exact(z_auto, vae.encode(x, tiling=cfg), "auto uses the plan")
        vae.decode(z_auto)
        assert asked[0] == ((1, 3, 9, 32, 40), torch.float32, "encode", vae.device)
        assert asked[-1] == ((1, 3, 9, 32, 40), torch.float32, "decode", vae.device)
        vae.tiling = "none"
        assert_exact(vae.encode(x), z_none, "attribute none")
        vae.tiling = cfg
        assert_exact(vae.encode(x), z_auto, "attribute TilingConfig")
        gen = torch.Generator().manual_seed(2)
        zs = vae.encode(x, sample=True, generator=gen)  # drawn once, after blending the moments
        assert zs.shape == z_auto.shape and not torch.equal(zs, z_auto)
    with pytest.raises(ValueError, match=r"CausalVideoVAE.tiling must be 'auto', 'none' or a TilingConfig, got 'yes'"):
        vae.tiling = "yes"
    with pytest.raises(ValueError, match=r"encode\(tiling=...\) must be 'auto', 'none' or a TilingConfig, got 256"):
        vae.encode(x, tiling=256)
    with pytest.raises(ValueError, match=r"decode\(tiling=...\) must be"):
        vae.decode(z_none, tiling={"tile_height": 64})


# ------------------------------------------------------------------------------ TilingConfig errors
@pytest.mark.parametrize("kw,match", [
    (dict(tile_height=100), r"TilingConfig.tile_height must be a multiple of 8, got 100"),
    (dict(tile_width=0), r"TilingConfig.tile_width must be None \(whole dimension\) or an int >= 8, got 0"),
    (dict(tile_width=True), r"TilingConfig.tile_width must be .* got True"),
    (dict(spatial_overlap=-8), r"TilingConfig.spatial_overlap must be an int >= 0, got -8"),
    (dict(spatial_overlap=12), r"TilingConfig.spatial_overlap must be a multiple of 8, got 12"),
    (dict(spatial_overlap=136), r"TilingConfig.spatial_overlap must be at most half of tile_height"),
    (dict(tile_frames=16), r"TilingConfig.tile_frames must be 1 \+ 4k frames .* got 16; nearest accepted: 13 or 17"),
    (dict(tile_frames=1), r"TilingConfig.tile_frames must be None \(whole dimension\) or an int >= 5, got 1"),
    (dict(tile_frames=17.0), r"TilingConfig.tile_frames must be .* got 17.0"),
    (dict(temporal_overlap=2), r"TilingConfig.temporal_overlap must be a multiple of 4, got 2"),
    (dict(temporal_overlap=12), r"TilingConfig.temporal_overlap must be at most \(tile_frames - 1\) / 2 = 8"),
    (dict(temporal_overlap=None), r"TilingConfig.temporal_overlap must be an int >= 0, got None"),
])
def test_bad_tiling_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TilingConfig(**kw)


def test_tiling_config_against_model_ratio():
    vae = CausalVideoVAE(tiny_config(spatial_compression_ratio=16))
    with pytest.raises(ValueError, match=r"tile_height must be a multiple of the VAE's spatial compression 16, got 40"):
        vae.encode(video(1, 5, 32, 32), tiling=TilingConfig(tile_height=40, spatial_overlap=16))


# ------------------------------------------------------------------------------------------ planner
GiB = 2**30
RESOLUTIONS = [(256, 256), (512, 768), (768, 1280), (1024, 1024)]
FRAMES = [1, 17, 61, 121, 241]


def _fmt(cfg: TilingConfig) -> tuple:
    return (cfg.tile_frames, cfg.tile_height, cfg.tile_width)


# Recorded choices of plan_tiling at the published config, op="both" (one config for encode and
# decode), overlaps 64 px / 4 frames: (tile_frames, tile_height, tile_width), None = whole. Budgets: an
# 80 GiB and a 24 GiB GPU in bf16 (there the 2**31-element guard caps whole 512x768 frames at 21-frame
# tiles), and the CPU default (no psutil) in fp32. Changing the estimate or the rules changes these
# on purpose: review the new table, then update it.
PLANS_RECORDED = {  # (budget, dtype, device) -> (H, W) -> plans for F = 1, 17, 61, 121, 241
    (80 * GiB, torch.bfloat16, 'cuda'): {
        (256, 256): [(None, None, None), (None, None, None), (None, None, None), (None, None, None), (125, None, None)],
        (512, 768): [(None, None, None), (None, None, None), (21, None, None), (21, None, None), (21, None, None)],
        (768, 1280): [(None, None, None), (None, None, 472), (None, 416, 312), (65, 304, 368), (85, 304, 312)],
        (1024, 1024): [(None, None, None), (None, None, 384), (None, 384, 304), (None, 256, 256), (125, 256, 256)],
    },
    (24 * GiB, torch.bfloat16, 'cuda'): {
        (256, 256): [(None, None, None), (None, None, None), (None, None, None), (65, None, None), (85, None, None)],
        (512, 768): [(None, None, None), (None, None, None), (17, None, None), (17, None, None), (17, None, None)],
        (768, 1280): [(None, None, None), (None, None, 472), (None, 304, 368), (65, 304, 312), (65, 304, 312)],
        (1024, 1024): [(None, None, None), (None, None, 384), (None, 384, 256), (65, 384, 256), (85, 304, 256)],
    },
    (CPU_DEFAULT_BUDGET_BYTES, torch.float32, 'cpu'): {
        (256, 256): [(None, None, None), (None, None, None), (17, None, None), (17, None, None), (17, None, None)],
        (512, 768): [(None, None, None), (None, 288, 240), (None, 128, 144), (65, 128, 128), (53, 128, 144)],
        (768, 1280): [(None, None, None), (None, 240, 272), (None, 128, 128), (45, 152, 136), (41, 128, 136)],
        (1024, 1024): [(None, None, None), (None, 256, 256), (33, 184, 160), (45, 152, 128), (41, 128, 128)],
    },
}
@pytest.mark.parametrize("budget,dtype,device", [(80 * GiB, torch.bfloat16, "cuda"),
                                                 (24 * GiB, torch.bfloat16, "cuda"),
                                                 (CPU_DEFAULT_BUDGET_BYTES, torch.float32, "cpu")],
                         ids=["80GiB-bf16-gpu", "24GiB-bf16-gpu", "cpu-default-fp32"])
def test_planner_choices_fit_and_are_recorded(budget, dtype, device):
    config = CausalVAEConfig()
    got = {}
    for h, w in RESOLUTIONS:
        for f in FRAMES:
            cfg = plan_tiling((1, 3, f, h, w), dtype, budget_bytes=budget, device=device)
            got[(f, h, w)] = _fmt(cfg)
            frames = f if cfg.tile_frames is None else min(cfg.tile_frames, f)
            th, tw = cfg.tile_height or h, cfg.tile_width or w
            for op in ("encode", "decode"):
                est = estimate_tile_bytes(config, op, 1, frames, min(th, h), min(tw, w), dtype,
                                          clip_frames=f, clip_height=h, clip_width=w)
                assert est <= budget, (f, h, w, op, cfg, est / GiB)
                if device == "cuda":
                    big = _stage_units(config, op)[1]
                    assert big * frames * (min(th, h) + 2) * (min(tw, w) + 2) <= MAX_ELEMENTS
            # preference: tiled only because the untiled clip does not fit
            if cfg != TilingConfig.whole().replace(spatial_overlap=64):
                assert not fits(config, f, h, w, dtype, budget, device), (f, h, w, cfg)
    key = (budget, dtype, device)
    print(f"\nplans for {key}:")
    for k, v in got.items():
        print(f"  {k}: {v}")
    recorded = {(f, h, w): plan for (h, w), plans in PLANS_RECORDED[key].items() for f, plan in zip(FRAMES, plans)}
    assert got == recorded, got




def fits(config, f, h, w, dtype, budget, device) -> bool:
    big = max(_stage_units(config, op)[1] for op in ("encode", "decode")) if device == "cuda" else 0
    return big * f * (h + 2) * (w + 2) <= MAX_ELEMENTS and all(
        estimate_tile_bytes(config, op, 1, f, h, w, dtype) <= budget for op in ("encode", "decode"))


def test_planner_bad_arguments():
    with pytest.raises(ValueError, match="budget_bytes must be None or a positive int, got 0"):
        plan_tiling((17, 256, 256), budget_bytes=0)
    with pytest.raises(ValueError, match=r"shape must have 1 \+ 4k frames"):
        plan_tiling((16, 256, 256), budget_bytes=GiB)
    with pytest.raises(ValueError, match="op must be 'encode', 'decode' or 'both', got 'x'"):
        plan_tiling((17, 256, 256), op="x")
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        plan_tiling((17, 256, 256), torch.int8)
    with pytest.warns(UserWarning, match="no tiling of .* fits budget_bytes=1000"):
        small = plan_tiling((121, 512, 768), budget_bytes=1000)
    assert _fmt(small) == (9, 128, 128)
    # the CPU default without an explicit budget is the documented constant (psutil absent) or half of
    # what psutil reports; either way a valid plan
    assert isinstance(plan_tiling((17, 64, 64)), TilingConfig)


# ------------------------------------------------------------------------------------- peak memory
def peak_bytes(fn) -> int:
    """Peak of the CPU allocator's allocated bytes during ``fn()`` above the level before it, from the
    profiler's allocation events (each carries the running total)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(nodes):
        for e in nodes:
            if e.tag == _EventType.Allocation:
                events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    assert events, "no allocation events recorded"
    base = events[0][2] - events[0][1]
    return max(e[2] for e in events) - base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_bounded_by_the_tile(dtype):
    """Same tiles, a 4x longer clip (17 -> 65 frames): the peak may grow by at most 10 % plus the growth
    of the result itself (the output buffer is necessarily as long as the clip; with the fused kernels a
    tile's activations peak low enough that the 0.6 MB longer decoded video alone is ~8 % of the
    17-frame peak). The channel widths are tiny but keep the real VAE's ratio of full-resolution
    activations to the 3-channel output."""
    vae = randomize(CausalVideoVAE(tiny_config(block_out_channels=(32, 32, 32, 32), norm_num_groups=4))).eval()
    vae = vae.to(dtype)
    cfg = TilingConfig(tile_height=None, tile_width=None, tile_frames=17, temporal_overlap=4)
    peaks = {}
    with torch.no_grad():
        for f in (17, 65):  # warm-up: one-time work (weight layout, oneDNN primitives) is not a tile's peak
            vae.decode(vae.encode(video(1, f, 32, 32, dtype=dtype), tiling=cfg), tiling=cfg)
        for f in (17, 65):
            x = video(1, f, 32, 32, dtype=dtype)
            z = torch.randn(1, 8, (f - 1) // 4 + 1, 4, 4).to(dtype)
            peaks[("encode", f)] = peak_bytes(lambda: vae.encode(x, tiling=cfg))
            peaks[("decode", f)] = peak_bytes(lambda: vae.decode(z, tiling=cfg))
    itemsize = torch.empty((), dtype=dtype).element_size()
    grown = {"encode": 16 * (16 - 4) * 4 * 4 * itemsize,  # moments (2 x 8 channels), 17 -> 5 vs 65 -> 17
             "decode": 3 * (65 - 17) * 32 * 32 * itemsize}  # the decoded video
    for op in ("encode", "decode"):
        assert peaks[(op, 65)] <= 1.10 * peaks[(op, 17)] + grown[op], (op, peaks)
    # and untiled, the long clip's peak does grow (so the measurement can fail)
    with torch.no_grad():
        untiled = peak_bytes(lambda: vae.decode(z, tiling="none"))
    assert untiled > 2 * peaks[("decode", 17)], (untiled, peaks)


def test_estimate_covers_measured_peak():
    """The planner's estimate is an upper bound of the measured CPU peak of one tile (it is what keeps
    plans inside the budget), within 3x (so it does not waste the budget). bf16 only: CPU fp32 convs
    of so few channels go through slow_conv3d, whose 27x unfold buffers the estimate does not model
    (the published widths take oneDNN in fp32 too; see estimate_tile_bytes)."""
    vae = randomize(CausalVideoVAE(tiny_config(block_out_channels=(32, 32, 32, 32), norm_num_groups=4))).eval()
    with torch.no_grad():
        for dtype in (torch.bfloat16,):
            vae = vae.to(dtype)
            x = video(1, 9, 32, 48, dtype=dtype)
            z = torch.randn(1, 8, 3, 4, 6).to(dtype)
            for op, fn in (("encode", lambda: vae.encode(x, tiling="none")),
                           ("decode", lambda: vae.decode(z, tiling="none"))):
                measured = peak_bytes(fn)
                est = estimate_tile_bytes(vae.config, op, 1, 9, 32, 48, dtype)
                assert measured <= est <= 3 * measured, (op, dtype, measured, est)


# ------------------------------------------------------------------------- diffusers (optional)
def test_diffusers_tiling_same_outputs_where_the_schemes_coincide():
    """diffusers' AutoencoderKLHunyuanVideo, tiled with the same settings and identical weights: same
    latents and frames where the two schemes coincide: tiles along one spatial axis (no 4-tile
    corners, which diffusers blends non-separably) and sizes whose last tile is at most a stride long
    (so diffusers runs no tail tile inside it; its extra empty temporal tiles are harmless)."""
    from test_vae import _diffusers_vae_class, rel_l2

    cls = _diffusers_vae_class()
    vae = make_vae()
    theirs = cls(block_out_channels=(8, 16, 16, 32), norm_num_groups=4, latent_channels=8).eval()
    theirs.load_state_dict(vae.state_dict())
    cfg = TilingConfig(tile_height=32, tile_width=32, spatial_overlap=8, tile_frames=17, temporal_overlap=4)
    theirs.enable_tiling(
        tile_sample_min_height=cfg.tile_height, tile_sample_min_width=cfg.tile_width,
        tile_sample_min_num_frames=cfg.tile_frames - 1,
        tile_sample_stride_height=cfg.tile_height - cfg.spatial_overlap,
        tile_sample_stride_width=cfg.tile_width - cfg.spatial_overlap,
        tile_sample_stride_num_frames=cfg.tile_frames - 1 - cfg.temporal_overlap,
    )
    x = video(1, 25, 24, 48, seed=11)  # 2 temporal tiles (0-16, 12-24), 2 tiles along W (0-32, 24-48)
    with torch.no_grad():
        z_theirs = theirs.encode(x).latent_dist.mean
        z = vae.encode(x, tiling=cfg)
        assert rel_l2(z, z_theirs) < 1e-5, rel_l2(z, z_theirs)
        y = vae.decode(z, tiling=cfg)
        y_theirs = theirs.decode(z).sample
        assert rel_l2(y, y_theirs) < 1e-5
        # the comparison is of tiled outputs: untiled ones are far from them
        assert rel_l2(vae.decode(z, tiling="none"), y_theirs) > 1e-2
