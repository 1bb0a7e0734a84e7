"""kandinsky_model: the lean Kandinsky 5.0 CrossDiT that consumes the kernels of ``kandinsky_kernels``.

- :class:`CrossDiT` with typed configs (:func:`video_lite`, :func:`video_pro`, :func:`image_lite`,
  :func:`tiny`), official state_dict names, ``from_pretrained`` for local Diffusers-layout folders or
  bare safetensors files, attention backends ``sdpa``/``flash``/``flex``/``nabla`` switchable at run time;
- :class:`CausalVideoVAE`: the HunyuanVideo causal 3-D VAE (plain torch) that maps videos to and from
  the 16-channel latents, loading published weights unchanged; tiled by :class:`TilingConfig` or by
  :func:`plan_tiling` from the shape, dtype and free memory;
- :class:`FluxImageVAE`: the FLUX.1-dev 2-D VAE of the image models (diffusers' ``AutoencoderKL``,
  an optional dependency imported when one is built);
- :func:`generate`: Euler flow matching with the official shift, CFG, image-to-video, editing and
  MagCache (:class:`MagCacheConfig`, with the official per-config ratios through
  ``MagCacheConfig.official(name)``); text encoders stay with the caller.

``python -m kandinsky_model`` runs a tiny random model end to end on the CPU.
"""
from .config import CrossDiTConfig, NablaConfig, image_lite, preset, tiny, video_lite, video_pro
from .dit import CrossDiT
from .image_vae import FLUX_DEV_VAE_CONFIG, FluxImageVAE
from .vae import CausalVAEConfig, CausalVideoVAE
from .vae_tiling import TilingConfig, plan_tiling
from .sampler import (
    GenerationResult, MagCacheConfig, generate, normalize_first_frame, pack_text, time_grid, video_rope_scale,
)

__all__ = [
    "CausalVAEConfig", "CausalVideoVAE", "CrossDiT", "CrossDiTConfig", "FLUX_DEV_VAE_CONFIG", "FluxImageVAE", "GenerationResult", "MagCacheConfig", "NablaConfig", "generate",
    "image_lite", "normalize_first_frame", "pack_text", "plan_tiling", "preset", "time_grid", "tiny", "TilingConfig", "video_lite", "video_pro", "video_rope_scale",
]
