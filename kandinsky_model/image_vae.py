"""The 2-D image VAE of Kandinsky 5.0 image models: FLUX.1-dev's ``AutoencoderKL``, wrapped.

Image models encode into FLUX.1-dev's 16-channel latent space (8x spatial compression). The network is
diffusers' ``AutoencoderKL``, an optional dependency imported only when a :class:`FluxImageVAE` is
built (``pip install "diffusers==0.42.1"``, the version the tests pin). This module adds the published
config, the same input checks and latent convention as :class:`~kandinsky_model.CausalVideoVAE`
(``encode`` returns unscaled latents; :meth:`FluxImageVAE.normalize` / :meth:`FluxImageVAE.denormalize`
apply FLUX's shift and scale around the diffusion model), and a local-folder loader.

Named dims: B batch, H x W pixels (multiples of the compression, 8 at the published config); latents
(B, 16, H/8, W/8).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ._checks import check_bool
from .vae import check_vae_input

__all__ = ["FLUX_DEV_VAE_CONFIG", "FluxImageVAE"]

FLUX_DEV_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
"""``vae/config.json`` of black-forest-labs/FLUX.1-dev (diffusers ``AutoencoderKL`` keys): 16 latent
channels, no quant / post-quant 1x1 convs, latents normalised as ``(z - 0.1159) * 0.3611``."""

_PIP_SPEC = "diffusers==0.42.1"


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            f"FluxImageVAE wraps diffusers' AutoencoderKL, an optional dependency: pip install "
            f"\"{_PIP_SPEC}\" (the version the tests pin) ({e})"
        ) from e
    return AutoencoderKL


class FluxImageVAE(nn.Module):
    """FLUX.1-dev's image VAE (diffusers ``AutoencoderKL``, in :attr:`model`) with Kandinsky's checks.

    >>> vae = FluxImageVAE.from_pretrained("/path/to/FLUX.1-dev/vae")   # or FluxImageVAE() (random)
    >>> z = vae.encode(images)          # (B, 3, H, W) in [-1, 1] -> unscaled latents (B, 16, H/8, W/8)
    >>> x = vae.decode(z)               # and back (not clamped)
    >>> zn = vae.normalize(z)           # (z - shift) * scale: what the diffusion model sees

    ``config``: a dict of ``AutoencoderKL`` keyword arguments; missing keys take the FLUX.1-dev values
    (:data:`FLUX_DEV_VAE_CONFIG`), so tests pass a few small widths only. Weights and inputs may be
    fp32, bf16 or fp16; inputs are cast to the weights' dtype. diffusers' own switches (tiling,
    slicing) stay on :attr:`model`.
    """

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"config must be None or a dict of AutoencoderKL arguments, got {type(config).__name__}")
        cls = _autoencoder_kl()
        full = copy.deepcopy(FLUX_DEV_VAE_CONFIG)
        full.update(dict(config or {}))
        try:
            model = cls(**full)
        except TypeError as e:  # an unknown key
            raise ValueError(f"config is not valid for diffusers' AutoencoderKL: {e}") from e
        self.model = model

    @classmethod
    def _wrap(cls, model) -> "FluxImageVAE":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.model = model
        return self

    # ------------------------------------------------------------------------------- properties
    @property
    def config(self):
        """The wrapped ``AutoencoderKL``'s config (a frozen dict)."""
        return self.model.config

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """0.1159 at FLUX.1-dev; 0 where the config has none."""
        return float(self.model.config.shift_factor or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def spatial_compression_ratio(self) -> int:
        """H and W shrink by this: 2 per down block but the last (8 at FLUX.1-dev)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------------- encode/decode
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of :attr:`spatial_compression_ratio` ->
        unscaled latents (B, 16, H/8, W/8): the posterior mean, or with ``sample=True`` a draw from
        ``generator``. Raises ValueError naming the problem for a wrong rank, channel count or size, a
        non-float dtype, a device other than the weights', or a bad ``sample`` / ``generator``."""
        check_bool("sample", sample)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        images = self._check("images", images, int(self.model.config.in_channels), pixels=True)
        dist = self.model.encode(images).latent_dist
        return dist.sample(generator=generator) if sample else dist.mode()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 16, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped).
        Raises ValueError for a wrong rank or channel count, an empty dimension, a non-float dtype or a
        device other than the weights'."""
        latents = self._check("latents", latents, self.latent_channels, pixels=False)
        return self.model.decode(latents).sample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(images))``."""
        return self.decode(self.encode(images))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> the diffusion model's space: ``(z - shift_factor) * scaling_factor``."""
        return (latents - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: ``z / scaling_factor + shift_factor``."""
        return latents / self.scaling_factor + self.shift_factor

    def _check(self, name: str, x, channels: int, *, pixels: bool) -> torch.Tensor:
        spec = f"(B, {channels}, H, W)" if pixels else f"(B, {channels}, h, w)"
        frames = isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[2] == 1
        hint = " (a video frame batch (B, C, 1, H, W): pass x[:, :, 0])" if frames else ""
        x = check_vae_input(name, x, spec, channels, 4, hint, self.device, self.dtype)
        if pixels:
            s = self.spatial_compression_ratio
            h, w = x.shape[2:]
            if h % s or w % s:
                raise ValueError(f"{name} height and width must be multiples of {s}, got H={h}, W={w}")
        return x

    # ------------------------------------------------------------------------------ construction
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the Diffusers layout (``config.json`` + ``diffusion_pytorch_model.safetensors``) with
        diffusers' own writer; returns the folder."""
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.model.save_pretrained(path)
        return Path(path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    ) -> "FluxImageVAE":
        """Load a local folder in the Diffusers layout (``config.json`` + safetensors, e.g. FLUX.1-dev's
        ``vae/``; a pipeline folder holding ``vae/`` works too). Never downloads: a hub id is refused.
        ``dtype`` casts the weights (default: float32, diffusers' default).

        Raises FileNotFoundError for a missing folder or config.json, ValueError for a bad argument or
        a checkpoint that does not fit its config (diffusers' message, naming the folder)."""
        from .dit import _check_load_args

        device = _check_load_args(path, dtype, device)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no image VAE folder at {path} (from_pretrained reads local Diffusers-layout folders only; "
                f"download the weights yourself)"
            )
        if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
            path = path / "vae"
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json (nor a vae/ subfolder with one)")
        auto = _autoencoder_kl()
        try:
            model = auto.from_pretrained(str(path), local_files_only=True,
                                         **({"torch_dtype": dtype} if dtype is not None else {}))
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"{path}: diffusers' AutoencoderKL cannot load it: {e}") from e
        return cls._wrap(model.to(device).eval())
