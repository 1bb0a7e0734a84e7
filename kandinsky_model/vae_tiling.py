"""Tiled encode/decode of :class:`~kandinsky_model.vae.CausalVideoVAE` and the tile planner.

The scheme is the one of HunyuanVideo's original ``AutoencoderKLCausal3D`` and of diffusers'
``AutoencoderKLHunyuanVideo`` (which Kandinsky 5's vendored VAE copies), with every size a setting of
:class:`TilingConfig`. It follows those peers because the Kandinsky 5.0 models were trained and
evaluated with latents made that way (the official code always tiles temporally, 17/8 frames); the
defaults of ``TilingConfig()`` are diffusers' (256 px tiles, 64 px overlap; 17-frame tiles, 4 frames
overlap). Temporal tiles run outside, spatial tiles inside each temporal tile.

Named dims: B batch, C channels, F frames (``1 + 4k``), H x W pixels; latents t = 1 + (F - 1)/4 frames
of h x w = H/8 x W/8.

Temporal tiles (the leading-frame trick). With ``tile_frames = 1 + 4k`` and ``temporal_overlap = 4o``
the latent stride is ``k - o``. Tile 0 encodes frames ``0 .. 4k`` into latents ``0 .. k``. Tile m >= 1
starts ONE frame early, at frame ``4 m (k - o)`` (the last frame of latent ``m (k - o)``), so that
its ``1 + 4k`` frames are again "image frame + 4-frame groups": the causal VAE treats that leading
frame as an image, and its latent is dropped. The kept latents ``m (k - o) + 1 .. m (k - o) + k`` are
then aligned with the untiled ones, and the first ``o`` of them overlap tile m - 1 and are blended.
Decode mirrors it: tile m decodes latents ``m (k - o) .. m (k - o) + k``, drops its first frame and
blends the first ``4 o`` frames. The last tile is shorter (ragged) where the clip ends; it always
keeps more than the overlap. ``temporal_overlap = 0`` means no blend at all (tiles only share the
leading frame), for the Kandinsky 5.0 report's remark that temporal blending hurts quality (every
official version still blends), at the risk of a visible seam.

Spatial tiles: tile ``T`` px with overlap ``O`` px (latent ``T/8``, ``O/8``), stride ``T - O``; the
last tile is cut at the border (ragged). Encode blends ``O/8`` latents, decode ``O`` pixels.

Blending is the peers' linear ramp over the overlap: position ``i`` of an overlap of ``e`` gets
``(1 - i/e) * previous + (i/e) * next``, written as ``lerp(previous, next, i/e)`` so that identical
tiles reproduce their value bit for bit. Two deliberate differences from the peers:
- 2-D corners are blended separably (tiles into row strips along W, strips along H): the bilinear
  product of the two ramps. The peers blend in place in scan order, which gives the top-left tile
  the non-separable weight ``(1 - x/e)(1 + x/e)(1 - y/e)``; results differ only where four tiles meet.
- No tail tiles: the peers start a tile at every stride below the size (``range(0, H, stride)``), so
  a tile that already reaches the border is followed by tiles lying inside it (wasted work, and an
  empty temporal tile); here tiling stops at the first tile that reaches the border. Where the last
  tile is at most one stride long, both run the same tiles (diffusers' extra temporal tile is then
  empty); tests/test_vae_tiling.py compares with diffusers there.

Memory: the result is written into one preallocated output; besides it only one temporal tile's
stitched result (and one row strip) of the OUTPUT space is alive, so the peak is bounded by the tile,
not by the clip (tests/test_vae_tiling.py measures it).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .vae import CausalVAEConfig, CausalVideoVAE

__all__ = ["TilingConfig", "Tiling", "plan_tiling", "estimate_tile_bytes", "resolve_tiling",
           "CPU_DEFAULT_BUDGET_BYTES"]

# The HunyuanVideo VAE's compression (CausalVAEConfig allows other spatial ratios for toy models;
# tiles are then checked against the model's ratio when used).
_SPATIAL = 8
_TEMPORAL = 4


def _check_opt_int(name: str, value, *, ge: int, multiple_of: int | None = None, none_ok: bool = True):
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < ge:
        want = "None (whole dimension) or " if none_ok else ""
        raise ValueError(f"TilingConfig.{name} must be {want}an int >= {ge}, got {value!r}")
    if multiple_of is not None and value % multiple_of:
        raise ValueError(f"TilingConfig.{name} must be a multiple of {multiple_of}, got {value}")
    return value


@dataclass(kw_only=True, slots=True, frozen=True)
class TilingConfig:
    """Tile sizes of a tiled encode/decode, in PIXELS and FRAMES of the video (latent sizes derived:
    / 8 in space, ``(F - 1) / 4`` latent steps in time). The same config serves encode and decode.

    ``TilingConfig()`` is diffusers' ``enable_tiling()`` with its framewise defaults; Kandinsky 5's
    official code corresponds to ``TilingConfig(tile_frames=17, temporal_overlap=8, ...)``. Raises
    ValueError naming the field on a bad value.
    """

    tile_height: int | None = 256
    """Tile height in pixels, a multiple of 8 (>= 8); None: whole frames in height."""
    tile_width: int | None = 256
    """Tile width in pixels, a multiple of 8 (>= 8); None: whole frames in width."""
    spatial_overlap: int = 64
    """Overlap of neighbouring tiles in pixels, a multiple of 8, at most half of each tile size.
    Encode blends ``spatial_overlap / 8`` latents, decode ``spatial_overlap`` pixels; 0: no blend."""
    tile_frames: int | None = 17
    """Frames per temporal tile, ``1 + 4k`` with k >= 1 (the leading frame + k groups of 4); None: the
    whole clip in one tile."""
    temporal_overlap: int = 4
    """Frames shared by neighbouring temporal tiles besides the leading frame, a multiple of 4, at most
    ``(tile_frames - 1) / 2``. Encode blends ``temporal_overlap / 4`` latents, decode that many frames;
    0: no blend (tiles only share the leading frame)."""

    def __post_init__(self) -> None:
        th = _check_opt_int("tile_height", self.tile_height, ge=_SPATIAL, multiple_of=_SPATIAL)
        tw = _check_opt_int("tile_width", self.tile_width, ge=_SPATIAL, multiple_of=_SPATIAL)
        o = _check_opt_int("spatial_overlap", self.spatial_overlap, ge=0, multiple_of=_SPATIAL, none_ok=False)
        for name, tile in (("tile_height", th), ("tile_width", tw)):
            if tile is not None and 2 * o > tile:
                raise ValueError(
                    f"TilingConfig.spatial_overlap must be at most half of {name} (a tile overlaps its "
                    f"two neighbours), got spatial_overlap={o} with {name}={tile}"
                )
        ft = _check_opt_int("tile_frames", self.tile_frames, ge=1 + _TEMPORAL)
        if ft is not None and (ft - 1) % _TEMPORAL:
            lo = (ft - 1) // _TEMPORAL * _TEMPORAL + 1
            raise ValueError(
                f"TilingConfig.tile_frames must be 1 + 4k frames (5, 9, 13, 17, ...: the leading frame "
                f"and whole 4-frame groups), got {ft}; nearest accepted: {lo if lo > 1 else 5} or {lo + 4}"
            )
        to = _check_opt_int("temporal_overlap", self.temporal_overlap, ge=0, multiple_of=_TEMPORAL,
                            none_ok=False)
        if ft is not None and 2 * to > ft - 1:
            raise ValueError(
                f"TilingConfig.temporal_overlap must be at most (tile_frames - 1) / 2 = {(ft - 1) // 2}, "
                f"got temporal_overlap={to} with tile_frames={ft}"
            )

    def replace(self, **changes) -> "TilingConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def whole(cls) -> "TilingConfig":
        """One tile: whole frames, whole clip (what ``tiling="none"`` runs, without the tiler)."""
        return cls(tile_height=None, tile_width=None, tile_frames=None)


Tiling = Union[str, TilingConfig, None]


def resolve_tiling(tiling, attribute: str = "tiling") -> "str | TilingConfig":
    """Validate a ``tiling`` value: ``"auto"``, ``"none"`` or a :class:`TilingConfig`."""
    if isinstance(tiling, TilingConfig) or (isinstance(tiling, str) and tiling in ("auto", "none")):
        return tiling
    raise ValueError(f"{attribute} must be 'auto', 'none' or a TilingConfig, got {tiling!r}")


# ------------------------------------------------------------------------------------ tile indices
def spatial_tiles(length: int, tile: int | None, overlap: int) -> list[tuple[int, int]]:
    """Tiles ``[start, stop)`` along one spatial axis of ``length`` (latent units): starts at multiples
    of ``tile - overlap``; the first tile reaching ``length`` is the last (cut there)."""
    if tile is None or tile >= length:
        return [(0, length)]
    stride = tile - overlap
    out = []
    start = 0
    while True:
        out.append((start, min(start + tile, length)))
        if start + tile >= length:
            return out
        start += stride


def temporal_tiles(t: int, k: int | None, o: int) -> list[tuple[int, int]]:
    """Latent-frame tiles ``[first, last]`` (inclusive) over ``t`` latents for ``tile_frames = 1 + 4k``
    and ``temporal_overlap = 4 o``. Tile 0 starts at latent 0 and keeps it; tile m >= 1 starts at its
    LEADING latent ``m (k - o)``, whose output is dropped. The last tile is cut at ``t - 1``."""
    if k is None or k >= t - 1:
        return [(0, t - 1)]
    stride = k - o
    out = []
    lead = 0
    while True:
        out.append((lead, min(lead + k, t - 1)))
        if lead + k >= t - 1:
            return out
        lead += stride


def _stitch(out: torch.Tensor, tile: torch.Tensor, dim: int, start: int, prev_stop: int) -> None:
    """Write ``tile`` into ``out`` at ``start`` along ``dim``, linearly blending the positions
    ``[start, prev_stop)`` that the previous tile already wrote (weight of the new tile 0, 1/e, ...,
    (e-1)/e over an overlap of e: the peers' ramp; half types blend in fp32)."""
    from . import vae

    if vae.USE_KERNELS:  # the fused one-pass blend (kandinsky_kernels.ops.tile_blend), same arithmetic
        from kandinsky_kernels.ops.tile_blend import tile_blend_

        tile_blend_(out, tile, dim % out.dim(), start, prev_stop)
        return
    from kandinsky_kernels.reference.vae import tile_blend_ref

    tile_blend_ref(out, tile, dim % out.dim(), start, prev_stop)


def _tiled_2d(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tiles_h, tiles_w,
              in_scale: int, out_scale: int) -> torch.Tensor:
    """Spatial tiling of one temporal tile. ``tiles_*`` in latent units; the input is sliced at
    ``* in_scale`` and the output written at ``* out_scale``."""
    if len(tiles_h) == 1 and len(tiles_w) == 1:
        return fn(x)
    out = None
    prev_h = 0
    for h0, h1 in tiles_h:
        strip = None
        prev_w = 0
        for w0, w1 in tiles_w:
            y = fn(x[..., h0 * in_scale:h1 * in_scale, w0 * in_scale:w1 * in_scale])
            if strip is None:
                width = tiles_w[-1][1] * out_scale
                strip = y.new_empty(*y.shape[:-1], width)
            _stitch(strip, y, -1, w0 * out_scale, prev_w)
            prev_w = w1 * out_scale
            del y
        if len(tiles_h) == 1:
            return strip
        if out is None:
            out = strip.new_empty(*strip.shape[:-2], tiles_h[-1][1] * out_scale, strip.shape[-1])
        _stitch(out, strip, -2, h0 * out_scale, prev_h)
        prev_h = h1 * out_scale
        del strip
    return out


def tiled_encode(vae: "CausalVideoVAE", video: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """Checked video (B, 3, F, H, W) -> moments (B, 2C, t, h, w), tiled by ``cfg`` around ``vae._encode``."""
    r = vae.config.spatial_compression_ratio
    _check_against_model(cfg, r)
    f, hh, ww = video.shape[2:]
    t, h, w = (f - 1) // _TEMPORAL + 1, hh // r, ww // r
    th, tw, o, k, ot = _latent_sizes(cfg, r)
    tiles_h, tiles_w, tiles_t = spatial_tiles(h, th, o), spatial_tiles(w, tw, o), temporal_tiles(t, k, ot)
    if len(tiles_t) == 1:  # spatial tiles only (or none): no temporal stitching copy
        return _tiled_2d(video, vae._encode, tiles_h, tiles_w, r, 1)
    out = None
    prev = 0
    for m, (lead, last) in enumerate(tiles_t):
        clip = video[:, :, lead * _TEMPORAL:last * _TEMPORAL + 1]
        y = _tiled_2d(clip, vae._encode, tiles_h, tiles_w, r, 1)
        if m > 0:
            y = y[:, :, 1:]  # the leading frame's latent
        if out is None:
            out = y.new_empty(*y.shape[:2], t, *y.shape[3:])
        start = 0 if m == 0 else lead + 1
        _stitch(out, y, 2, start, prev)
        prev = last + 1
        del y, clip
    return out


def tiled_decode(vae: "CausalVideoVAE", latents: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """Checked latents (B, C, t, h, w) -> video (B, 3, F, H, W), tiled by ``cfg`` around ``vae._decode``."""
    r = vae.config.spatial_compression_ratio
    _check_against_model(cfg, r)
    t, h, w = latents.shape[2:]
    th, tw, o, k, ot = _latent_sizes(cfg, r)
    tiles_h, tiles_w, tiles_t = spatial_tiles(h, th, o), spatial_tiles(w, tw, o), temporal_tiles(t, k, ot)
    if len(tiles_t) == 1:
        return _tiled_2d(latents, vae._decode, tiles_h, tiles_w, 1, r)
    f = 1 + _TEMPORAL * (t - 1)
    out = None
    prev = 0
    for m, (lead, last) in enumerate(tiles_t):
        y = _tiled_2d(latents[:, :, lead:last + 1], vae._decode, tiles_h, tiles_w, 1, r)
        if m > 0:
            y = y[:, :, 1:]  # the leading latent's frame
        if out is None:
            out = y.new_empty(*y.shape[:2], f, *y.shape[3:])
        start = 0 if m == 0 else lead * _TEMPORAL + 1
        _stitch(out, y, 2, start, prev)
        prev = last * _TEMPORAL + 1
        del y
    return out


def _latent_sizes(cfg: TilingConfig, r: int):
    th = None if cfg.tile_height is None else cfg.tile_height // r
    tw = None if cfg.tile_width is None else cfg.tile_width // r
    k = None if cfg.tile_frames is None else (cfg.tile_frames - 1) // _TEMPORAL
    return th, tw, cfg.spatial_overlap // r, k, cfg.temporal_overlap // _TEMPORAL


def _check_against_model(cfg: TilingConfig, r: int) -> None:
    for name in ("tile_height", "tile_width", "spatial_overlap"):
        v = getattr(cfg, name)
        if v is not None and v % r:
            raise ValueError(
                f"TilingConfig.{name} must be a multiple of the VAE's spatial compression {r}, got {v}"
            )


# ------------------------------------------------------------------------------------------ planner
CPU_DEFAULT_BUDGET_BYTES = 8 * 2**30
"""Budget of ``plan_tiling`` on the CPU when psutil is not installed (with psutil: half of the
available memory). 8 GiB: a laptop-safe figure; pass ``budget_bytes`` for anything else."""

MAX_ELEMENTS = 2**31 - 1
"""On CUDA no single activation of a tile may hold more elements: the int32-indexing limit of several
GPU kernels (Kandinsky 5's planner has the same guard, ``256 * 17 * (h + 32) * (w + 32) < 2**31``; which
kernels still need it in torch 2.13 is not verified here, no GPU). It caps whole 512x768 frames at
21-frame tiles, as Kandinsky 5's 17. Not applied on the CPU."""

# Measured peak / layer count (_stage_units) of the published VAE on the CPU, bf16 and fp32 (oneDNN
# convolutions reorder their input and output), at 9x64x64 and 17x64x96: encode 1.63, decode 1.40
# (the tiny test configs: 1.63, 1.28). Rounded up; _SAFETY on top covers allocator rounding and GPU
# convolution workspaces (unmeasured).
_MEASURED = {"encode": 1.7, "decode": 1.45}
_SAFETY = 1.2
_MIN_SPATIAL_TILE = 256  # HunyuanVideo's tile: less context per tile shows as seams
_MIN_TILE_FRAMES = 17  # diffusers' and Kandinsky 5's temporal tile
_RELAXED = (9, 128)  # second round when nothing fits at those minimums (frames, pixels)
_PLAN_OVERLAP = 64
_PLAN_TEMPORAL_OVERLAP = 4


def _stage_units(config: "CausalVAEConfig", op: str) -> tuple[float, int]:
    """(live channel-equivalents per full-resolution voxel at the worst stage, channels of the
    largest single activation scaled to the full-resolution tile) of one pass, counted from the layers.

    A resnet from ``cin`` to ``cout`` channels holds its input (kept for the residual), the norm output,
    its replicate-padded copy and the conv output (and the shortcut's): ``3 cin + 2 cout``. An upsampler
    holds its input, the upsampled tensor, its padded copy and the output. Counts are channels x the
    voxel fraction of the stage relative to the full-resolution tile. The convolution library's own
    copies (layout reorders) are not counted here; ``_MEASURED`` covers them."""
    ch = tuple(config.block_out_channels)
    prod = lambda s: s[0] * s[1] * s[2]  # noqa: E731

    def resnet(cin: int, cout: int, v: float) -> float:
        return v * (3 * cin + 2 * cout)

    worst = biggest = 0.0
    if op == "encode":
        v, prev = 1.0, ch[0]
        worst = 2 * config.in_channels + ch[0]  # conv_in: input's padded copy, output
        for c, s in zip(ch, config.down_strides):
            worst, biggest = max(worst, resnet(prev, c, v)), max(biggest, v * max(prev, c))
            if s is not None:
                v2 = v / prod(s)
                worst = max(worst, 2 * v * c + v2 * c)
                v = v2
            prev = c
    else:
        rev = tuple(reversed(ch))
        v = 1.0
        for s in config.down_strides:
            if s is not None:
                v /= prod(s)
        prev = rev[0]
        for c, s in zip(rev, config.up_factors):
            worst, biggest = max(worst, resnet(prev, c, v)), max(biggest, v * max(prev, c))
            if s is not None:
                v2 = v * prod(s)
                worst, biggest = max(worst, v * c + 3 * v2 * c), max(biggest, v2 * c)
                v = v2
            prev = c
        worst = max(worst, 3 * rev[-1] + config.out_channels)  # conv_norm_out, conv_out
    return worst, int(math.ceil(biggest))


def estimate_tile_bytes(
    config: "CausalVAEConfig", op: str, batch: int, frames: int, height: int, width: int,
    dtype: torch.dtype, *, clip_frames: int | None = None, clip_height: int | None = None,
    clip_width: int | None = None,
) -> int:
    """Estimated peak bytes of one ``op`` ("encode" | "decode") over a tile of ``frames x height x width``
    pixels (a clip of ``clip_*``, default the tile, for the result buffers).

    = safety x [worst-stage activations (``_stage_units`` x ``_MEASURED``) or the mid-block attention
    (tokens, K, V, one frame of fp32 scores against all keys), whichever is larger] + the output
    buffers (whole clip, and one stitched temporal tile in the output space).

    Calibrated on the CPU (torch profiler allocation events, oneDNN convolutions). Not modelled: CPU
    fp32/fp16 convolutions that PyTorch sends to ``slow_conv3d`` (small channel counts on one thread)
    unfold their input into 27x buffers; GPU convolution workspaces are what the safety factor is for
    (unmeasured: no GPU here)."""
    d = torch.empty((), dtype=dtype).element_size()
    n = batch * frames * height * width
    worst, _ = _stage_units(config, op)
    worst *= _MEASURED[op]
    r, c = config.spatial_compression_ratio, config.block_out_channels[-1]
    hw = (height // r) * (width // r)
    s = ((frames - 1) // _TEMPORAL + 1) * hw
    attn = batch * (5 * s * c * d + 4 * hw * s)
    work = max(worst * n * d, attn)
    cf, ch_, cw = clip_frames or frames, clip_height or height, clip_width or width
    if op == "decode":
        io = batch * config.out_channels * d * (cf * ch_ * cw + frames * ch_ * cw)
    else:
        io = batch * 2 * config.latent_channels * d * ((cf - 1) // _TEMPORAL + 1) * (ch_ // r) * (cw // r) * 2
    return int(_SAFETY * work + io)


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil
    except ImportError:
        return CPU_DEFAULT_BUDGET_BYTES
    return int(psutil.virtual_memory().available // 2)


def _split(length: int, n: int, overlap: int, unit: int) -> int:
    """Tile size (multiple of ``unit``) splitting ``length`` into ``n`` tiles overlapping by ``overlap``."""
    return -(-(length + (n - 1) * overlap) // (n * unit)) * unit


def plan_tiling(
    shape: Sequence[int], dtype: torch.dtype = torch.float32, *, budget_bytes: int | None = None,
    device: str | torch.device | None = None, config: "CausalVAEConfig | None" = None, op: str = "both",
) -> TilingConfig:
    """Tile sizes for encoding/decoding a video of ``shape`` ((B, C, F, H, W) or (F, H, W), pixels)
    within ``budget_bytes`` (default: the device's free memory on CUDA; on the CPU half of psutil's
    available memory, or :data:`CPU_DEFAULT_BUDGET_BYTES` without psutil).

    ``op``: "encode", "decode" or "both" (the stricter of the two, what one config for both needs);
    ``config``: the VAE's (default the published one), whose widths set the memory estimate
    (:func:`estimate_tile_bytes`). Preference order, the first that fits wins:

    1. no tiling (whole clip, whole frames);
    2. whole frames with the FEWEST temporal tiles (longest tiles, split evenly), down to 17 frames:
       each temporal seam repeats a leading frame and the overlap and can blur motion;
    3. spatial tiles (even splits with 64 px overlap, each >= 256 px) with the fewest temporal tiles
       that still fit such tiles, then the fewest spatial tiles;
    4. steps 2-3 again with temporal tiles down to 9 frames and spatial tiles down to 128 px;
    5. nothing fits: that smallest plan, with a warning.
    On CUDA devices every plan also keeps each activation below :data:`MAX_ELEMENTS` elements.
    """
    from .vae import CausalVAEConfig

    if config is None:
        config = CausalVAEConfig()
    if op not in ("encode", "decode", "both"):
        raise ValueError(f"op must be 'encode', 'decode' or 'both', got {op!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    shape = tuple(shape)
    if len(shape) == 3:
        shape = (1, 3) + shape
    if len(shape) != 5 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, F, H, W) or (F, H, W) of positive ints, got {shape!r}")
    b, _, f, hh, ww = shape
    r = config.spatial_compression_ratio
    if (f - 1) % _TEMPORAL or hh % r or ww % r:
        raise ValueError(f"shape must have 1 + 4k frames and H, W multiples of {r}, got {shape!r}")
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda:0'...), got {device!r}") from e
    if budget_bytes is None:
        budget_bytes = _default_budget(dev)
    elif isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes must be None or a positive int, got {budget_bytes!r}")
    ops = ("encode", "decode") if op == "both" else (op,)
    big = max(_stage_units(config, o)[1] for o in ops) if dev.type == "cuda" else 0

    def fits(frames: int, th: int, tw: int) -> bool:
        if big * b * frames * (th + 2) * (tw + 2) > MAX_ELEMENTS:
            return False
        return all(estimate_tile_bytes(config, o, b, frames, th, tw, dtype, clip_frames=f, clip_height=hh,
                                       clip_width=ww) <= budget_bytes for o in ops)

    K = (f - 1) // _TEMPORAL
    ot = _PLAN_TEMPORAL_OVERLAP // _TEMPORAL

    def temporal_options(min_frames: int):
        """(tile_frames or None, frames per tile): 1 tile, then n = 2, 3, ... evenly split tiles while
        they keep >= min_frames."""
        yield None, f
        k_min = (min_frames - 1) // _TEMPORAL
        seen = set()
        for n in range(2, K + 2):
            k = -(-(K + (n - 1) * ot) // n)
            if k < k_min:
                return
            if k < K and k not in seen:
                seen.add(k)
                yield 1 + _TEMPORAL * k, 1 + _TEMPORAL * k

    def spatial_options(min_tile: int):
        """(tile_height or None, tile_width or None, th, tw): even splits with tiles >= min_tile, fewest
        tiles first, then the squarest grid."""
        def axis(length: int):
            out = [(1, None, length)]
            for n in range(2, length // (min_tile - _PLAN_OVERLAP) + 2):
                t = _split(length, n, _PLAN_OVERLAP, r)
                if min_tile <= t < length:
                    out.append((n, t, t))
            return out
        opts = [(nh * nw, abs(nh - nw), cth, ctw, th, tw)
                for nh, cth, th in axis(hh) for nw, ctw, tw in axis(ww) if nh * nw > 1]
        opts.sort(key=lambda o: (o[0], o[1]))
        return [o[2:] for o in opts]

    def make(tile_frames, th=None, tw=None) -> TilingConfig:
        return TilingConfig(tile_height=th, tile_width=tw, spatial_overlap=_PLAN_OVERLAP,
                            tile_frames=tile_frames, temporal_overlap=_PLAN_TEMPORAL_OVERLAP)

    for min_frames, min_tile in ((_MIN_TILE_FRAMES, _MIN_SPATIAL_TILE), _RELAXED):
        # whole frames, fewest temporal tiles first (the first option is the untiled clip)
        for tile_frames, frames in temporal_options(min_frames):
            if fits(frames, hh, ww):
                return make(tile_frames)
        # spatial tiles, fewest temporal tiles first, then fewest spatial tiles
        for tile_frames, frames in temporal_options(min_frames):
            for cth, ctw, th, tw in spatial_options(min_tile):
                if fits(frames, th, tw):
                    return make(tile_frames, cth, ctw)
    min_frames, min_tile = _RELAXED
    small = make(None if f <= min_frames else min_frames, None if hh <= min_tile else min_tile,
                 None if ww <= min_tile else min_tile)
    warnings.warn(
        f"plan_tiling: no tiling of {shape} fits budget_bytes={budget_bytes} ({dtype}); using the "
        f"smallest plan {small}", stacklevel=2,
    )
    return small
