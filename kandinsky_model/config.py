"""Typed configs of the Kandinsky 5.0 CrossDiT (report Table 3 and the official ``dit_params``).

Presets: :func:`video_lite` (2.01 B), :func:`video_pro` (19.3 B), :func:`image_lite` (6.02 B) and
:func:`tiny` (a few hundred thousand parameters, for tests and the CPU example).
:meth:`CrossDiTConfig.from_official_dict` reads an official ``config.json`` (Diffusers layout: flat
keys such as ``model_dim``, ``axes_dims``, ``attention_type``, ``attention_P``) or an official YAML
``model`` section (nested ``dit_params`` and ``attention``).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from ._checks import check_bool, check_choice, check_int, check_ints, check_number

ATTENTION_BACKENDS = ("sdpa", "flash", "flex", "nabla")


@dataclass(kw_only=True, slots=True)
class NablaConfig:
    """NABLA sparse self-attention settings (official ``attention`` section with ``type: nabla``)."""

    threshold: float = 0.9
    """CDF mass ``P`` each query block keeps (official ``P``); 1.0 keeps every block (dense)."""
    window: tuple[int, int, int] = (11, 3, 3)
    """STA window (wT, wH, wW) in blocks, OR-ed into the adaptive mask (official ``wT``, ``wH``, ``wW``)."""
    add_sta: bool = True
    """Union with the STA window. The official kernel always applies it; kept for ablations."""
    block_size: int = 64
    """Tokens per attention block; the fractal tile is its square root (8x8 spatial tiles)."""

    def __post_init__(self) -> None:
        """Raises ValueError naming the field on a bad value."""
        self.threshold = check_number("nabla threshold P", self.threshold, gt=0.0, le=1.0)
        self.window = check_ints("nabla window (wT, wH, wW)", self.window, what="odd positive ints")
        if any(w % 2 == 0 for w in self.window):
            raise ValueError(f"nabla window (wT, wH, wW) must be 3 odd positive ints, got {self.window}")
        check_bool("nabla add_sta", self.add_sta)
        # 16: the granularity of the block-sparse attention kernels.
        check_int("nabla block_size", self.block_size, multiple_of=16)
        tile = math.isqrt(self.block_size)
        if tile * tile != self.block_size:
            raise ValueError(f"nabla block_size must be a square (tile x tile), got {self.block_size}")

    @property
    def tile(self) -> int:
        """Side of the square spatial tile whose tokens form one block (8 for 64)."""
        return math.isqrt(self.block_size)


@dataclass(kw_only=True, slots=True)
class CrossDiTConfig:
    """Hyper-parameters of :class:`kandinsky_model.CrossDiT` (official names where they exist)."""

    in_visual_dim: int = 16
    """Latent channels C of the VAE (16 for HunyuanVideo and FLUX)."""
    out_visual_dim: int = 16
    """Channels of the predicted velocity."""
    in_text_dim: int = 3584
    """Width of the Qwen2.5-VL-7B hidden states."""
    in_text_dim2: int = 768
    """Width of the pooled CLIP ViT-L/14 vector."""
    time_dim: int = 512
    """Width of the conditioning vector that drives every AdaLN."""
    model_dim: int = 1792
    """Token width D."""
    ff_dim: int = 7168
    """Hidden width of the GELU MLPs."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(pt, ph, pw) latent patch; every official model uses (1, 2, 2)."""
    num_text_blocks: int = 2
    """Linguistic Token Refiner blocks."""
    num_visual_blocks: int = 32
    """CrossDiT blocks."""
    axes_dims: tuple[int, int, int] = (16, 24, 24)
    """Head-dim split of the 3-D RoPE over (T, H, W); their sum is the head dim."""
    visual_cond: bool = False
    """Image-to-video conditioning: input has 2C + 1 channels ([noisy | cond | mask])."""
    instruct_type: str | None = None
    """``"channel"`` for the image-editing models (same 2C + 1 channel layout)."""
    attention: str = "sdpa"
    """Default visual self-attention backend: one of ``sdpa``, ``flash``, ``flex``, ``nabla``."""
    nabla: NablaConfig = field(default_factory=NablaConfig)
    """Settings used whenever the ``nabla`` backend runs."""
    rope_theta: float = 10000.0
    """RoPE base (official 10000)."""

    def __post_init__(self) -> None:
        """Raises ValueError naming the field on a bad value; lists become tuples, a dict ``nabla`` a
        :class:`NablaConfig`."""
        for name in ("in_visual_dim", "out_visual_dim", "in_text_dim", "in_text_dim2", "time_dim",
                     "model_dim", "ff_dim", "num_visual_blocks"):
            check_int(name, getattr(self, name))
        check_int("num_text_blocks", self.num_text_blocks, ge=0)
        self.patch_size = check_ints("patch_size (pt, ph, pw)", self.patch_size)  # type: ignore[assignment]
        self.axes_dims = check_ints(  # type: ignore[assignment]
            "axes_dims (T, H, W)", self.axes_dims, what="positive even ints (RoPE rotates pairs)"
        )
        if any(a % 2 for a in self.axes_dims):
            raise ValueError(f"axes_dims (T, H, W) must be 3 positive even ints (RoPE rotates pairs), "
                             f"got {self.axes_dims}")
        if self.model_dim % self.head_dim:
            raise ValueError(
                f"model_dim {self.model_dim} is not a multiple of head_dim = sum(axes_dims) = {self.head_dim}"
            )
        if self.model_dim % 2:
            raise ValueError(f"model_dim must be even (sinusoidal time features), got {self.model_dim}")
        check_bool("visual_cond", self.visual_cond)
        check_choice("instruct_type", self.instruct_type, (None, "channel"))
        check_choice("attention", self.attention, ATTENTION_BACKENDS)
        if isinstance(self.nabla, Mapping):
            self.nabla = NablaConfig(**self.nabla)
        elif not isinstance(self.nabla, NablaConfig):
            raise ValueError(
                f"nabla must be a NablaConfig or a dict of its fields, got {type(self.nabla).__name__}"
            )
        self.rope_theta = check_number("rope_theta", self.rope_theta, gt=0.0)

    # ----------------------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def in_channels(self) -> int:
        """Channels of the model input ``x``: C, or 2C + 1 with visual / instruct conditioning."""
        cond = self.visual_cond or self.instruct_type == "channel"
        return 2 * self.in_visual_dim + 1 if cond else self.in_visual_dim

    def replace(self, **changes: Any) -> "CrossDiTConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- official I/O
    @classmethod
    def from_official_dict(cls, d: Mapping[str, Any]) -> "CrossDiTConfig":
        """Map an official config to ours.

        Accepts the Diffusers ``config.json`` of ``Kandinsky5Transformer3DModel`` (flat keys,
        ``attention_type``/``attention_P``/``attention_wT``...) and the official YAML ``model`` section
        (``dit_params`` plus an ``attention`` dict with ``type``, ``P``, ``wT``, ``wH``, ``wW``). Keys
        starting with ``_`` are metadata; other unknown keys are ignored with a warning.
        Raises ValueError when ``d`` or its ``model``/``dit_params``/``attention`` sections are not
        dicts, or when a value is invalid (see ``__post_init__``).
        """
        def section(name, value):
            if not isinstance(value, Mapping):
                raise ValueError(f"official config{name} must be a dict, got {type(value).__name__}")
            return dict(value)

        d = section("", d)
        if isinstance(d.get("model"), Mapping):  # a whole YAML config
            d = dict(d["model"])
        flat: dict[str, Any] = section(" section 'dit_params'", d.pop("dit_params", None) or {})
        attn: dict[str, Any] = section(" section 'attention'", d.pop("attention", None) or {})
        for k, v in d.items():
            if k.startswith("attention_"):
                attn[k[len("attention_"):]] = v
            else:
                flat[k] = v
        own = {f.name for f in dataclasses.fields(cls)} - {"attention", "nabla"}
        kwargs = {k: v for k, v in flat.items() if k in own}
        ignored = sorted(k for k in flat if k not in own and not k.startswith("_"))
        if ignored:
            warnings.warn(f"CrossDiTConfig.from_official_dict ignores keys {ignored}", stacklevel=2)
        kind = attn.get("type")
        nabla_kwargs: dict[str, Any] = {}
        if attn.get("P") is not None:
            nabla_kwargs["threshold"] = attn["P"]
        window = [attn.get(k) for k in ("wT", "wH", "wW")]
        if any(w is not None for w in window):
            nabla_kwargs["window"] = tuple(window)  # NablaConfig rejects a partial window
        if attn.get("add_sta") is not None:
            nabla_kwargs["add_sta"] = attn["add_sta"]
        if attn.get("method") not in (None, "topcdf"):
            raise ValueError(f"only the 'topcdf' NABLA method exists, got {attn['method']!r}")
        kwargs["nabla"] = NablaConfig(**nabla_kwargs)
        kwargs["attention"] = "nabla" if kind == "nabla" else "sdpa"
        return cls(**kwargs)

    def to_official_dict(self) -> dict[str, Any]:
        """Diffusers-style ``config.json`` content (what :meth:`from_official_dict` reads back)."""
        out = {
            "in_visual_dim": self.in_visual_dim,
            "in_text_dim": self.in_text_dim,
            "in_text_dim2": self.in_text_dim2,
            "time_dim": self.time_dim,
            "out_visual_dim": self.out_visual_dim,
            "patch_size": list(self.patch_size),
            "model_dim": self.model_dim,
            "ff_dim": self.ff_dim,
            "num_text_blocks": self.num_text_blocks,
            "num_visual_blocks": self.num_visual_blocks,
            "axes_dims": list(self.axes_dims),
            "visual_cond": self.visual_cond,
            "attention_type": "nabla" if self.attention == "nabla" else "regular",
            "attention_P": self.nabla.threshold,
            "attention_wT": self.nabla.window[0],
            "attention_wH": self.nabla.window[1],
            "attention_wW": self.nabla.window[2],
            "attention_add_sta": self.nabla.add_sta,
            "attention_method": "topcdf",
        }
        if self.instruct_type is not None:
            out["instruct_type"] = self.instruct_type
        return out


# --------------------------------------------------------------------------------------- presets
def video_lite(**overrides: Any) -> CrossDiTConfig:
    """Kandinsky 5.0 Video Lite (2.01 B): D 1792, 32 blocks, 28 heads of 64, I2V channels as shipped."""
    return CrossDiTConfig(**{
        "model_dim": 1792, "ff_dim": 7168, "time_dim": 512, "num_text_blocks": 2,
        "num_visual_blocks": 32, "axes_dims": (16, 24, 24), "visual_cond": True, **overrides,
    })


def video_pro(**overrides: Any) -> CrossDiTConfig:
    """Kandinsky 5.0 Video Pro (19.3 B): D 4096, 60 blocks, 32 heads of 128."""
    return CrossDiTConfig(**{
        "model_dim": 4096, "ff_dim": 16384, "time_dim": 1024, "num_text_blocks": 4,
        "num_visual_blocks": 60, "axes_dims": (32, 48, 48), "visual_cond": True, **overrides,
    })


def image_lite(**overrides: Any) -> CrossDiTConfig:
    """Kandinsky 5.0 Image Lite (6.02 B, T2I): D 2560, 50 blocks, 20 heads of 128.

    Pass ``instruct_type="channel"`` for the image-editing (I2I) checkpoint.
    """
    return CrossDiTConfig(**{
        "model_dim": 2560, "ff_dim": 10240, "time_dim": 512, "num_text_blocks": 2,
        "num_visual_blocks": 50, "axes_dims": (32, 48, 48), "visual_cond": False, **overrides,
    })


def tiny(**overrides: Any) -> CrossDiTConfig:
    """A test-sized model: D 64, 2 heads of 32, 2 + 2 blocks, small text widths."""
    return CrossDiTConfig(**{
        "model_dim": 64, "ff_dim": 128, "time_dim": 32, "num_text_blocks": 2, "num_visual_blocks": 2,
        "axes_dims": (8, 12, 12), "in_text_dim": 48, "in_text_dim2": 24, "in_visual_dim": 4,
        "out_visual_dim": 4, **overrides,
    })


PRESETS = {"video_lite": video_lite, "video_pro": video_pro, "image_lite": image_lite, "tiny": tiny}


def preset(name: str, **overrides: Any) -> CrossDiTConfig:
    """A preset by name (``video_lite``, ``video_pro``, ``image_lite``, ``tiny``)."""
    try:
        return PRESETS[name](**overrides)
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}") from None
