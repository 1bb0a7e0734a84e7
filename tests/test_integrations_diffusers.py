"""kandinsky_kernels.integrations.diffusers: enable_nabla / disable_nabla on diffusers' tiny random
Kandinsky5Transformer3DModel and WanTransformer3DModel (CPU).

What is checked:
- Kandinsky 5 called as its pipeline calls a NABLA model (``sparse_params``, fractal tokens): the same
  block masks, exactly, as diffusers' own NABLA path (``nablaT_v2``) on the same weights, and the same
  output under the project's tolerance policy (that mask applied by SDPA: fp64 as the reference, fp32
  as torch's own error; eager Flex attends densely on the CPU, see the test); called plainly (raster
  tokens, gathered into fractal order) the masks are the same again. On CUDA (``gpu``, not yet run):
  the same against diffusers' compiled FlexAttention path.
- threshold 1.0 equals the model's dense output (SDPA) within tolerance, on a padded grid (H, W not
  multiples of 8) for both models.
- forward and backward at threshold 0.9 (Wan with gradient checkpointing; Kandinsky 5 plainly).
- ``disable_nabla`` restores the original processor objects and the output bit for bit.
- ``torch.compile`` (AOTAutograd, eager kernels: no C++ build in the test) of both models with NABLA
  enabled: no crash, same output as eager; Kandinsky 5 in both token orders and through backward.
The comparisons use one visual block for Kandinsky 5: its RoPE rounds q and k to bf16, so in a second
block the last-bit differences of the first block's attention could flip a bf16 rounding and change
a mask at the threshold's edge; Wan, without that rounding, runs two blocks.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import assert_close_to_reference, assert_exact  # noqa: E402
from diffusers import Kandinsky5Transformer3DModel, WanTransformer3DModel  # noqa: E402

from kandinsky_kernels.integrations import diffusers as kk_diffusers  # noqa: E402
from kandinsky_kernels.integrations.diffusers import (  # noqa: E402
    disable_nabla, enable_nabla, is_nabla_enabled,
)
from kandinsky_kernels.mask import BlockSparseMask  # noqa: E402


# ----------------------------------------------------------------------------------------- models
def _kandinsky5(num_visual_blocks=1, head_dims=(16, 8, 8), model_dim=64) -> Kandinsky5Transformer3DModel:
    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=model_dim, ff_dim=128, num_text_blocks=1, num_visual_blocks=num_visual_blocks,
        axes_dims=head_dims,
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises the modulations: make every branch do work
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.2)
    return model


def _kandinsky5_fp64(model: Kandinsky5Transformer3DModel) -> Kandinsky5Transformer3DModel:
    """An fp64 copy for references. Its time embedding stays fp32: the model casts the timestep to fp32
    before that layer whatever its dtype (the fp32 model computes the very same values there)."""
    ref = copy.deepcopy(model).double()
    ref.time_embeddings.float()
    return ref


def _kandinsky5_inputs(grid, dtype=torch.float32, sparse_params=None):
    t, h, w = grid
    g = torch.Generator().manual_seed(1)
    return dict(
        # drawn in fp32 whatever the dtype (randn draws other numbers in fp64), then cast
        hidden_states=torch.randn(1, t, 2 * h, 2 * w, 4, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
        timestep=torch.tensor([500.0], dtype=dtype),
        pooled_projections=torch.randn(1, 16, generator=g).to(dtype),
        visual_rope_pos=(torch.arange(t), torch.arange(h), torch.arange(w)),
        text_rope_pos=torch.arange(8),
        sparse_params=sparse_params,
        return_dict=False,
    )


def _sparse_params(grid, p, window):
    """What Kandinsky5T2VPipeline.get_sparse_params passes to a NABLA-configured transformer. Its STA
    mask comes from the pipeline's ``fast_sta_nabla``, which needs transformers installed to import;
    ``sta_block_mask`` is the same mask (tests/test_sta.py checks it against the official builder)."""
    from kandinsky_kernels import sta_block_mask

    t, h, w = grid
    sta = sta_block_mask(t, h // 8, w // 8, window)
    return {"sta_mask": sta[None, None], "attention_type": "nabla", "to_fractal": True, "P": p,
            "wT": window[0], "wH": window[1], "wW": window[2], "add_sta": True, "visual_shape": grid,
            "method": "topcdf"}


def _wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()


def _wan_inputs(grid, dtype=torch.float32):
    t, h, w = grid
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, t, 2 * h, 2 * w, generator=g).to(dtype),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype), return_dict=False)


def _out(model, inputs):
    out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out


def _recorder():
    masks = {}

    def on_mask(name, mask):
        masks[name] = mask

    return masks, on_mask


# ------------------------------------------------------------------------- Kandinsky 5 vs diffusers
def test_kandinsky5_matches_diffusers_nabla(monkeypatch):
    """Same masks as diffusers' ``nablaT_v2`` (exactly) and the same output as diffusers' NABLA path.

    diffusers hands its mask to FlexAttention as ``BlockMask.from_kv_blocks(..., mask_mod=None)``.
    Eager ``flex_attention`` (diffusers calls it uncompiled) applies only the mask_mod, so it computes
    dense attention, whatever the blocks (checked below); compiled Flex on the CPU fails to build
    for a mask of full blocks only (inductor C++ error, torch 2.13). The reference is therefore
    diffusers' model with its own NABLA mask applied by SDPA as a dense token mask (the native backend
    takes a bool mask): the same blocks, attended exactly. ``test_kandinsky5_matches_compiled_flex_nabla_gpu``
    compares with compiled Flex where CUDA is present.
    """
    from diffusers.models.transformers import transformer_kandinsky

    grid, p, window = (3, 16, 24), 0.7, (1, 1, 1)  # 3 x 2 x 3 = 18 blocks; STA: the diagonal only
    theirs = []
    nabla = transformer_kandinsky.nablaT_v2

    def nabla_as_token_mask(*args, **kwargs):  # test-only: diffusers' own mask, as SDPA takes it
        block_mask = nabla(*args, **kwargs)
        theirs.append(BlockSparseMask.from_flex_block_mask(block_mask))
        return theirs[-1].to_dense_tokens()

    model = _kandinsky5()
    sp = _sparse_params(grid, p, window)
    with torch.no_grad():
        with diffusers.attention_backend("flex"):  # diffusers' Flex path, as it runs eagerly
            flex_eager = _out(model, _kandinsky5_inputs(grid, sparse_params=sp))
        dense = _out(model, _kandinsky5_inputs(grid))
        monkeypatch.setattr(transformer_kandinsky, "nablaT_v2", nabla_as_token_mask)
        ref32 = _out(model, _kandinsky5_inputs(grid, sparse_params=sp))
        ref64 = _out(_kandinsky5_fp64(model), _kandinsky5_inputs(grid, torch.float64, sparse_params=sp))
    assert_close_to_reference(flex_eager, dense.double(), dense, name="eager Flex NABLA (= dense)")
    mask32, mask64 = (m.to_dense_blocks() for m in theirs)
    assert_exact(mask64, mask32, "diffusers' fp64 mask vs its fp32 mask (the reference is valid)")

    masks, on_mask = _recorder()
    enable_nabla(model, on_mask=on_mask)  # threshold / window not used: sparse_params rule this call
    with torch.no_grad():
        ours = _out(model, _kandinsky5_inputs(grid, sparse_params=sp))
    (name, mask), = masks.items()
    assert name == "visual_transformer_blocks.0.self_attention.processor"
    assert_exact(mask.to_dense_blocks(), mask32, "our mask vs diffusers' NABLA mask")
    assert 0.2 < mask.density < 0.9
    assert_close_to_reference(ours, ref64, ref32)

    # Called plainly (raster tokens, gathered into fractal order), enable_nabla's own settings.
    enable_nabla(model, threshold=p, sta_window=window, on_mask=on_mask)
    with torch.no_grad():
        plain = _out(model, _kandinsky5_inputs(grid))
    assert_exact(masks[name].to_dense_blocks(), mask32, "plain call's mask vs diffusers' NABLA mask")
    assert_close_to_reference(plain, ref64, ref32)


@pytest.mark.gpu
def test_kandinsky5_matches_compiled_flex_nabla_gpu(monkeypatch):
    """On CUDA, diffusers' FlexAttention NABLA path compiled (where Flex honours the blocks) against
    ours (Triton kernels). Reference: diffusers' own mask applied by SDPA as a token mask in fp64."""
    from diffusers.models.transformers import transformer_kandinsky

    grid, p, window = (3, 16, 24), 0.7, (1, 1, 1)
    model = _kandinsky5().cuda()
    sp = _sparse_params(grid, p, window)
    sp["sta_mask"] = sp["sta_mask"].cuda()

    def inputs(dtype=torch.float32):
        def cuda(v):
            if isinstance(v, tuple):
                return tuple(x.cuda() for x in v)
            return v.cuda() if torch.is_tensor(v) else v
        return {k: cuda(v) for k, v in _kandinsky5_inputs(grid, dtype, sparse_params=sp).items()}

    torch._dynamo.reset()
    with torch.no_grad(), diffusers.attention_backend("flex"):
        flex = _out(torch.compile(model), inputs())
    nabla = transformer_kandinsky.nablaT_v2
    theirs = []

    def nabla_as_token_mask(*args, **kwargs):
        theirs.append(BlockSparseMask.from_flex_block_mask(nabla(*args, **kwargs)))
        return theirs[-1].to_dense_tokens()

    monkeypatch.setattr(transformer_kandinsky, "nablaT_v2", nabla_as_token_mask)
    with torch.no_grad():
        ref32 = _out(model, inputs())
        ref64 = _out(_kandinsky5_fp64(model), inputs(torch.float64))
    assert_exact(theirs[1].to_dense_blocks(), theirs[0].to_dense_blocks(), "fp64 vs fp32 mask")
    assert_close_to_reference(flex, ref64, ref32, name="compiled Flex NABLA")
    masks, on_mask = _recorder()
    enable_nabla(model, on_mask=on_mask)
    with torch.no_grad():
        ours = _out(model, inputs())
    assert_exact(next(iter(masks.values())).to_dense_blocks(), theirs[0].to_dense_blocks(), "mask")
    assert_close_to_reference(ours, ref64, flex)


def test_kandinsky5_threshold_one_is_dense_on_a_padded_grid():
    grid = (2, 12, 20)  # H, W not multiples of 8: padded tiles, pad keys masked
    model = _kandinsky5()
    with torch.no_grad():
        dense32 = _out(model, _kandinsky5_inputs(grid))
        dense64 = _out(_kandinsky5_fp64(model), _kandinsky5_inputs(grid, torch.float64))
        masks, on_mask = _recorder()
        enable_nabla(model, threshold=1.0, on_mask=on_mask)
        ours = _out(model, _kandinsky5_inputs(grid))
    assert masks["visual_transformer_blocks.0.self_attention.processor"].density == 1.0
    assert_close_to_reference(ours, dense64, dense32)


def test_kandinsky5_backward_plain_call():
    grid = (2, 8, 16)
    model = _kandinsky5(num_visual_blocks=2).train()
    enable_nabla(model, threshold=0.9, sta_window=(1, 1, 1))
    inputs = _kandinsky5_inputs(grid)
    inputs["hidden_states"].requires_grad_(True)
    _out(model, inputs).square().mean().backward()
    for name in ("to_query", "to_key", "to_value"):
        g = getattr(model.visual_transformer_blocks[1].self_attention, name).weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name
    assert torch.isfinite(inputs["hidden_states"].grad).all()


# ---------------------------------------------------------------------------------------------- Wan
@pytest.mark.parametrize("fused", [False, True], ids=["separate_qkv", "fused_qkv"])
def test_wan_threshold_one_is_dense_on_a_padded_grid(fused):
    """Output and input gradient equal the dense model's (also with diffusers' fused QKV projection)."""
    grid = (2, 12, 20)
    model = _wan()
    if fused:
        model.fuse_qkv_projections()
        assert model.blocks[0].attn1.fused_projections and hasattr(model.blocks[0].attn1, "to_qkv")
    model64 = copy.deepcopy(model).double()

    def run(m, dtype=torch.float32):
        inputs = _wan_inputs(grid, dtype)
        inputs["hidden_states"].requires_grad_(True)
        out = _out(m, inputs)
        out.square().mean().backward()
        return out.detach(), inputs["hidden_states"].grad

    dense32, grad32 = run(model)
    dense64, grad64 = run(model64, torch.float64)
    masks, on_mask = _recorder()
    enable_nabla(model, threshold=1.0, on_mask=on_mask)
    ours, grad = run(model)
    assert sorted(masks) == ["blocks.0.attn1.processor", "blocks.1.attn1.processor"]
    assert all(m.density == 1.0 for m in masks.values())
    assert_close_to_reference(ours, dense64, dense32)
    assert_close_to_reference(grad, grad64, grad32, grad=True, name="d hidden_states")


def test_wan_sparse_forward_and_backward_with_checkpointing():
    grid = (2, 24, 32)  # 24 blocks: at 0.9 a near-uniform random model still drops a few
    model = _wan().train()
    model.enable_gradient_checkpointing()
    masks, on_mask = _recorder()
    enable_nabla(model, threshold=0.9, sta_window=(1, 1, 1), on_mask=on_mask)
    inputs = _wan_inputs(grid)
    inputs["hidden_states"].requires_grad_(True)
    out = _out(model, inputs)
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
    assert all(m.density < 1.0 for m in masks.values()), {n: m.density for n, m in masks.items()}
    out.square().mean().backward()
    for block in model.blocks:
        for lin in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v):
            assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
            assert lin.weight.grad.abs().max() > 0
    assert torch.isfinite(inputs["hidden_states"].grad).all()


# ---------------------------------------------------------------------------- disable, compile, API
@pytest.mark.parametrize("family", ["kandinsky5", "wan"])
def test_disable_restores_processors_and_output_bit_for_bit(family):
    model, inputs = ((_kandinsky5(), _kandinsky5_inputs((2, 8, 16))) if family == "kandinsky5"
                     else (_wan(), _wan_inputs((2, 8, 16))))
    before = dict(model.attn_processors)
    with torch.no_grad():
        ref = _out(model, inputs)
        enable_nabla(model, threshold=0.5, sta_window=(1, 1, 1))
        assert is_nabla_enabled(model)
        changed = {k for k, v in model.attn_processors.items() if v is not before[k]}
        assert changed and all("self_attention" in k or "attn1" in k for k in changed)
        assert not torch.equal(_out(model, inputs), ref)
        enable_nabla(model, threshold=0.7)  # again: replaces the settings, keeps the true originals
        disable_nabla(model)
        after = _out(model, inputs)
    assert not is_nabla_enabled(model)
    assert all(model.attn_processors[k] is v for k, v in before.items())
    assert "kandinsky_kernels.nabla_grid" not in model._diffusers_hook.hooks
    assert_exact(after, ref, "output after disable_nabla")
    disable_nabla(model)  # no-op on a model without NABLA


def test_torch_compile_with_nabla_matches_eager():
    grid = (2, 8, 16)
    model = _wan()
    enable_nabla(model, threshold=0.9, sta_window=(1, 1, 1))
    with torch.no_grad():
        eager = _out(model, _wan_inputs(grid))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        out = _out(compiled, _wan_inputs(grid))
    assert_close_to_reference(out, eager.double(), eager)


def test_torch_compile_kandinsky5_both_orders_and_backward():
    """Compiled: the plain call (raster tokens, forward and backward) and the sparse_params call."""
    grid = (2, 16, 16)
    model = _kandinsky5()
    enable_nabla(model, threshold=0.9, sta_window=(1, 1, 1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    inputs = _kandinsky5_inputs(grid)
    with torch.no_grad():
        eager = _out(model, inputs)
    inputs["hidden_states"].requires_grad_(True)
    out = _out(compiled, inputs)
    assert_close_to_reference(out.detach(), eager.double(), eager)
    out.square().mean().backward()
    assert torch.isfinite(inputs["hidden_states"].grad).all()
    sp = _sparse_params(grid, 0.9, (1, 1, 1))
    with torch.no_grad():
        eager = _out(model, _kandinsky5_inputs(grid, sparse_params=sp))
        out = _out(compiled, _kandinsky5_inputs(grid, sparse_params=sp))
    assert_close_to_reference(out, eager.double(), eager)


def test_inductor_compile_with_nabla_forward_and_backward():
    """torch.compile with inductor (the default backend: generated C++ for the model's own ops, our
    kernels as opaque custom ops): Wan with NABLA enabled gives eager's output and input gradient,
    and the attention processors cause no graph break (the breaks counted are the model's alone:
    the same model without NABLA has as many)."""
    from torch._dynamo.utils import counters

    grid = (2, 8, 16)

    def run(model, compiled):
        inputs = _wan_inputs(grid)
        inputs["hidden_states"].requires_grad_(True)
        out = _out(compiled, inputs)
        out.square().mean().backward()
        return out.detach(), inputs["hidden_states"].grad

    breaks = {}
    for nabla in (False, True):
        model = _wan()
        if nabla:
            enable_nabla(model, threshold=0.9, sta_window=(1, 1, 1))
        eager, eager_grad = run(model, model)
        torch._dynamo.reset()
        counters.clear()
        out, grad = run(model, torch.compile(model))
        breaks[nabla] = sum(counters["graph_break"].values())
        assert_close_to_reference(out, eager.double(), eager, name=f"inductor output (nabla={nabla})")
        assert_close_to_reference(grad, eager_grad.double(), eager_grad, grad=True,
                                  name=f"inductor input grad (nabla={nabla})")
    assert breaks[True] == breaks[False], breaks


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Kandinsky5Transformer3DModel, WanTransformer3DModel and Hunyuan"):
        enable_nabla(torch.nn.Linear(2, 2))
    model = _wan()
    with pytest.raises(ValueError, match="threshold"):
        enable_nabla(model, threshold=0.0)
    with pytest.raises(ValueError, match="sta_window"):
        enable_nabla(model, sta_window=(2, 3, 3))
    assert not is_nabla_enabled(model)
    with pytest.raises(ValueError, match="head dim 24"):
        enable_nabla(_kandinsky5(head_dims=(8, 8, 8), model_dim=48))
    enable_nabla(model)
    block = model.blocks[0]
    x = torch.randn(1, 64, 64)
    with pytest.raises(RuntimeError, match="token grid is unknown"):
        block.attn1(x, None, None, None)


def test_module_follows_the_public_api_conventions():
    assert sorted(kk_diffusers.__all__) == ["disable_nabla", "enable_nabla", "is_nabla_enabled"]
    for name in kk_diffusers.__all__:
        fn = getattr(kk_diffusers, name)
        assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, name
        assert fn.__doc__, name
    for attr, obj in vars(kk_diffusers).items():
        if attr.startswith("_") or getattr(obj, "__module__", None) != kk_diffusers.__name__:
            continue
        assert attr in kk_diffusers.__all__, attr


# ---------------------------------------------------------------------------------- HunyuanVideo
def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def _hunyuan_inputs(grid, dtype=torch.float32, text=7, valid=(7, 5)):
    t, h, w = grid
    g = torch.Generator().manual_seed(2)
    b = len(valid)
    return dict(hidden_states=torch.randn(b, 4, t, h, w, generator=g).to(dtype),
                timestep=torch.tensor([500] * b), encoder_hidden_states=torch.randn(b, text, 16, generator=g).to(dtype),
                encoder_attention_mask=torch.stack([torch.arange(text) < n for n in valid]).long(),
                pooled_projections=torch.randn(b, 8, generator=g).to(dtype),
                guidance=torch.full((b,), 3500.0, dtype=dtype), return_dict=False)


def test_hunyuan_threshold_one_is_dense_joint_attention_with_text_padding():
    """HunyuanVideo's joint text + video attention (dual- and single-stream blocks): at threshold 1
    the video queries' rectangular call (video keys + unpadded text keys) and the dense text queries
    give the model's output and input gradient, on a padded grid with per-sample text padding."""
    grid = (2, 12, 20)
    model = _hunyuan()
    model64 = copy.deepcopy(model).double()

    def run(m, dtype=torch.float32):
        inputs = _hunyuan_inputs(grid, dtype)
        inputs["hidden_states"].requires_grad_(True)
        out = _out(m, inputs)
        out.square().mean().backward()
        return out.detach(), inputs["hidden_states"].grad

    dense32, grad32 = run(model)
    dense64, grad64 = run(model64, torch.float64)
    masks, on_mask = _recorder()
    enable_nabla(model, threshold=1.0, sta_window=None, on_mask=on_mask)
    ours, grad = run(model)
    assert sorted(masks) == ["single_transformer_blocks.0.attn.processor", "transformer_blocks.0.attn.processor"]
    for m in masks.values():  # video keys (2 x 16 x 24 fractal) then one text block, pad keys invalid
        assert m.shape[-1] == m.shape[-2] + 1 and m.density == 1.0
        assert m.token_valid[1].sum() == 2 * 12 * 20 + 5 and m.token_valid[0].sum() == 2 * 12 * 20 + 7
    assert_close_to_reference(ours, dense64, dense32)
    assert_close_to_reference(grad, grad64, grad32, grad=True, name="d hidden_states")
    disable_nabla(model)
    assert torch.equal(run(model)[0], dense32)


def test_hunyuan_sparse_forward_and_backward():
    model = _hunyuan().train()
    masks, on_mask = _recorder()
    enable_nabla(model, threshold=0.5, sta_window=(1, 1, 1), on_mask=on_mask)
    inputs = _hunyuan_inputs((2, 24, 32), valid=(3, 7))
    inputs["hidden_states"].requires_grad_(True)
    out = _out(model, inputs)
    assert torch.isfinite(out).all()
    assert all(m.density < 1.0 for m in masks.values()), {n: m.density for n, m in masks.items()}
    out.square().mean().backward()
    assert torch.isfinite(inputs["hidden_states"].grad).all()
    assert model.transformer_blocks[0].attn.to_q.weight.grad.abs().sum() > 0
