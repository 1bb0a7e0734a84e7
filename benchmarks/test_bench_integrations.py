"""diffusers' video transformers on the CPU, forward with and without ``enable_nabla``.

The whole ``WanTransformer3DModel`` / ``Kandinsky5Transformer3DModel`` forward (patch embedding, every
block, output layer) of small random models: width 256 (4 heads of 64), FFN 1024, 2 video blocks
(Kandinsky 5 also 1 text block), 64 text tokens, fp32. Providers:

- ``sdpa``: the model as diffusers ships it (its processors, torch SDPA), the baseline;
- ``nabla``: after ``kandinsky_kernels.integrations.diffusers.enable_nabla``, called plainly: raster
  tokens read and written by the kernels through the fractal index (``order="raster"``), NABLA mask
  and block-sparse attention inside the timed call;
- ``nabla-fractal`` (Kandinsky 5 only): the same model called as its pipeline calls a NABLA model
  (``sparse_params``, tokens already in fractal order: no gather), same threshold and window.

Random weights give near-uniform block probabilities, so a NABLA threshold keeps about that share of
the blocks: ``THRESHOLD`` 0.1 with the STA window (1, 3, 3) gives the ~10-15 % block density of a
trained Kandinsky 5 at P = 0.9; the density reached (mean over layers) is recorded as ``density``.
At this width the model's Linears, modulations and RoPE (Wan's in fp64) take about as long as
dense attention, so the whole-forward ratio is Amdahl-bound (~1.9x at 8,192 tokens on the 2-vCPU
Xeon: NABLA attention ~0.35 s a layer against ~2 s for SDPA, the rest ~1.6 s a layer in both).
No goal: the issue asks for the ratio. Grids (T, H, W) in tokens: default (8, 32, 32) = 8,192 tokens,
quick (2, 32, 32) = 2,048, smoke a toy grid. Skipped, with the reason, where diffusers is missing.
"""
from __future__ import annotations

import copy

import pytest
import torch

from benchmarks._util import Provider, by_profile, cpu_isa_now, run_case, skip_cpu_suite_in_gpu_profile

skip_cpu_suite_in_gpu_profile()
pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers==0.42.1)")

from diffusers import Kandinsky5Transformer3DModel, WanTransformer3DModel  # noqa: E402

from kandinsky_kernels import sta_block_mask  # noqa: E402
from kandinsky_kernels.integrations.diffusers import enable_nabla  # noqa: E402

GRID, HEADS, TEXT = by_profile(smoke=((1, 8, 16), 2, 8), quick=((2, 32, 32), 4, 64),
                               default=((8, 32, 32), 4, 64))
HEAD_DIM, FFN, LAYERS = 64, 1024, 2
# Calls take 1-8 s at the default grid; no warm-up round: the density probe below already ran the NABLA
# model once, and the median of paired rounds shrugs off one slow round. ~1 min 10 s in all (default).
ROUNDS = by_profile(smoke=1, quick=2, default=2)
THRESHOLD, WINDOW = 0.1, (1, 3, 3)


def _kandinsky5():
    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=16, in_text_dim=128, in_text_dim2=64, time_dim=128, out_visual_dim=16,
        patch_size=(1, 2, 2), model_dim=HEADS * HEAD_DIM, ff_dim=FFN, num_text_blocks=1,
        num_visual_blocks=LAYERS, axes_dims=(16, 24, 24),
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises the modulations: make every branch do work
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.02)
    t, h, w = GRID
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, t, 2 * h, 2 * w, 16, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT, 128, generator=g), timestep=torch.tensor([500.0]),
        pooled_projections=torch.randn(1, 64, generator=g),
        visual_rope_pos=(torch.arange(t), torch.arange(h), torch.arange(w)), text_rope_pos=torch.arange(TEXT),
        return_dict=False,
    )
    return model, inputs


def _wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16,
        out_channels=16, text_dim=128, freq_dim=64, ffn_dim=FFN, num_layers=LAYERS, rope_max_seq_len=256,
    ).eval()
    t, h, w = GRID
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, t, 2 * h, 2 * w, generator=g),
                  timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, TEXT, 128, generator=g),
                  return_dict=False)
    return model, inputs


@pytest.mark.parametrize("family", ["wan", "kandinsky5"])
def test_bench_diffusers_transformer(benchmark, family):
    model, inputs = _wan() if family == "wan" else _kandinsky5()
    sparse = copy.deepcopy(model)  # the same weights; one copy keeps diffusers' processors
    densities: list[float] = []
    enable_nabla(sparse, threshold=THRESHOLD, sta_window=WINDOW,
                 on_mask=lambda name, mask: densities.append(mask.density))
    isa, isa_error = cpu_isa_now()
    skip = None if isa_error is None else f"KANDINSKY_CPU_ISA: {isa_error}"

    def call(m, **extra):
        def fn():
            with torch.no_grad():
                return m(**inputs, **extra)
        return fn

    providers = [Provider("sdpa", call(model)), Provider("nabla", call(sparse), skip=skip, cpu_isa=isa)]
    if family == "kandinsky5":
        t, h, w = GRID
        if h % 8 == 0 and w % 8 == 0:  # diffusers' fractal order needs whole 8x8 tiles
            sta = sta_block_mask(t, h // 8, w // 8, WINDOW)[None, None]
            sparse_params = {"sta_mask": sta, "to_fractal": True, "P": THRESHOLD, "attention_type": "nabla",
                             "visual_shape": GRID}
            providers.append(Provider("nabla-fractal", call(sparse, sparse_params=sparse_params), skip=skip,
                                      cpu_isa=isa))
    if skip is None:
        call(sparse)()  # the density of the masks the timed calls use (fixed weights and inputs)
    density = sum(densities) / len(densities) if densities else None
    s = GRID[0] * GRID[1] * GRID[2]
    name = {"wan": "WanTransformer3DModel", "kandinsky5": "Kandinsky5Transformer3DModel"}[family]
    run_case(
        benchmark, suite="diffusers transformer forward (CPU)", op="enable_nabla",
        case=f"{name} S{s} D{HEADS * HEAD_DIM} L{LAYERS} fp32",
        baseline="sdpa", providers=providers,
        params={"model": family, "seq_len": s, "grid": list(GRID), "dim": HEADS * HEAD_DIM, "layers": LAYERS,
                "threshold": THRESHOLD, "sta_window": list(WINDOW),
                "density": None if density is None else round(density, 4), "cpu_isa": isa},
        rounds=ROUNDS, warmup_rounds=0,
    )
