"""Sampling for the CrossDiT: Euler flow matching, classifier-free guidance, I2V, editing, MagCache.

Official scheme (``generation_utils.generate``):

- times ``t = linspace(1, 0, N + 1)`` warped by the shift ``s``: ``t <- s t / (1 + (s - 1) t)``;
  the model sees ``1000 t`` and predicts the velocity ``v = noise - x0``; Euler steps
  ``x <- x + (t[i+1] - t[i]) v`` (dt < 0; the model never sees t = 0). Shift 5.0 is what the official
  ``test.py`` passes for video (pipelines default to 10.0 for video, 3.0 for images);
- CFG ``v = v_u + w (v_c - v_u)``, the unconditional pass skipped when ``|w - 1| < 1e-6``. Weights:
  5.0 video (sft/pretrain), 1.0 (nocfg/distil, 16 steps for distil), 3.5 images;
- image-to-video (``visual_cond`` models): the clean first-frame latent is written into latent frame 0
  of the noisy channels before every call and after the last step; the 16 ``cond`` channels stay zero
  and the mask channel is 1 on frame 0 (``i2v_cond_channels=True`` also fills the cond channels, the
  Diffusers / SimpleTuner variant). Then, as the official pipeline does, latent frames 0..3 are
  re-normalised towards the statistics of frames 4..8 (:func:`normalize_first_frame`; off with
  ``normalize_first_frame=False``). T2V with a ``visual_cond`` model uses zero cond and mask;
- image editing (``instruct_type="channel"``): [noisy | source latent | ones], zeros without a source.

Text encoders stay outside. The caller passes, per prompt,
- ``text``: the last hidden states of Qwen2.5-VL-7B-Instruct (bf16) for the prompt placed in the
  official system-prompt chat template of the task, tokenised right-padded and truncated to
  ``max_length + crop_start`` tokens, the first ``crop_start`` positions (the template) dropped:
  crop_start 129 (video), 132 (image-to-video), 41 (image), 55 (image edit);
  max_length 256 for video, 512 for images. ``text_mask`` is the matching attention mask (bool);
- ``pooled_text``: the ``pooler_output`` of CLIP ViT-L/14 for the raw caption (77 tokens, padded).
The templates are :data:`PROMPT_TEMPLATES`; :func:`encode_prompt` runs the whole recipe with
``transformers`` models the caller loads (duck-typed, nothing imported or downloaded here). The
official pipelines also rewrite the prompt with Qwen first (prompt expansion, on by default there);
that is left to the caller. The default negative prompt of the video models is
:data:`VIDEO_NEGATIVE_PROMPT` (images use "").

MagCache (``magcache_utils``): per CFG branch, the residual of the visual block stack
(output - input) is cached; a call may reuse it instead of running the blocks when the accumulated
error of the per-call magnitude ratios stays under ``threshold`` for at most ``max_skips``
consecutive calls, never during the first ``retention_ratio`` of calls. Calls are numbered cond/uncond
interleaved (2 per step; without CFG only the cond slots are used). The official per-config ratios
are bundled (:mod:`kandinsky_model.magcache_ratios`, :meth:`MagCacheConfig.official`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ._checks import (
    check_bool, check_choice, check_int, check_ints, check_number, check_numbers, check_tensor,
)
from .config import ATTENTION_BACKENDS
from .dit import CrossDiT
from .magcache_ratios import OFFICIAL_MAG_RATIOS

VIDEO_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
    "deformed, walking backwards"
)
CROP_START = {"video": 129, "image2video": 132, "image": 41, "image_edit": 55}
MAX_TEXT_LENGTH = {"video": 256, "image2video": 256, "image": 512, "image_edit": 512}


def time_grid(num_steps: int, shift: float) -> torch.Tensor:
    """fp64 (N + 1,) official flow-matching times from 1 to 0, warped by ``shift``.

    Raises ValueError unless ``num_steps`` is a positive int and ``shift`` a positive finite number.
    """
    check_int("num_steps", num_steps)
    check_number("shift", shift, gt=0.0)
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def video_rope_scale(height: int, width: int) -> tuple[float, float, float]:
    """RoPE position divisor of the video models for a pixel resolution: (1, 2, 2) for the 512-px (SD)
    family (both sides in 480..854 px, the Diffusers rule), (1, 3.16, 3.16) for 1024-px (HD). Image
    models use (1, 1, 1). Raises ValueError unless both are positive ints."""
    check_int("height", height)
    check_int("width", width)
    sd = 480 <= height <= 854 and 480 <= width <= 854
    return (1.0, 2.0, 2.0) if sd else (1.0, 3.16, 3.16)


# ------------------------------------------------------------------------------------------- MagCache
@dataclass(kw_only=True)
class MagCacheConfig:
    """MagCache settings (official defaults). ``mag_ratios`` are per call, cond/uncond interleaved, as
    listed in the official configs (the leading [1, 1] is added here); a list of another length is
    nearest-interpolated per branch. :func:`calibrate_mag_ratios` measures them for a model."""

    mag_ratios: Sequence[float]
    threshold: float = 0.12
    """Largest accumulated error |1 - prod(ratios)| summed over skipped calls."""
    max_skips: int = 2
    """K: most consecutive skipped calls per branch."""
    retention_ratio: float = 0.2
    """No skipping in the first 20 % of calls."""

    @classmethod
    def official(cls, name: str, **overrides) -> "MagCacheConfig":
        """The settings of the official config ``name`` (a file stem of the official ``configs/``, e.g.
        ``"k5_lite_t2v_5s_sft_sd"``, see :data:`~kandinsky_model.magcache_ratios.OFFICIAL_MAG_RATIOS`):
        its magnitude ratios (calibrated for its ``num_steps``, 50; other step counts are interpolated)
        with the official defaults, any field replaced by ``overrides`` (``threshold=0.2``, ...)."""
        if name not in OFFICIAL_MAG_RATIOS:
            names = ", ".join(sorted(OFFICIAL_MAG_RATIOS))
            raise ValueError(f"unknown MagCache config {name!r}; available: {names}")
        return cls(mag_ratios=OFFICIAL_MAG_RATIOS[name], **overrides)

    def __post_init__(self) -> None:
        """Raises ValueError naming the field on a bad value."""
        ratios = self.mag_ratios
        if not isinstance(ratios, (list, tuple)) or len(ratios) < 2 or len(ratios) % 2:
            got = f"{len(ratios)} values" if isinstance(ratios, (list, tuple)) else type(ratios).__name__
            raise ValueError(f"mag_ratios must be a list of cond/uncond pairs (an even count >= 2), "
                             f"got {got}")
        for i, r in enumerate(ratios):
            check_number(f"mag_ratios[{i}]", r, ge=0.0)  # 0 marks the unused uncond slots of nocfg configs
        self.threshold = check_number("threshold", self.threshold, ge=0.0)
        check_int("max_skips", self.max_skips, ge=0)
        self.retention_ratio = check_number("retention_ratio", self.retention_ratio, ge=0.0, le=1.0)


def _nearest(src: list[float], n: int) -> list[float]:
    if n == 1:
        return [src[-1]]
    step = (len(src) - 1) / (n - 1)
    return [src[int(round(i * step))] for i in range(n)]


class MagCache:
    """MagCache state of one generation of ``num_steps`` steps (``2 num_steps`` call slots)."""

    def __init__(self, config: MagCacheConfig | None, num_steps: int, *, calibrate: bool = False):
        self.config = config
        self.calibrate = calibrate
        self.num_slots = 2 * num_steps
        if config is not None:
            ratios = [1.0, 1.0] + [float(r) for r in config.mag_ratios]
            if len(ratios) != self.num_slots:
                cond, uncond = _nearest(ratios[0::2], num_steps), _nearest(ratios[1::2], num_steps)
                ratios = [r for pair in zip(cond, uncond) for r in pair]
            self.ratios = ratios
        self.acc_ratio = [1.0, 1.0]
        self.acc_err = [0.0, 0.0]
        self.acc_steps = [0, 0]
        self.residual: list[torch.Tensor | None] = [None, None]
        self.skipped = 0
        self.computed = 0
        self.measured: list[float | None] = [None] * self.num_slots

    def should_skip(self, slot: int) -> bool:
        """Decide for call ``slot`` (2 step + branch) and update the accumulators."""
        cfg, b = self.config, slot % 2
        if cfg is None or slot < int(self.num_slots * cfg.retention_ratio):
            return False
        self.acc_ratio[b] *= self.ratios[slot]
        self.acc_steps[b] += 1
        self.acc_err[b] += abs(1.0 - self.acc_ratio[b])
        fits = self.acc_err[b] < cfg.threshold and self.acc_steps[b] <= cfg.max_skips
        if fits and self.residual[b] is not None:
            return True
        self.acc_ratio[b], self.acc_err[b], self.acc_steps[b] = 1.0, 0.0, 0
        return False

    def store(self, slot: int, residual: torch.Tensor) -> None:
        b = slot % 2
        if self.calibrate and self.residual[b] is not None:
            ratio = (residual.float().norm(dim=-1) / self.residual[b].float().norm(dim=-1)).mean().item()
            self.measured[slot] = round(ratio, 5)
        self.residual[b] = residual


def _velocity(model: CrossDiT, x, text, pooled, t, mask, rope_scale, backend, cache: MagCache | None, slot):
    """One model call, the block stack possibly replaced by the cached residual."""
    state = model.prepare(x, text, pooled, t, mask, rope_scale, attention_backend=backend)
    if cache is not None and cache.should_skip(slot):
        h = state.visual + cache.residual[slot % 2]
        cache.skipped += 1
    else:
        h = model.run_visual_blocks(state)
        if cache is not None:
            cache.computed += 1
            cache.store(slot, h - state.visual)
    return model.finish(h, state)


# ------------------------------------------------------------------------------- I2V post-processing
_FIRST_FRAMES = 4  # latent frames re-normalised
_MEAN_BAND = (0.05, 0.1)  # the target mean may move at most 0.05 down / 0.1 up from a frame's own mean
_STD_BAND = (0.1, 0.25)  # the target std at most 0.1 down / 0.25 up from a frame's own std


def normalize_first_frame(
    latents: torch.Tensor, reference_frames: int = 5, clamp_values: bool = False
) -> torch.Tensor:
    """The official image-to-video post-processing: pull the statistics of latent frames 0..3 towards
    those of the frames that follow, within fixed bands (so the clean first frame and the frames right
    after it do not stand out in brightness or contrast after decoding).

    latents   (B, T, H, W, C) float; every sample is treated on its own. Returns a new tensor of the
              same shape and dtype (computed in fp32, or fp64 for fp64 input).

    Per sample, with source frames ``i in [0, 4)`` and the reference
    ``R = frames [4, 4 + min(reference_frames, T - 1))`` (the official bound; the slice is cut at T):

    - ``m_i, s_i``: mean and unbiased std of frame i over (H, W, C);
    - ``M, S``: mean and unbiased std of all elements of R;
    - ``M_i = clamp(M, m_i - 0.05, m_i + 0.1)``, ``S_i = clamp(S, s_i - 0.1, s_i + 0.25)``;
    - ``frame_i <- (frame_i - m_i) / s_i * S_i + M_i``; with ``clamp_values`` the result is then
      clamped to [min R, max R].

    Frames 4.. are returned unchanged. Deviation from the official code: with T <= 4 (no reference
    frame) the input is returned unchanged (the official code does so only for T <= 1 and produces NaN
    for 2 <= T <= 4, from the empty reference). As there, a constant source frame (s_i = 0) gives
    non-finite values. Raises ValueError for a non-float or non-5-D ``latents``, a ``reference_frames``
    that is not a positive int or a non-bool ``clamp_values``.
    """
    check_tensor("latents", latents, ("B", "T", "H", "W", "C"))
    check_int("reference_frames", reference_frames)
    check_bool("clamp_values", clamp_values)
    t_len = latents.shape[1]
    if t_len <= _FIRST_FRAMES:
        return latents.clone()
    x = latents.to(torch.promote_types(latents.dtype, torch.float32), copy=True)
    src = x[:, :_FIRST_FRAMES]
    ref = x[:, _FIRST_FRAMES : _FIRST_FRAMES + min(reference_frames, t_len - 1)].flatten(1)
    dims = (2, 3, 4)
    m = src.mean(dim=dims, keepdim=True)
    s = src.std(dim=dims, keepdim=True)
    ref_m = ref.mean(dim=1).view(-1, 1, 1, 1, 1)
    ref_s = ref.std(dim=1).view(-1, 1, 1, 1, 1)
    target_m = torch.clamp(ref_m, m - _MEAN_BAND[0], m + _MEAN_BAND[1])
    target_s = torch.clamp(ref_s, s - _STD_BAND[0], s + _STD_BAND[1])
    out = (src - m) / s * target_s + target_m
    if clamp_values:
        out = torch.clamp(out, ref.amin(dim=1).view(-1, 1, 1, 1, 1), ref.amax(dim=1).view(-1, 1, 1, 1, 1))
    x[:, :_FIRST_FRAMES] = out
    return x.to(latents.dtype)


_normalize_first_frame = normalize_first_frame  # ``generate`` has a keyword of the same name


# ------------------------------------------------------------------------------------------- helpers
def pack_text(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-prompt text states [(L_i, D)] to (B, max L, D) with a bool mask (B, max L).

    Raises ValueError unless ``embeds`` is a non-empty list of float (L_i >= 1, D) tensors sharing D,
    dtype and device.
    """
    if not isinstance(embeds, (list, tuple)) or not embeds:
        raise ValueError(f"embeds must be a non-empty list of (L_i, D) tensors, got {embeds!r:.100}")
    check_tensor("embeds[0]", embeds[0], ("L_0", "D"))
    for i, e in enumerate(embeds):
        check_tensor(f"embeds[{i}]", e, (f"L_{i}", ("D", embeds[0].shape[1])))
        if (e.dtype, e.device) != (embeds[0].dtype, embeds[0].device):
            raise ValueError(f"embeds[{i}] is {e.dtype} on {e.device}, embeds[0] {embeds[0].dtype} on "
                             f"{embeds[0].device}: they must match")
    length = max(e.shape[0] for e in embeds)
    text = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=embeds[0].device)
    for i, e in enumerate(embeds):
        text[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return text, mask


def _pad_to(text, mask, length):
    b, l, d = text.shape
    if mask is None:
        mask = torch.ones(b, l, dtype=torch.bool, device=text.device)
    if l == length:
        return text, mask
    return (torch.cat([text, text.new_zeros(b, length - l, d)], 1),
            torch.cat([mask, mask.new_zeros(b, length - l)], 1))


def _noise(shape, seed, device) -> torch.Tensor:
    """fp32 Gaussian noise drawn on the CPU (same numbers on every device); ``seed`` an int for the
    batch or one int per sample (so a batch equals its samples generated one by one)."""
    if isinstance(seed, int) or seed is None:
        g = torch.Generator().manual_seed(0 if seed is None else seed)
        return torch.randn(shape, generator=g).to(device)
    draws = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seed]
    return torch.stack(draws).to(device)


def _check_prompt(prefix: str, cfg, b: int, text, pooled, mask) -> None:
    """The ``{prefix}text``, ``{prefix}pooled_text``, ``{prefix}text_mask`` arguments of :func:`generate`."""
    check_tensor(f"{prefix}text", text, (("B", b), "L", ("in_text_dim", cfg.in_text_dim)), finite=True)
    check_tensor(f"{prefix}pooled_text", pooled, (("B", b), ("in_text_dim2", cfg.in_text_dim2)), finite=True)
    if mask is not None:
        check_tensor(f"{prefix}text_mask", mask, (("B", b), ("L", text.shape[1])), kind="mask")
        if not bool(mask.bool().any(-1).all()):  # a sample without text would softmax over nothing
            raise ValueError(f"{prefix}text_mask: every sample needs at least one real (True) text token")


def _check_seed(seed, b: int) -> None:
    def is_seed(s):  # the range torch.Generator.manual_seed takes
        return isinstance(s, int) and not isinstance(s, bool) and -(2**63) <= s < 2**64

    if not (seed is None or is_seed(seed)
            or (isinstance(seed, (list, tuple)) and len(seed) == b and all(map(is_seed, seed)))):
        raise ValueError(f"seed must be None, an int or a list of {b} ints (one per sample), got {seed!r}")


@dataclass
class GenerationResult:
    latent: torch.Tensor
    """fp32 (B, T, H, W, C) clean latent (channels-last, VAE-scaled as the model sees it)."""
    nfe: int
    """Block-stack evaluations per sample (a CFG step counts 2; MagCache skips are not counted)."""
    skipped: int
    """Evaluations MagCache saved."""
    mag_ratios: list[float] | None = field(default=None)
    """Measured per-call magnitude ratios (``calibrate=True``), usable as ``MagCacheConfig.mag_ratios``."""
    video: torch.Tensor | None = field(default=None)
    """With ``vae=``: the decoded video (B, 3, 1 + 4 (T - 1), 8 H, 8 W) in [-1, 1] (the VAE's dtype)."""


@torch.no_grad()
def generate(
    model: CrossDiT,
    text: torch.Tensor,
    pooled_text: torch.Tensor,
    *,
    shape: Sequence[int],
    text_mask: torch.Tensor | None = None,
    negative_text: torch.Tensor | None = None,
    negative_pooled_text: torch.Tensor | None = None,
    negative_text_mask: torch.Tensor | None = None,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    shift: float = 5.0,
    seed: int | Sequence[int] | None = 0,
    noise: torch.Tensor | None = None,
    first_frame: torch.Tensor | None = None,
    i2v_cond_channels: bool = False,
    source_image: torch.Tensor | None = None,
    rope_scale: Sequence[float] = (1.0, 1.0, 1.0),
    attention_backend: str | None = None,
    magcache: MagCacheConfig | None = None,
    calibrate: bool = False,
    cfg_batch: bool = False,
    dtype: torch.dtype | None = None,
    normalize_first_frame: bool = True,
    vae=None,
) -> GenerationResult:
    """Sample latents with the official Euler flow-matching scheme.

    text (B, L, in_text_dim), pooled_text (B, in_text_dim2), text_mask bool (B, L) or None; negative_*
    likewise (negative text may have another length); required when ``guidance_scale != 1``.
    shape         latent grid (T, H, W); T = 1 for text-to-image, (seconds * 24 / 4 + 1) for video
    first_frame   (B, H, W, C) clean latent of the conditioning image (image-to-video)
    normalize_first_frame
                  image-to-video only: after the last step (and the final frame-0 overwrite) apply the
                  official re-normalisation of latent frames 0..3 (:func:`normalize_first_frame`, a
                  no-op for T <= 4); False returns the latent with the clean frame 0 as is
    source_image  (B, H, W, C) latent of the image to edit (``instruct_type="channel"`` models, T = 1)
    seed          int, or one int per sample; ``noise`` (B, T, H, W, C) overrides it
    magcache      skip block-stack evaluations (:class:`MagCacheConfig`); ``calibrate`` measures the
                  magnitude ratios instead (returned in ``GenerationResult.mag_ratios``)
    cfg_batch     run the cond and uncond branches as one batch of 2B (text padded and masked)
    dtype         activation dtype of the model calls (default: the model's parameter dtype; another
                  one only under torch.autocast); the latent state stays fp32
    vae           a :class:`kandinsky_model.CausalVideoVAE` whose latent channels equal the model's
                  output channels: the latent is unscaled (/ ``vae.scaling_factor``) and decoded into
                  ``GenerationResult.video``

    Raises ValueError naming the argument for: tensors of the wrong shape (B from ``text``; L of a
    mask from its text), a non-float dtype or NaN/inf values (a mask must be bool or 0/1 integer,
    with a True per sample); ``num_steps`` not a positive int; ``guidance_scale`` not finite; ``shift``
    not positive and finite; ``shape`` not three positive ints divisible by the patch size;
    ``rope_scale`` not three positive finite numbers; ``seed`` not None, an int or B ints; flags that
    are not bools; an unknown ``attention_backend``; a conditioning input the model cannot take.
    """
    if not isinstance(model, CrossDiT):
        raise ValueError(f"model must be a CrossDiT, got {type(model).__name__}")
    cfg = model.config
    if vae is not None:
        from .vae import CausalVideoVAE

        if not isinstance(vae, CausalVideoVAE):
            raise ValueError(f"vae must be a CausalVideoVAE or None, got {type(vae).__name__}")
        if vae.config.latent_channels != cfg.out_visual_dim:
            raise ValueError(f"vae has {vae.config.latent_channels} latent channels but the model makes "
                             f"{cfg.out_visual_dim}-channel latents")
    param = next(model.parameters())
    device = param.device
    grid = time_grid(num_steps, shift)  # validates both
    guidance_scale = check_number("guidance_scale", guidance_scale)
    rope_scale = check_numbers("rope_scale (T, H, W)", rope_scale)
    t_len, h, w = check_ints("shape (T, H, W)", shape)
    if t_len % cfg.patch_size[0] or h % cfg.patch_size[1] or w % cfg.patch_size[2]:
        raise ValueError(f"shape (T, H, W) = {(t_len, h, w)} must be divisible by the model's patch_size "
                         f"{cfg.patch_size}")
    for name, flag in (("i2v_cond_channels", i2v_cond_channels), ("calibrate", calibrate),
                       ("cfg_batch", cfg_batch), ("normalize_first_frame", normalize_first_frame)):
        check_bool(name, flag)
    if attention_backend is not None:
        check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
    if magcache is not None and not isinstance(magcache, MagCacheConfig):
        raise ValueError(f"magcache must be a MagCacheConfig or None, got {type(magcache).__name__}")
    if dtype is None:
        dtype = param.dtype
    elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")
    elif dtype != param.dtype and not torch.is_autocast_enabled(device.type):
        raise ValueError(f"dtype {dtype} differs from the model's weights ({param.dtype}): cast the model, "
                         "or run under torch.autocast")

    check_tensor("text", text, ("B", "L", ("in_text_dim", cfg.in_text_dim)))
    b = text.shape[0]
    c = cfg.in_visual_dim
    _check_prompt("", cfg, b, text, pooled_text, text_mask)
    use_cfg = abs(guidance_scale - 1.0) >= 1e-6
    if use_cfg and (negative_text is None or negative_pooled_text is None):
        raise ValueError("guidance_scale != 1 needs negative_text and negative_pooled_text")
    if negative_text is not None or negative_pooled_text is not None or negative_text_mask is not None:
        _check_prompt("negative_", cfg, b, negative_text, negative_pooled_text, negative_text_mask)
    if first_frame is not None and not cfg.visual_cond:
        raise ValueError("first_frame (image-to-video) needs a model with visual_cond=True")
    if source_image is not None and cfg.instruct_type != "channel":
        raise ValueError("source_image (editing) needs a model with instruct_type='channel'")
    for name, image in (("first_frame", first_frame), ("source_image", source_image)):
        if image is not None:
            check_tensor(name, image, (("B", b), ("H", h), ("W", w), ("C", c)), finite=True)
    if cfg_batch and (magcache is not None or calibrate):
        raise ValueError("MagCache keeps one residual per branch: use cfg_batch=False with it")

    if noise is not None:
        check_tensor("noise", noise, (("B", b), ("T", t_len), ("H", h), ("W", w), ("C", c)), finite=True)
        x = noise.float().to(device)
    else:
        _check_seed(seed, b)
        x = _noise((b, t_len, h, w, c), seed, device)

    # The conditioning channels are fixed over the whole trajectory.
    extra = None
    if cfg.in_channels != c:
        cond = torch.zeros(b, t_len, h, w, c, device=device)
        mask = torch.zeros(b, t_len, h, w, 1, device=device)
        if first_frame is not None:
            first_frame = first_frame.float().to(device)[:, None]
            mask[:, 0] = 1.0
            if i2v_cond_channels:
                cond[:, :1] = first_frame
        if source_image is not None:
            cond = source_image.float().to(device)[:, None].expand(b, t_len, h, w, c)
            mask = torch.ones_like(mask)
        extra = torch.cat([cond, mask], dim=-1)

    def model_input(x_):
        if first_frame is not None:
            x_ = torch.cat([first_frame, x_[:, 1:]], dim=1)
        return (x_ if extra is None else torch.cat([x_, extra], -1)).to(dtype)

    # branches: (text, pooled, mask) per CFG branch, or both stacked into one batch of 2B
    branches = [(text.to(device, dtype), pooled_text.to(device, dtype), text_mask)]
    if use_cfg:
        neg = (negative_text.to(device, dtype), negative_pooled_text.to(device, dtype), negative_text_mask)
        branches.append(neg)
    if use_cfg and cfg_batch:
        length = max(br[0].shape[1] for br in branches)
        padded = [_pad_to(t_, m_, length) for t_, m_ in ((br[0], br[2]) for br in branches)]
        branches = [(torch.cat([p_[0] for p_ in padded]), torch.cat([br[1] for br in branches]),
                     torch.cat([p_[1] for p_ in padded]))]

    cache = None
    if magcache is not None or calibrate:
        cache = MagCache(magcache, num_steps, calibrate=calibrate)
    nfe = 0
    for i in range(num_steps):
        xin = model_input(x)
        velocities = []
        for j, (txt, pooled, msk) in enumerate(branches):
            n = txt.shape[0] // b  # 2 when both branches are batched
            t_now = torch.full((b * n,), float(grid[i]) * 1000.0, device=device)
            v = _velocity(model, xin.repeat(n, 1, 1, 1, 1), txt, pooled, t_now, msk, rope_scale,
                          attention_backend, cache, 2 * i + j)
            velocities.extend(v.float().chunk(n))
            nfe += n
        v_c = velocities[0]
        v = velocities[1] + guidance_scale * (v_c - velocities[1]) if use_cfg else v_c
        x = x + float(grid[i + 1] - grid[i]) * v
    if first_frame is not None:
        x = torch.cat([first_frame, x[:, 1:]], dim=1)
        if normalize_first_frame:
            x = _normalize_first_frame(x)

    skipped = cache.skipped if cache is not None else 0
    ratios = None
    if calibrate:
        # Slots without a measurement (first call of a branch, unused uncond slots) take their pair's value.
        meas = cache.measured[2:]
        ratios = [m if m is not None else (meas[j ^ 1] if meas[j ^ 1] is not None else 1.0)
                  for j, m in enumerate(meas)]
    video = None
    if vae is not None:
        # the model works on VAE latents times scaling_factor (channels last); the VAE on unscaled ones
        video = vae.decode((x / vae.scaling_factor).permute(0, 4, 1, 2, 3).contiguous())
    return GenerationResult(x, nfe - skipped, skipped, ratios, video)


# ------------------------------------------------------------------------------ text-encoder adapter
# The official Qwen2.5-VL chat templates (lines joined by "\n", the prompt at "{}"; spelling as shipped,
# since every token counts) and how many leading tokens (the system part) are cropped from the output.
PROMPT_TEMPLATES = {
    "video": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Describe the video in detail.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the "
        "objects.",
        "Describe the location of the video, main characters or objects and their action.",
        "Describe the dynamism of the video and presented actions.",
        "Name the visual style of the video: whether it is a professional footage, user generated content, "
        "some kind of animation, video game or scren content.",
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    )),
    "image2video": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Your task is to create a highly detailed and "
        "effective video description based on a provided input image.",
        "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the "
        "objects.",
        "Describe main characters actions.",
        "Describe the dynamism of the video and presented actions.",
        "Name the visual style of the video: whether it is a professional footage, user generated content, "
        "some kind of animation, video game or scren content.",
        "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
        "Pay attention to the order of key actions shown in the scene.<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    )),
    "image": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Describe the image by detailing the color, shape, "
        "size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>",
        "<|im_start|>user\n{}<|im_end|>",
    )),
    # editing appends one "<|vision_start|><|image_pad|><|vision_end|>" per source image, then "<|im_end|>"
    "image_edit": "\n".join((
        "<|im_start|>system\nYou are a promt engineer. Based on the provided source image (first image) and "
        "target image (second image), create an interesting text prompt that can be used together with the "
        "source image to create the target image:<|im_end|>",
        "<|im_start|>user\n{}",
    )),
}


def encode_prompt(
    prompts: Sequence[str],
    *,
    qwen,
    qwen_processor,
    clip,
    clip_tokenizer,
    kind: str = "video",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optional ``transformers`` adapter (text-only kinds) -> (text (B, L, 3584), text_mask bool (B, L),
    pooled (B, 768)), L <= MAX_TEXT_LENGTH[kind].

    ``qwen`` a Qwen2.5-VL-7B-Instruct model with its processor, ``clip`` a CLIP ViT-L/14 text model
    with its tokenizer, all loaded by the caller (nothing here downloads). The prompt goes into
    ``PROMPT_TEMPLATES[kind]``, is tokenised right-padded to the longest prompt and truncated to
    ``MAX_TEXT_LENGTH[kind] + CROP_START[kind]`` tokens; the last hidden states lose their first
    ``CROP_START[kind]`` positions. CLIP sees the raw prompt (77 tokens, padded). Raises ValueError for
    an unknown ``kind`` or ``prompts`` that is not a non-empty list of strings (a bare string included).
    """
    check_choice("kind", kind, tuple(PROMPT_TEMPLATES))
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.100}")
    crop = CROP_START[kind]
    texts = [PROMPT_TEMPLATES[kind].format(p) for p in prompts]
    tok = qwen_processor(text=texts, padding=True, truncation=True, max_length=MAX_TEXT_LENGTH[kind] + crop,
                         return_tensors="pt")
    device = next(qwen.parameters()).device
    with torch.no_grad():
        out = qwen(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device),
                   output_hidden_states=True)
        ctok = clip_tokenizer(list(prompts), padding="max_length", truncation=True, max_length=77,
                              return_tensors="pt")
        pooled = clip(**{k: v.to(next(clip.parameters()).device) for k, v in ctok.items()}).pooler_output
    text = out.hidden_states[-1][:, crop:]
    mask = tok["attention_mask"][:, crop:].to(device=device, dtype=torch.bool)
    return text, mask, pooled
