"""The CrossDiT of Kandinsky 5.0 (official ``DiffusionTransformer3D``), batched, backend-switchable.

Forward (``CrossDiT.forward``), named dims B batch, (T, H, W) latent grid, C channels, L text tokens:

1. text (B, L, 3584) -> Linear + LayerNorm -> (B, L, D); timestep (B,) -> sinusoid + MLP (fp32) plus the
   pooled CLIP vector (B, 768) -> Linear + LayerNorm: the conditioning vector (B, E);
2. the Linguistic Token Refiner blocks refine the text (1-D RoPE, padding keys masked);
3. latents (B, T, H, W, C) -> (1, 2, 2) patches -> tokens on the grid (T, H/2, W/2) with a 3-D RoPE;
   tokens are flattened row-major, or fractally (8x8 tiles, padded) for the ``nabla`` backend;
4. the CrossDiT blocks; 5. un-flatten, modulated output layer, unpatchify -> velocity (B, T, H, W, C_out).

The stages are exposed (:meth:`CrossDiT.prepare`, :meth:`CrossDiT.run_visual_blocks`,
:meth:`CrossDiT.finish`) so the sampler's MagCache can skip the block stack. The model never imports
``torch.distributed``; ``training/`` applies parallelism and per-block ``torch.compile`` from outside.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import kandinsky_kernels as kk

from ._checks import check_bool, check_choice, check_int, check_number, check_numbers, check_tensor
from .attention import AttentionContext, NablaState, Packing
from .config import ATTENTION_BACKENDS, CrossDiTConfig, preset
from .nn import (
    OutLayer,
    TextEmbeddings,
    TimeEmbeddings,
    TransformerDecoderBlock,
    TransformerEncoderBlock,
    VisualEmbeddings,
)
from .rope import rope_cos_sin, text_rope_angles, visual_rope_angles


@dataclass
class ForwardState:
    """Everything the block stack and the output layer need, computed once per forward (``prepare``)."""

    visual: torch.Tensor
    """(B, S, D) visual tokens before the blocks (row-major or fractal order; S counts pad tokens)."""
    text: torch.Tensor
    """(B, L, D) refined text."""
    time_embed: torch.Tensor
    """fp32 (B, E) conditioning vector, or per latent frame (1, T', E) for packed videos."""
    rope: tuple[torch.Tensor, torch.Tensor]
    """(cos, sin) fp32 (1, S, 1, Dh/2) in the token order of ``visual``."""
    ctx: AttentionContext
    grid: tuple[int, int, int]
    """(T', H', W') token grid."""
    fractal: bool
    """Whether ``visual`` is in fractal order (the ``nabla`` backend)."""
    video_time_embed: torch.Tensor | None = None
    """Packed videos: fp32 (n, E), one conditioning vector per video (``time_embed`` is its per-frame
    expansion); None otherwise."""


class CrossDiT(nn.Module):
    """Kandinsky 5.0 CrossDiT. State-dict keys and shapes equal the official checkpoints'.

    ``attention_backend`` (``sdpa``, ``flash``, ``flex``, ``nabla``) is a plain attribute, changeable
    at any time, and can be overridden per call.
    """

    def __init__(self, config: CrossDiTConfig, *, attention_backend: str | None = None):
        if not isinstance(config, CrossDiTConfig):
            raise ValueError(f"config must be a CrossDiTConfig (e.g. kandinsky_model.video_lite()), "
                             f"got {type(config).__name__}")
        super().__init__()
        c = config
        self.config = c
        self.attention_backend = attention_backend or c.attention
        self.time_embeddings = TimeEmbeddings(c.model_dim, c.time_dim)
        self.text_embeddings = TextEmbeddings(c.in_text_dim, c.model_dim)
        self.pooled_text_embeddings = TextEmbeddings(c.in_text_dim2, c.time_dim)
        self.visual_embeddings = VisualEmbeddings(c.in_channels, c.model_dim, c.patch_size)
        self.text_transformer_blocks = nn.ModuleList(
            TransformerEncoderBlock(c.model_dim, c.time_dim, c.ff_dim, c.head_dim)
            for _ in range(c.num_text_blocks)
        )
        self.visual_transformer_blocks = nn.ModuleList(
            TransformerDecoderBlock(c.model_dim, c.time_dim, c.ff_dim, c.head_dim)
            for _ in range(c.num_visual_blocks)
        )
        self.out_layer = OutLayer(c.model_dim, c.time_dim, c.out_visual_dim, c.patch_size)

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
        self._attention_backend = name

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        pooled_text: torch.Tensor,
        timestep: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        rope_scale: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        attention_backend: str | None = None,
        cu_frames: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity prediction.

        x           (B, T, H, W, C_in) latents, channels-last (C_in = C or 2C + 1 with conditioning)
        text        (B, L, in_text_dim) Qwen2.5-VL hidden states (template tokens already cropped)
        pooled_text (B, in_text_dim2) CLIP pooled vector
        timestep    (B,) or scalar, official scale 1000 t (t = 1 is pure noise)
        text_mask   bool (B, L), True on real tokens; None means all real
        rope_scale  per-axis RoPE position divisor (T, H, W), three positive numbers, e.g. (1, 2, 2) for
                    512-px video
        returns     (B, T, H, W, C_out) in the dtype of ``x``

        cu_frames   packed videos: n + 1 increasing latent-frame offsets from 0 to T (ints or an int
                    tensor), each video a multiple of the temporal patch size. x is then (1, T, H, W, C)
                    holding n videos one after the other along T, and text, pooled_text, timestep
                    and text_mask have one row per video (n). Each video gets its own timestep, text
                    and RoPE positions (starting at its first frame), and attends to nothing of the
                    others: the result equals running the videos one by one (training packs clips to
                    a frame budget this way; NABLA runs with ``cu_seqlens``).

        ``x``, ``text`` and ``pooled_text`` must be on the weights' device and ``x`` in the weights' dtype
        (unless autocast is on); ``text`` and ``pooled_text`` may be any float dtype (cast to ``x``'s),
        ``timestep`` and ``text_mask`` any device. T, H, W must be multiples of the patch size.
        Raises ValueError naming the argument, with its shape or dtype and what is expected.
        """
        state = self.prepare(
            x, text, pooled_text, timestep, text_mask, rope_scale, attention_backend=attention_backend,
            cu_frames=cu_frames,
        )
        return self.finish(self.run_visual_blocks(state), state)

    def prepare(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        pooled_text: torch.Tensor,
        timestep: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        rope_scale: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        attention_backend: str | None = None,
        record_masks: list | None = None,
        cu_frames: Sequence[int] | torch.Tensor | None = None,
    ) -> ForwardState:
        """Embeddings, the text refiner and the token layout (everything before the CrossDiT blocks).

        Arguments as in :meth:`forward`; raises the same ValueErrors.
        """
        c = self.config
        backend = attention_backend or self.attention_backend
        frames = None if cu_frames is None else self._check_cu_frames(cu_frames, x)
        timestep, text_mask, rope_scale = self._check_inputs(
            x, text, pooled_text, timestep, text_mask, rope_scale, backend, record_masks,
            batch=None if frames is None else len(frames) - 1,
        )
        dtype = x.dtype

        # 1. conditioning vector and text
        pooled = self.pooled_text_embeddings(pooled_text.to(dtype)).float()
        time_embed = self.time_embeddings(timestep) + pooled  # fp32 (B, E), drives every AdaLN
        text_embed = self.text_embeddings(text.to(dtype))
        ctx = AttentionContext(backend="sdpa" if backend == "nabla" else backend, text_mask=text_mask)
        text_angles = text_rope_angles(text.shape[1], c.head_dim, c.rope_theta, x.device)
        text_rope = rope_cos_sin(text_angles[None, :, None])
        for block in self.text_transformer_blocks:
            text_embed = block(text_embed, time_embed, text_rope, ctx)

        # 2. visual tokens and the 3-D RoPE on the token grid (per video: positions restart at each
        # video's first frame)
        visual = self.visual_embeddings(x)  # (B, T', H', W', D)
        grid = tuple(visual.shape[1:4])
        pt = c.patch_size[0]
        video_frames = [(b - a) // pt for a, b in zip(frames[:-1], frames[1:])] if frames else [grid[0]]
        # (T', H', W', Dh/2)
        angles = torch.cat([visual_rope_angles((n, *grid[1:]), c.axes_dims, rope_scale, c.rope_theta, x.device)
                            for n in video_frames], dim=0)
        fractal = backend == "nabla"
        if fractal:
            visual, angles, nabla = self._fractal_layout(visual, angles, record_masks)
            ctx = AttentionContext(backend="nabla", text_mask=text_mask, nabla=nabla)
        else:
            visual = visual.flatten(1, 3)
            angles = angles.flatten(0, 2)
        rope = rope_cos_sin(angles[None, :, None])
        video_time_embed = None
        if frames is not None:
            per_frame = visual.shape[1] // grid[0]  # tokens of one latent frame (padded in fractal order)
            cu_tokens = tuple(f // pt * per_frame for f in frames)
            ctx.packing = Packing(cu_tokens, torch.tensor(cu_tokens, dtype=torch.int32, device=x.device))
            video_time_embed = time_embed
            owner = torch.repeat_interleave(torch.arange(len(video_frames), device=x.device),
                                            torch.tensor(video_frames, device=x.device))
            time_embed = video_time_embed[owner][None]  # (1, T', E)
        return ForwardState(visual, text_embed, time_embed, rope, ctx, grid, fractal, video_time_embed)

    def _check_cu_frames(self, cu_frames, x) -> list[int]:
        """``cu_frames`` -> n + 1 Python ints, or ValueError saying what packed input needs."""
        if isinstance(cu_frames, torch.Tensor):
            if cu_frames.dim() != 1 or cu_frames.dtype.is_floating_point or cu_frames.dtype == torch.bool:
                raise ValueError(f"cu_frames must be a 1-D integer tensor or a sequence of ints, got "
                                 f"{cu_frames.dtype} of shape {tuple(cu_frames.shape)}")
            cu_frames = cu_frames.tolist()
        if (not isinstance(cu_frames, (list, tuple)) or len(cu_frames) < 2
                or not all(isinstance(f, int) and not isinstance(f, bool) for f in cu_frames)):
            raise ValueError(f"cu_frames must hold n + 1 >= 2 ints (latent-frame offsets of the packed "
                             f"videos), got {cu_frames!r:.200}")
        frames = list(cu_frames)
        if x.dim() != 5 or x.shape[0] != 1:
            raise ValueError(f"packed videos (cu_frames) need x of shape (1, T, H, W, C), got "
                             f"{tuple(x.shape)}")
        pt = self.config.patch_size[0]
        t = x.shape[1]
        if frames[0] != 0 or frames[-1] != t:
            raise ValueError(f"cu_frames must start at 0 and end at T = {t} (x's frames), got {frames}")
        for a, b in zip(frames[:-1], frames[1:]):
            if b <= a or (b - a) % pt:
                raise ValueError(f"cu_frames must increase by multiples of the temporal patch size {pt} "
                                 f"(every video non-empty), got {frames}")
        return frames

    def _check_inputs(self, x, text, pooled_text, timestep, text_mask, rope_scale, backend, record_masks,
                      batch=None):
        """Boundary checks of :meth:`prepare` -> (timestep (B,), text_mask bool (B, L) or None, rope_scale).
        ``batch``: rows of the conditioning inputs when they differ from x's batch (n packed videos).

        Shapes, dtypes and devices are static under torch.compile; the value checks (finite timestep,
        a real token per sample, rope_scale values) read data or Python numbers that Dynamo may turn
        into symbols, so they run only in eager mode.
        """
        c = self.config
        check_choice("attention_backend", backend, ATTENTION_BACKENDS)
        check_tensor("x", x, ("B", "T", "H", "W", ("C_in", c.in_channels)))
        weight = self.visual_embeddings.in_layer.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model's weights are on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"x has dtype {x.dtype} but the model's weights are {weight.dtype}: pass x in "
                f"{weight.dtype} (or run under torch.autocast)"
            )
        xb, *grid = x.shape[:4]
        b = xb if batch is None else batch
        if any(n % p for n, p in zip(grid, c.patch_size)):
            raise ValueError(
                f"x has latent grid (T, H, W) = {tuple(grid)} (shape {tuple(x.shape)}), which is not "
                f"divisible by patch_size {c.patch_size}"
            )
        check_tensor("text", text, (("B", b), "L", ("in_text_dim", c.in_text_dim)))
        check_tensor("pooled_text", pooled_text, (("B", b), ("in_text_dim2", c.in_text_dim2)))
        for name, t in (("text", text), ("pooled_text", pooled_text)):
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if isinstance(timestep, torch.Tensor):
            if timestep.shape not in ((), (1,), (b,)):
                raise ValueError(f"timestep must be a scalar or of shape (B,) = ({b},), got shape "
                                 f"{tuple(timestep.shape)}")
            check_tensor("timestep", timestep.reshape(-1), ("B",), kind="real")
        elif not torch.compiler.is_compiling():
            check_number("timestep (a number, or a (B,) tensor)", timestep)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        if text_mask is not None:
            check_tensor("text_mask", text_mask, (("B", b), ("L", text.shape[1])), kind="mask")
            text_mask = text_mask.to(device=x.device, dtype=torch.bool)
        if not isinstance(rope_scale, (list, tuple)) or len(rope_scale) != 3:
            raise ValueError(f"rope_scale must be 3 positive finite numbers (T, H, W), got {rope_scale!r}")
        if record_masks is not None and not isinstance(record_masks, list):
            raise ValueError(f"record_masks must be a list or None, got {type(record_masks).__name__}")
        if not torch.compiler.is_compiling():
            rope_scale = check_numbers("rope_scale (T, H, W)", rope_scale)
            if not bool(torch.isfinite(timestep).all()):
                raise ValueError(f"timestep holds NaN or infinite values: {timestep.tolist()}")
            if text_mask is not None and not bool(text_mask.any(-1).all()):
                # a sample without text would softmax over nothing
                raise ValueError("text_mask: every sample needs at least one real (True) text token")
        return timestep, text_mask, rope_scale

    def _fractal_layout(self, visual, angles, record):
        """Fractal order (8x8 tiles, zero-padded) for tokens and RoPE angles, and the per-forward NABLA
        state: the STA block mask of the grid and the pad-token flags. visual (B, T', H', W', D),
        angles (T', H', W', Dh/2) -> (B, S, D), (S, Dh/2), NablaState; pad tokens get angle 0."""
        nc = self.config.nabla
        t = visual.shape[1]
        visual, layout = kk.fractal_flatten(visual, nc.tile, return_layout=True)
        angles = kk.fractal_flatten(angles[None], nc.tile)[0]
        token_valid = layout.token_valid(visual.device) if layout.is_padded else None
        sta = None
        if nc.add_sta:
            sta = kk.sta_block_mask(t, layout.h_tiles, layout.w_tiles, window=nc.window, device=visual.device)
        state = NablaState(nc.threshold, nc.block_size, sta, token_valid, record)
        return visual, angles, state

    def run_visual_blocks(self, state: ForwardState) -> torch.Tensor:
        """The CrossDiT block stack: (B, S, D) -> (B, S, D)."""
        h = state.visual
        for block in self.visual_transformer_blocks:
            h = block(h, state.text, state.time_embed, state.rope, state.ctx)
        return h

    def finish(self, visual: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """Undo the token layout, output layer, unpatchify: (B, S, D) -> (B, T, H, W, C_out) (time
        embedding per frame for packed videos)."""
        b, _, d = visual.shape
        t, h, w = state.grid
        if state.fractal:
            visual = kk.fractal_unflatten(visual, state.grid, tile=self.config.nabla.tile)
        else:
            visual = visual.view(b, t, h, w, d)
        return self.out_layer(visual, state.time_embed)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def on_meta(cls, config: CrossDiTConfig, **kwargs: Any) -> "CrossDiT":
        """The model on the meta device: shapes and keys without memory (counting, FSDP, loading)."""
        with torch.device("meta"):
            return cls(config, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
        """Write the Diffusers layout: ``config.json`` (official keys) and
        ``diffusion_pytorch_model.safetensors``, or numbered shards plus an index JSON when
        ``max_shard_bytes`` (a positive int) is given."""
        if max_shard_bytes is not None:
            check_int("max_shard_bytes", max_shard_bytes)
        cfg = {"_class_name": "Kandinsky5Transformer3DModel", **self.config.to_official_dict()}
        return _save_diffusers_folder(path, cfg, self.state_dict(), max_shard_bytes)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: CrossDiTConfig | str | Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        strict: bool = True,
        attention_backend: str | None = None,
    ) -> "CrossDiT":
        """Load official weights from local files (no download code).

        ``path`` is either
          - a folder in the published Diffusers layout (``config.json`` with the official keys plus one
            ``*.safetensors`` file or shards with a ``*.safetensors.index.json``), or a pipeline folder
            holding such a ``transformer/`` subfolder; or
          - a bare official ``.safetensors`` file, with ``config`` a preset name (``"video_lite"``...),
            an official config dict, a ``config.json`` path or a :class:`CrossDiTConfig`.
        ``config`` overrides the folder's ``config.json`` when given. ``dtype`` casts the weights
        (default: keep the checkpoint's).

        Raises FileNotFoundError for a missing ``path``, config file or shard, and ValueError naming
        the file for a malformed ``config.json`` or index (not a JSON object, no ``weight_map`` of
        shard file names), an unreadable safetensors file, a key stored in two shards, and
        keys that do not fit the config: mis-shaped or non-float keys always, missing and unexpected
        keys with ``strict=True`` (with ``strict=False`` missing weights keep their fresh
        initialisation and unexpected ones are dropped); ValueError naming the argument for a bad
        ``config``, ``dtype``, ``device``, ``strict`` or ``attention_backend``.
        """
        device = _check_load_args(path, dtype, device)
        check_bool("strict", strict)
        if attention_backend is not None:
            check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        path = Path(path)
        files, folder_cfg = _find_checkpoint(path)
        cfg = _resolve_config(config if config is not None else folder_cfg, path)
        model = cls.on_meta(cfg, attention_backend=attention_backend)
        expected = {k: v.shape for k, v in model.state_dict().items()}

        sd, origin = _read_safetensors(files, device, dtype)
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(f"{k} (in {origin[k]})" for k in set(sd) - set(expected))
        mismatched = sorted(
            f"{k} (in {origin[k]}): checkpoint {tuple(sd[k].shape)} {sd[k].dtype} "
            f"vs model {tuple(expected[k])}"
            for k in set(sd) & set(expected) if sd[k].shape != expected[k] or not sd[k].is_floating_point()
        )
        if mismatched or (strict and (missing or unexpected)):
            raise ValueError(_mismatch_message(path, "the CrossDiT config", missing, unexpected, mismatched))
        if missing:  # non-strict: materialise the fresh init for what the checkpoint lacks
            model = cls(cfg, attention_backend=attention_backend).to(device=device, dtype=dtype)
            model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
            return model
        model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=True, assign=True)
        return model


_WEIGHTS = "diffusion_pytorch_model"


def _save_diffusers_folder(path, config: dict, state_dict: Mapping[str, torch.Tensor],
                           max_shard_bytes: int | None) -> Path:
    """``config.json`` plus ``diffusion_pytorch_model.safetensors``, or numbered shards of at most
    ``max_shard_bytes`` (a tensor larger than that gets a shard alone) with an index JSON: the layout
    Diffusers and our ``from_pretrained`` read. Returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if max_shard_bytes is None:
        save_file(sd, str(path / f"{_WEIGHTS}.safetensors"))
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{_WEIGHTS}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    (path / f"{_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def _check_load_args(path, dtype, device) -> torch.device:
    """The common arguments of the ``from_pretrained`` loaders (ValueError naming a bad one) -> device."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda:0'...), got {device!r}") from e


def _mismatch_message(path, what: str, missing, unexpected, mismatched, show: int = 20) -> str:
    """One message listing every missing, unexpected and mis-shaped key (``what``: the model config)."""
    def part(name, keys):
        more = f" ... and {len(keys) - show} more" if len(keys) > show else ""
        return f"\n  {len(keys)} {name}: {keys[:show]}{more}"

    msg = f"checkpoint {str(path)!r} does not match {what}:"
    if missing:
        msg += part("missing keys", missing)
    if unexpected:
        msg += part("unexpected keys", unexpected)
    if mismatched:
        msg += part("keys with another shape or a non-float dtype", mismatched)
    return msg


def _read_json(file: Path) -> dict:
    """The JSON object stored in ``file``: FileNotFoundError if absent, ValueError naming it if malformed."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(data).__name__}")
    return data


def _find_checkpoint(path: Path) -> tuple[list[Path], Path | None]:
    """-> (safetensors files to read, the folder's config.json or None)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"expected a .safetensors file or a folder, got {path}")
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    cfg = path / "config.json" if (path / "config.json").exists() else None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"several safetensors index files in {path}: {[i.name for i in indexes]}")
    if indexes:
        weight_map = _read_json(indexes[0]).get("weight_map")
        # shard names must be plain file names next to the index (no path escapes)
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
                           for k, v in weight_map.items())):
            raise ValueError(
                f"{indexes[0]} needs a non-empty 'weight_map' object mapping each key to a shard file name "
                f"in {path}, got {weight_map!r:.200}"
            )
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"shards named in {indexes[0]} are absent: {absent}")
        return files, cfg
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"{path} needs one *.safetensors file or a *.safetensors.index.json, "
            f"found {[f.name for f in files]}"
        )
    return files, cfg


def _read_safetensors(files, device, dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of ``files`` -> (state dict, key -> file name); a key stored twice is a ValueError."""
    from safetensors import safe_open

    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for f in files:
        try:
            fh = safe_open(str(f), framework="pt", device=str(device))
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise ValueError(f"{f} is not a readable safetensors file: {e}") from e
        with fh:
            for k in fh.keys():
                if k in sd:
                    raise ValueError(f"key {k!r} is stored twice: in {origin[k]} and in {f.name}")
                t = fh.get_tensor(k)
                sd[k] = t if dtype is None else t.to(dtype)
                origin[k] = f.name
    return sd, origin


def _resolve_config(config, path: Path) -> CrossDiTConfig:
    """``config`` (or the folder's config.json) as a CrossDiTConfig; errors in a file's content are
    re-raised naming the file."""
    if config is None:
        raise ValueError(
            f"{path} carries no config.json: pass config= (a preset name such as 'video_lite', an official "
            "config dict or a config.json path)"
        )
    if isinstance(config, CrossDiTConfig):
        return config
    if isinstance(config, (str, os.PathLike)) and str(config).endswith(".json"):
        content = _read_json(Path(config))
        try:
            return CrossDiTConfig.from_official_dict(content)
        except ValueError as e:
            raise ValueError(f"{config}: {e}") from e
    if isinstance(config, Mapping):
        return CrossDiTConfig.from_official_dict(config)
    if isinstance(config, str):
        return preset(config)
    raise ValueError(
        f"config must be a CrossDiTConfig, a preset name, an official config dict or a config.json path, "
        f"got {type(config).__name__}"
    )
