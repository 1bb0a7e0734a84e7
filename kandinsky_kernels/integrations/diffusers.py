"""NABLA for diffusers' video transformers in one call: ``enable_nabla(transformer)``.

Switches the video self-attention of diffusers' ``Kandinsky5Transformer3DModel``,
``WanTransformer3DModel`` and ``HunyuanVideoTransformer3DModel`` to this library's fractal reordering
+ NABLA mask + block-sparse attention,
and ``disable_nabla(transformer)`` puts the original processors back (the same objects: the output is
then bit for bit what it was before). diffusers is an optional dependency, imported only when these
functions run (``pip install diffusers``; the tests pin ``diffusers==0.42.1``).

How it plugs in, through diffusers' public mechanisms only (no private function is patched):

- attention processors: the video self-attention modules (Kandinsky 5: every
  ``visual_transformer_blocks.<i>.self_attention``; Wan: every ``blocks.<i>.attn1``) get a processor
  of this module through ``transformer.set_attn_processor``. It computes q, k, v as the model's own
  processor does (projections, QK RMSNorm, the model's RoPE), then runs
  :func:`kandinsky_kernels.nabla_attention`. Text self-attention and cross-attention are unchanged.
  HunyuanVideo attends text and video jointly (every ``transformer_blocks.<i>.attn`` and
  ``single_transformer_blocks.<i>.attn``): its video queries run one rectangular block-sparse call
  over the video keys (the NABLA mask, fractal order) plus every unpadded text key (a dense key part,
  ``BlockSparseMask.with_dense_keys``); its text queries stay dense over all keys, as in the model.
- a model hook (``diffusers.hooks.HookRegistry``, name ``"kandinsky_kernels.nabla_grid"``) reads the
  token grid (T, H, W) after patching from the shape of the transformer's ``hidden_states`` on every
  call: a processor sees (B, S, C) tokens only.

Token order. Wan, and Kandinsky 5 called without ``sparse_params``, keep the tokens in raster order
(frame, row, column): the processor passes them as they are (``nabla_attention(..., order="raster")``)
and the kernels read q, k, v and write the output through the fractal index of the grid (H and W
padded up to multiples of 8 in the index only), so no fractal-order copy is made. HunyuanVideo's joint
attention still gathers its video q, k, v into fractal order and scatters the output back (its keys
are video plus text, which one index over q and k does not describe).
Kandinsky 5 called as its pipeline calls a NABLA-configured model (``sparse_params`` with
``to_fractal=True``) already holds its tokens in the same fractal order, so no gather happens; the
mask then follows the call's ``sparse_params``: its ``P`` is the threshold and its ``sta_mask`` the
sliding-tile mask, exactly as diffusers' own FlexAttention NABLA path computes them, so the result is
that path's, computed by our kernels. ``threshold`` and ``sta_window`` of :func:`enable_nabla` apply
to every other call.

Training and compilation: the processors are differentiable in every weight (backward through our
block-sparse attention kernels), work with the model's gradient checkpointing, and trace under
``torch.compile`` (enable first, then compile; ``disable_nabla`` needs a recompile, as any processor
change does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from kandinsky_kernels.mask import BlockSparseMask
from kandinsky_kernels.ops.block_sparse_attention import block_sparse_attention
from kandinsky_kernels.ops.fractal import FractalLayout, fractal_flatten, fractal_unflatten
from kandinsky_kernels.ops.nabla import _raster_token_index, nabla_attention, nabla_block_mask
from kandinsky_kernels.ops.sta import sta_block_mask

__all__ = ["disable_nabla", "enable_nabla", "is_nabla_enabled"]

_HOOK_NAME = "kandinsky_kernels.nabla_grid"
_STATE_ATTR = "_kandinsky_kernels_nabla"


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers.hooks import HookRegistry, ModelHook
    except ImportError as e:  # pragma: no cover - exercised only where diffusers is missing
        raise ImportError(
            "kandinsky_kernels.integrations.diffusers needs diffusers (pip install diffusers; tested "
            "with diffusers==0.42.1)"
        ) from e
    return HookRegistry, ModelHook


def _family(transformer: torch.nn.Module) -> str:
    """``"kandinsky5"``, ``"wan"`` or ``"hunyuan"``, or ValueError naming what is supported."""
    from diffusers import HunyuanVideoTransformer3DModel, Kandinsky5Transformer3DModel, WanTransformer3DModel

    if isinstance(transformer, Kandinsky5Transformer3DModel):
        return "kandinsky5"
    if isinstance(transformer, WanTransformer3DModel):
        return "wan"
    if isinstance(transformer, HunyuanVideoTransformer3DModel):
        if transformer.config.image_condition_type is not None:
            raise ValueError("enable_nabla supports HunyuanVideo's text-to-video transformer; the image-"
                             f"conditioned variant ({transformer.config.image_condition_type!r}) is not supported")
        return "hunyuan"
    raise ValueError(
        f"enable_nabla supports diffusers' Kandinsky5Transformer3DModel, WanTransformer3DModel and "
        f"HunyuanVideoTransformer3DModel, got {type(transformer).__name__}"
    )


@dataclass(eq=False)
class _NablaState:
    """What :func:`enable_nabla` set up on one transformer; shared by its processors and its hook."""

    family: str
    threshold: float
    sta_window: tuple[int, int, int] | None
    on_mask: Callable[[str, Any], None] | None
    originals: dict[str, Any] = field(default_factory=dict)  # processor key -> the original processor
    patch_size: tuple[int, int, int] = (1, 1, 1)
    # Token grid of the latest forward, set by the hook before it runs. Kept after it returns: gradient
    # checkpointing recomputes the blocks during backward, after the forward call has ended.
    grid: tuple[int, int, int] | None = None


def _token_grid(state: _NablaState, hidden_states: torch.Tensor) -> tuple[int, int, int]:
    # Kandinsky 5 takes channels-last latents (B, T, H, W, C), Wan channels-first (B, C, T, H, W).
    sizes = hidden_states.shape[1:4] if state.family == "kandinsky5" else hidden_states.shape[2:5]
    pt, ph, pw = state.patch_size
    return (sizes[0] // pt, sizes[1] // ph, sizes[2] // pw)


def _make_grid_hook(state: _NablaState, model_hook_cls: type) -> Any:
    class _TokenGridHook(model_hook_cls):
        """Records the token grid (T, H, W) after patching of each forward call of the transformer."""

        def pre_forward(self, module, *args, **kwargs):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            state.grid = _token_grid(state, hidden_states)
            return args, kwargs

    return _TokenGridHook()


class _NablaProcessor:
    """Common part of the processors: NABLA attention of (B, S, H, D) q, k, v on the current grid."""

    def __init__(self, state: _NablaState, name: str, original: Any):
        self._state = state
        self._name = name
        self._original = original  # for the calls this processor does not handle

    def _grid(self, s: int) -> tuple[int, int, int]:
        """The token grid of the current forward, checked against ``s`` video tokens."""
        if self._state.grid is None:
            raise RuntimeError(
                f"{self._name}: the token grid is unknown. enable_nabla learns it from the transformer's "
                "forward; call the transformer itself, not one of its blocks"
            )
        t, h, w = self._state.grid
        if t * h * w != s:
            raise ValueError(f"{self._name}: {s} tokens do not fill the token grid (T, H, W) = "
                             f"({t}, {h}, {w}) read from the transformer's hidden_states")
        return t, h, w

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sparse_params: dict | None = None) -> torch.Tensor:
        state = self._state
        b, s, heads, d = q.shape
        t, h, w = self._grid(s)
        if sparse_params is not None and sparse_params.get("to_fractal", False):
            # Kandinsky 5's own fractal order (diffusers flattened the 8x8 tiles): mask per sparse_params.
            layout = FractalLayout(t, h, w)
            mask = nabla_block_mask(q, k, float(sparse_params["P"]), sta=sparse_params["sta_mask"].bool(),
                                    grid=layout)
            out = block_sparse_attention(q, k, v, mask)
        else:
            # Raster order: the kernels read q, k, v and write the output through the fractal index,
            # so no fractal-order copy is made.
            layout = FractalLayout(t, h, w)
            if sparse_params is not None:  # NABLA sparse_params on raster tokens: their P, their STA
                index = _raster_token_index(layout, q.device)
                mask = nabla_block_mask(q, k, float(sparse_params["P"]), sta=sparse_params["sta_mask"].bool(),
                                        grid=layout, token_index=index)
                out = block_sparse_attention(q, k, v, mask, token_index=index)
            elif self._wants_mask():
                out, mask = nabla_attention(q, k, v, state.threshold, state.sta_window, grid=layout,
                                            return_mask=True, order="raster")
            else:  # the mask is rebuilt in the backward, not kept
                return nabla_attention(q, k, v, state.threshold, state.sta_window, grid=layout, order="raster")
        if self._wants_mask():
            state.on_mask(self._name, mask)
        return out

    def _wants_mask(self) -> bool:
        return self._state.on_mask is not None and not torch.compiler.is_compiling()


def _kandinsky5_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    # rope holds 2x2 rotation matrices (..., D/2, 2, 2) applied to the (even, odd) pairs in fp32; the
    # model rounds the result to bf16 (as the official Kandinsky 5 code does), whatever its dtype.
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (rope * pairs).sum(dim=-1).reshape(x.shape).to(torch.bfloat16).type_as(x)


class _Kandinsky5NablaProcessor(_NablaProcessor):
    """Video self-attention of a ``Kandinsky5TransformerDecoderBlock`` with NABLA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        if encoder_hidden_states is not None:  # cross-attention: not ours
            return self._original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  rotary_emb=rotary_emb, sparse_params=sparse_params)
        q = attn.to_query(hidden_states).unflatten(-1, (attn.num_heads, -1))
        k = attn.to_key(hidden_states).unflatten(-1, (attn.num_heads, -1))
        v = attn.to_value(hidden_states).unflatten(-1, (attn.num_heads, -1))
        q = attn.query_norm(q.float()).type_as(q)
        k = attn.key_norm(k.float()).type_as(k)
        if rotary_emb is not None:
            q = _kandinsky5_rotary(q, rotary_emb)
            k = _kandinsky5_rotary(k, rotary_emb)
        out = self._attend(q, k, v, sparse_params)
        return attn.out_layer(out.flatten(-2, -1))


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Interleaved pairs (x[2i], x[2i+1]) rotated by the angle of frequency i; cos/sin repeat each
    # frequency twice along D, so the even entries of cos and the odd ones of sin hold one per pair.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class _WanNablaProcessor(_NablaProcessor):
    """Self-attention (``attn1``) of a ``WanTransformerBlock`` with NABLA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or kwargs:
            return self._original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                  **kwargs)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q = _wan_rotary(q, *rotary_emb)
            k = _wan_rotary(k, *rotary_emb)
        out = self._attend(q, k, v).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _qkv_heads(attn, x, projections, norm_q, norm_k):
    """(B, S, H, D) q, k, v of ``x`` through the three projections, q and k normed where the model norms."""
    q, k, v = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


class _HunyuanNablaProcessor(_NablaProcessor):
    """Joint text + video attention of HunyuanVideo's dual- and single-stream blocks: the video queries
    run NABLA over the video keys plus every (unpadded) text key in one rectangular block-sparse call
    (the text keys are a dense key part: ``BlockSparseMask.with_dense_keys``); the text queries stay
    dense over all keys, as in the model. q, k, v, norms and RoPE as diffusers'
    ``HunyuanVideoAttnProcessor2_0`` computes them."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        single = attn.add_q_proj is None and encoder_hidden_states is not None
        if single:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        q, k, v = _qkv_heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
        n_video = q.shape[1] - (n_text if single else 0)
        if image_rotary_emb is not None:  # the video tokens only
            rot = lambda x: torch.cat([apply_rotary_emb(x[:, :n_video], image_rotary_emb, sequence_dim=1),  # noqa
                                       x[:, n_video:]], dim=1)
            q, k = rot(q), rot(k)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # dual stream: text projections
            eq, ek, ev = _qkv_heads(attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                    attn.norm_added_q, attn.norm_added_k)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        key_valid = None if attention_mask is None else attention_mask.reshape(q.shape[0], -1).bool()
        out_video = self._attend_joint(q, k, v, n_video, key_valid)
        parts = [out_video]
        if n_text:  # text queries: dense over all keys with the model's key mask
            qt = q[:, n_video:].transpose(1, 2)
            mask = None if key_valid is None else key_valid[:, None, None, :]
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                qt, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2))
        out = torch.cat(parts, dim=1).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            if getattr(attn, "to_out", None) is not None:
                out = attn.to_out[1](attn.to_out[0](out))
            return out
        out, context = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            context = attn.to_add_out(context)
        return out, context

    def _attend_joint(self, q, k, v, n_video, key_valid):
        """(B, n_video, H, D) video outputs: NABLA over the video keys (fractal order) plus the text keys
        as a dense key part; ``key_valid`` (B, N) bool or None marks the real keys (text padding)."""
        n_text = q.shape[1] - n_video
        qv, kv, vv = q[:, :n_video], k[:, :n_video], v[:, :n_video]
        if n_text == 0:
            return self._attend(qv, kv, vv)
        state = self._state
        grid = self._grid(n_video)
        b, _, heads, d = q.shape
        t, h, w = grid
        qf, layout = fractal_flatten(qv.reshape(b, t, h, w, heads, d), return_layout=True)
        kf = fractal_flatten(kv.reshape(b, t, h, w, heads, d))
        vf = fractal_flatten(vv.reshape(b, t, h, w, heads, d))
        sta = None if state.sta_window is None else sta_block_mask(*layout.tile_grid, state.sta_window,
                                                                 device=q.device)
        video_mask = nabla_block_mask(qf, kf, state.threshold, sta=sta, grid=layout)
        joint = video_mask.with_dense_keys(n_text)
        bs = joint.block_size
        pad = joint.seq_len_kv - qf.shape[1] - n_text
        tv = joint.token_valid.expand(b, -1).clone()
        if key_valid is not None:  # the model's text padding, per sample
            tv[:, qf.shape[1]:qf.shape[1] + n_text] &= key_valid[:, n_video:]
        mask = BlockSparseMask.from_csr(joint.kv_ptr, joint.kv_cols, joint.num_kv_blocks, bs, token_valid=tv)
        zeros = k.new_zeros(b, pad, heads, d)
        k_all = torch.cat([kf, k[:, n_video:], zeros], dim=1)
        v_all = torch.cat([vf, v[:, n_video:], zeros], dim=1)
        outf = block_sparse_attention(qf, k_all, v_all, mask)
        if state.on_mask is not None and not torch.compiler.is_compiling():
            state.on_mask(self._name, mask)
        return fractal_unflatten(outf, layout).reshape(b, n_video, heads, d)


def _targets(transformer: torch.nn.Module, family: str) -> list[str]:
    """Processor keys (as in ``transformer.attn_processors``) of the video self-attention modules."""
    if family == "kandinsky5":
        return [f"visual_transformer_blocks.{i}.self_attention.processor"
                for i in range(len(transformer.visual_transformer_blocks))]
    if family == "hunyuan":
        return ([f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))]
                + [f"single_transformer_blocks.{i}.attn.processor"
                   for i in range(len(transformer.single_transformer_blocks))])
    return [f"blocks.{i}.attn1.processor" for i in range(len(transformer.blocks))]


def _head_dim(transformer: torch.nn.Module, family: str) -> int:
    cfg = transformer.config
    return int(sum(cfg.axes_dims)) if family == "kandinsky5" else int(cfg.attention_head_dim)


def _check_args(threshold: float, sta_window: Sequence[int] | None) -> tuple[int, int, int] | None:
    is_number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not is_number or not math.isfinite(threshold) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if sta_window is None:
        return None
    if not isinstance(sta_window, (tuple, list)) or len(sta_window) != 3 or any(
            isinstance(x, bool) or not isinstance(x, int) or x <= 0 or x % 2 == 0 for x in sta_window):
        raise ValueError(f"sta_window must be three positive odd ints (wT, wH, wW) in frames and 8x8 tiles, "
                         f"or None; got {sta_window!r}")
    return tuple(sta_window)  # type: ignore[return-value]


def _unwrap(transformer: torch.nn.Module) -> torch.nn.Module:
    # a torch.compile'd module forwards to the original one
    return getattr(transformer, "_orig_mod", transformer)


def enable_nabla(
    transformer: torch.nn.Module,
    threshold: float = 0.9,
    sta_window: Sequence[int] | None = (11, 3, 3),
    *,
    on_mask: Callable[[str, Any], None] | None = None,
) -> None:
    """Run the video self-attention of a diffusers video transformer with NABLA, in place.

    Args:
        transformer: a diffusers ``Kandinsky5Transformer3DModel`` or ``WanTransformer3DModel`` (or a
            ``torch.compile`` wrapper of one; enable before compiling, since processors are read at
            trace time). Its head dim must suit :func:`kandinsky_kernels.block_sparse_attention` (a
            multiple of 16, at most 256: every published Kandinsky 5 and Wan model has 64 or 128).
        threshold: NABLA CDF threshold in (0, 1]: the probability mass of key blocks each query block
            keeps; 1 keeps every block (dense attention, up to rounding). Kandinsky 5 uses 0.7-0.9.
        sta_window: (wT, wH, wW) sliding-tile window in frames and 8x8 tiles OR-ed into the mask
            (odd ints), or None for the NABLA mask alone.
        on_mask: optional ``on_mask(name, mask)`` called with the processor key (e.g.
            ``"blocks.3.attn1.processor"``) and the :class:`kandinsky_kernels.BlockSparseMask` each
            layer used, in eager mode (not inside a compiled graph): to log densities, or in tests.

    The model's calls with Kandinsky 5 ``sparse_params`` (its pipeline on a NABLA-configured model)
    use their ``P`` and ``sta_mask`` instead of ``threshold`` and ``sta_window``: see the module
    docstring. Calling ``enable_nabla`` again replaces the settings (the originals stay recorded).

    Raises:
        ImportError: diffusers is not installed.
        ValueError: an unsupported model, a head dim the kernels do not take, or bad settings.
    """
    hook_registry_cls, model_hook_cls = _import_diffusers()
    transformer = _unwrap(transformer)
    family = _family(transformer)
    window = _check_args(threshold, sta_window)
    d = _head_dim(transformer, family)
    if d % 16 or d > 256:
        raise ValueError(f"{type(transformer).__name__} has head dim {d}; NABLA's block-sparse attention "
                         "needs a multiple of 16, at most 256")
    if is_nabla_enabled(transformer):
        disable_nabla(transformer)
    cfg = transformer.config
    patch = ((int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size)) if family == "hunyuan"
             else tuple(int(p) for p in cfg.patch_size))
    state = _NablaState(family, float(threshold), window, on_mask, patch_size=patch)
    processors = transformer.attn_processors
    cls = {"kandinsky5": _Kandinsky5NablaProcessor, "wan": _WanNablaProcessor,
           "hunyuan": _HunyuanNablaProcessor}[family]
    for key in _targets(transformer, family):
        state.originals[key] = processors[key]
        processors[key] = cls(state, key, processors[key])
    transformer.set_attn_processor(processors)
    registry = hook_registry_cls.check_if_exists_or_initialize(transformer)
    registry.register_hook(_make_grid_hook(state, model_hook_cls), _HOOK_NAME)
    setattr(transformer, _STATE_ATTR, state)


def disable_nabla(transformer: torch.nn.Module) -> None:
    """Undo :func:`enable_nabla`: the original processor objects go back and the grid hook is removed,
    so the model computes exactly what it did before. A model without NABLA is left as it is."""
    transformer = _unwrap(transformer)
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return
    hook_registry_cls, _ = _import_diffusers()
    processors = transformer.attn_processors
    processors.update(state.originals)
    transformer.set_attn_processor(processors)
    hook_registry_cls.check_if_exists_or_initialize(transformer).remove_hook(_HOOK_NAME, recurse=False)
    delattr(transformer, _STATE_ATTR)


def is_nabla_enabled(transformer: torch.nn.Module) -> bool:
    """Whether :func:`enable_nabla` is in effect on ``transformer``."""
    return getattr(_unwrap(transformer), _STATE_ATTR, None) is not None
