"""kandinsky_model.generate: official time grid and Euler/CFG update, seeds and batching, I2V / T2I /
edit conditioning, the I2V first-frame normalisation, MagCache skip counts, calibration and the bundled
official ratios."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close_to_reference
from kandinsky_model import CrossDiT, MagCacheConfig, generate, pack_text, time_grid, tiny, video_rope_scale
from kandinsky_model.magcache_ratios import OFFICIAL_MAG_RATIOS, OFFICIAL_NUM_STEPS
from kandinsky_model.sampler import MagCache, normalize_first_frame
from test_model import randomize, reference_forward


def make(**overrides) -> CrossDiT:
    return randomize(CrossDiT(tiny(**overrides))).eval()


def prompts(cfg, b=1, lengths=(5,), neg_lengths=(3,)):
    g = torch.Generator().manual_seed(7)
    text, mask = pack_text([torch.randn(n, cfg.in_text_dim, generator=g) for n in lengths])
    neg, neg_mask = pack_text([torch.randn(n, cfg.in_text_dim, generator=g) for n in neg_lengths])
    return dict(text=text, text_mask=mask, pooled_text=torch.randn(b, cfg.in_text_dim2, generator=g),
                negative_text=neg, negative_text_mask=neg_mask,
                negative_pooled_text=torch.randn(b, cfg.in_text_dim2, generator=g))


SHAPE = (3, 8, 8)


def reference_sample(model, p, i, noise, *, num_steps, guidance_scale=5.0, shift=5.0, dtype=torch.float64):
    """Sample ``i`` of :func:`generate`, written out: the official shifted grid and the Euler / CFG
    update around the plain reference forward in ``dtype``, the prompts of ``p`` stripped of padding.
    ``noise`` (T, H, W, C) -> (T, H, W, C)."""
    sd, cfg = model.state_dict(), model.config

    def prompt(prefix):
        mask = p.get(prefix + "text_mask")
        n = p[prefix + "text"].shape[1] if mask is None else int(mask[i].sum())
        return p[prefix + "text"][i, :n], p[prefix + "pooled_text"][i]

    ts = [shift * t / (1 + (shift - 1) * t) for t in (1 - k / num_steps for k in range(num_steps + 1))]
    x = noise.to(dtype)
    for k in range(num_steps):
        t = torch.tensor(1000 * ts[k], dtype=torch.float64)
        v = reference_forward(sd, cfg, x, *prompt(""), t, dtype=dtype)
        if guidance_scale != 1.0:
            v_u = reference_forward(sd, cfg, x, *prompt("negative_"), t, dtype=dtype)
            v = v_u + guidance_scale * (v - v_u)
        x = x + (ts[k + 1] - ts[k]) * v
    return x


def check_sampled(model, p, latents: dict, noise, **kw):
    """Each fp32 latent (B, T, H, W, C) of ``latents`` (name -> latent), per sample, against
    :func:`reference_sample` in fp64, the same loop in fp32 as plain torch's error baseline. Two fp32
    results are never each other's reference: their reduction orders differ."""
    for i in range(noise.shape[0]):
        ref = reference_sample(model, p, i, noise[i], **kw)
        base = reference_sample(model, p, i, noise[i], dtype=torch.float32, **kw)
        for name, latent in latents.items():
            assert_close_to_reference(latent[i], ref, base, name=f"{name}, sample {i}")


def seed_noise(*seeds) -> torch.Tensor:
    """The noise ``generate`` draws for one seed per sample: (B, *SHAPE, 4)."""
    return torch.stack([torch.randn((*SHAPE, 4), generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_time_grid_is_the_shifted_official_grid():
    t = time_grid(4, 1.0)
    assert torch.allclose(t, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    s = time_grid(50, 5.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    assert s[25].item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    assert video_rope_scale(512, 768) == (1.0, 2.0, 2.0) and video_rope_scale(768, 1280) == (1.0, 3.16, 3.16)


def test_euler_cfg_matches_a_hand_written_loop():
    model = make()
    p = prompts(model.config)
    res = generate(model, shape=SHAPE, num_steps=3, guidance_scale=4.0, shift=3.0, seed=11, **p)
    assert res.nfe == 6 and res.skipped == 0
    check_sampled(model, p, {"generate": res.latent}, seed_noise(11), num_steps=3, guidance_scale=4.0,
                  shift=3.0)


def test_seeds_are_deterministic_and_per_sample():
    model = make()
    p = prompts(model.config, b=2, lengths=(5, 2), neg_lengths=(3, 4))
    a = generate(model, shape=SHAPE, num_steps=2, seed=[3, 4], **p).latent
    b = generate(model, shape=SHAPE, num_steps=2, seed=[3, 4], **p).latent
    assert torch.equal(a, b)
    c = generate(model, shape=SHAPE, num_steps=2, seed=[5, 4], **p).latent
    assert not torch.equal(a[0], c[0])
    # the batch and its samples generated alone (text unpadded, no masks) both follow the reference
    singles = []
    for i, (n, nn_) in enumerate(((5, 3), (2, 4))):
        singles.append(generate(
            model, shape=SHAPE, num_steps=2, seed=[3, 4][i], text=p["text"][i : i + 1, :n],
            pooled_text=p["pooled_text"][i : i + 1], negative_text=p["negative_text"][i : i + 1, :nn_],
            negative_pooled_text=p["negative_pooled_text"][i : i + 1],
        ).latent)
    check_sampled(model, p, {"batch": a, "one by one": torch.cat(singles)}, seed_noise(3, 4), num_steps=2)


def test_cfg_batch_equals_separate_branches():
    model = make()
    p = prompts(model.config, lengths=(6,), neg_lengths=(2,))
    sep = generate(model, shape=SHAPE, num_steps=2, **p)
    bat = generate(model, shape=SHAPE, num_steps=2, cfg_batch=True, **p)
    assert bat.nfe == sep.nfe == 4
    check_sampled(model, p, {"separate": sep.latent, "cfg_batch": bat.latent}, seed_noise(0), num_steps=2)


def test_nabla_backend_end_to_end():
    """Sampling through the fractal layout with padding (8x8 latent = 4x4 tokens in one padded tile):
    with P = 1 it follows the dense reference, like sdpa."""
    model = make(nabla={"threshold": 1.0})
    p = prompts(model.config)
    dense = generate(model, shape=SHAPE, num_steps=2, attention_backend="sdpa", **p)
    sparse = generate(model, shape=SHAPE, num_steps=2, attention_backend="nabla", **p)
    check_sampled(model, p, {"sdpa": dense.latent, "nabla": sparse.latent}, seed_noise(0), num_steps=2)


def test_guidance_one_runs_one_branch():
    model = make()
    p = prompts(model.config)
    res = generate(model, shape=SHAPE, num_steps=3, guidance_scale=1.0, text=p["text"],
                   pooled_text=p["pooled_text"])
    assert res.nfe == 3


def _capture_inputs(model):
    seen = []
    model.visual_embeddings.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    return seen


def test_image_to_video_first_frame_handling():
    model = make(visual_cond=True)
    seen = _capture_inputs(model)
    first = torch.randn(1, 8, 8, 4)
    res = generate(model, shape=SHAPE, num_steps=3, first_frame=first, **prompts(model.config))
    assert torch.equal(res.latent[:, 0], first)
    assert len(seen) == 6
    for xin in seen:
        assert torch.equal(xin[:, 0, ..., :4], first)  # clean latent in the noisy channels of frame 0
        assert not xin[..., 4:8].any()  # official: cond channels stay zero
        assert torch.equal(xin[..., 8], torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8))
    # text-to-video with a visual_cond model: zero cond and mask
    seen.clear()
    generate(model, shape=SHAPE, num_steps=1, guidance_scale=1.0, text=torch.randn(1, 4, 48),
             pooled_text=torch.randn(1, 24))
    assert not seen[0][..., 4:].any()
    # the Diffusers variant also fills the cond channels of frame 0
    seen.clear()
    generate(model, shape=SHAPE, num_steps=1, guidance_scale=1.0, first_frame=first, i2v_cond_channels=True,
             text=torch.randn(1, 4, 48), pooled_text=torch.randn(1, 24))
    assert torch.equal(seen[0][:, 0, ..., 4:8], first) and not seen[0][:, 1:, ..., 4:8].any()


def test_text_to_image_and_editing_channels():
    t2i = make()
    res = generate(t2i, shape=(1, 8, 12), num_steps=2, guidance_scale=3.5, **prompts(t2i.config))
    assert res.latent.shape == (1, 1, 8, 12, 4) and torch.isfinite(res.latent).all()
    edit = make(instruct_type="channel")
    seen = _capture_inputs(edit)
    src = torch.randn(1, 8, 12, 4)
    generate(edit, shape=(1, 8, 12), num_steps=1, guidance_scale=1.0, source_image=src,
             text=torch.randn(1, 4, 48), pooled_text=torch.randn(1, 24))
    assert torch.equal(seen[0][:, 0, ..., 4:8], src) and bool((seen[0][..., 8] == 1).all())
    with pytest.raises(ValueError, match="visual_cond"):
        generate(t2i, shape=SHAPE, num_steps=1, first_frame=src, **prompts(t2i.config))


# ------------------------------------------------------------------------- I2V first-frame normalisation
def reference_normalize(lat: torch.Tensor, reference_frames: int = 5, clamp_values: bool = False):
    """The official post-processing written out plainly for one sample (T, H, W, C), frame by frame."""
    out = lat.clone()
    t_len = lat.shape[0]
    if t_len <= 4:
        return out
    ref = lat[4 : 4 + min(reference_frames, t_len - 1)]
    ref_mean, ref_std = ref.mean().item(), ref.std().item()
    for i in range(4):
        frame = lat[i]
        mean, std = frame.mean().item(), frame.std().item()
        target_mean = min(max(ref_mean, mean - 0.05), mean + 0.1)
        target_std = min(max(ref_std, std - 0.1), std + 0.25)
        new = (frame - mean) / std * target_std + target_mean
        if clamp_values:
            new = new.clamp(ref.min().item(), ref.max().item())
        out[i] = new
    return out


def _frames_with_stats(t_len: int, seed: int = 0) -> torch.Tensor:
    """(1, T, 4, 4, 4) fp32 latents: reference frames of different means (so a wrong reference slice
    shows), source frames set relative to the reference statistics so that frame 0 binds the upper
    mean and std clamps, frame 1 the lower ones, frames 2 and 3 neither."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t_len, 4, 4, 4, generator=g, dtype=torch.float64)
    for j in range(4, t_len):
        x[j] = x[j] * (0.8 + 0.1 * j) + 0.15 * (j - 6)
    ref = x[4:9]
    ref_mean, ref_std = ref.mean().item(), ref.std().item()
    for i, (mean, std) in enumerate([(ref_mean - 0.5, ref_std - 0.6), (ref_mean + 0.5, ref_std + 1.0),
                                     (ref_mean - 0.02, ref_std + 0.05), (ref_mean + 0.03, ref_std - 0.2)]):
        z = x[i] - x[i].mean()
        x[i] = z / z.std() * std + mean
    return x.float()[None]


@pytest.mark.parametrize("t_len, reference_frames", [(9, 5), (6, 5), (11, 5), (9, 2)])
def test_normalize_first_frame_matches_the_per_frame_formula(t_len, reference_frames):
    x = _frames_with_stats(t_len)
    out = normalize_first_frame(x, reference_frames=reference_frames)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close_to_reference(out[0], reference_normalize(x[0].double(), reference_frames),
                              reference_normalize(x[0], reference_frames))
    assert torch.equal(out[:, 4:], x[:, 4:])
    # the clamps bind as intended: the output frame statistics are the clamped targets
    ref = x[0, 4 : 4 + min(reference_frames, t_len - 1)].double()
    ref_mean, ref_std = ref.mean().item(), ref.std().item()
    src = x[0, :4].double()
    means = [src[i].mean().item() for i in range(4)]
    stds = [src[i].std().item() for i in range(4)]
    expected = [(means[0] + 0.1, stds[0] + 0.25), (means[1] - 0.05, stds[1] - 0.1)]
    if reference_frames == 5:  # frames 2, 3 were built inside the bands of this reference (frames 4..8)
        expected += [(ref_mean, ref_std)] * 2
    for i, (mean, std) in enumerate(expected):
        assert out[0, i].double().mean().item() == pytest.approx(mean, abs=1e-5)
        assert out[0, i].double().std().item() == pytest.approx(std, abs=1e-5)
    assert ref_mean > means[0] + 0.1 and ref_std > stds[0] + 0.25  # frame 0: upper clamps bind
    assert ref_mean < means[1] - 0.05 and ref_std < stds[1] - 0.1  # frame 1: lower clamps bind


def test_normalize_first_frame_short_videos_batches_and_dtypes():
    for t_len in (1, 2, 3, 4):  # no reference frame: unchanged (the official code gives NaN for 2..4)
        x = torch.randn(2, t_len, 4, 4, 4)
        out = normalize_first_frame(x)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    a = _frames_with_stats(9, seed=1)
    b = _frames_with_stats(9, seed=2) * 3.0 + 1.0  # other statistics: a shared reduction would show
    both = normalize_first_frame(torch.cat([a, b]))
    for i, x in enumerate((a, b)):
        assert_close_to_reference(both[i], reference_normalize(x[0].double()), reference_normalize(x[0]))
    # low-precision input: computed in fp32, returned in the input dtype; the input is not modified
    xb = a.bfloat16()
    keep = xb.clone()
    out = normalize_first_frame(xb)
    assert out.dtype == torch.bfloat16 and torch.equal(xb, keep)
    assert torch.equal(out, normalize_first_frame(xb.float()).bfloat16())


def test_normalize_first_frame_clamp_values():
    x = _frames_with_stats(9)
    out = normalize_first_frame(x, clamp_values=True)
    assert_close_to_reference(out[0], reference_normalize(x[0].double(), clamp_values=True),
                              reference_normalize(x[0], clamp_values=True))
    ref = x[0, 4:9]
    assert bool((out[0, :4] >= ref.min()).all()) and bool((out[0, :4] <= ref.max()).all())
    unclamped = normalize_first_frame(x)
    assert not torch.equal(out, unclamped)  # frame 1 (std ~ reference + 0.9) does leave the range
    assert torch.equal(out[:, 4:], x[:, 4:])


def test_normalize_first_frame_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(9, 4, 4, 4\)"):
        normalize_first_frame(torch.randn(9, 4, 4, 4))
    with pytest.raises(ValueError, match="list"):
        normalize_first_frame([[0.0]])
    with pytest.raises(ValueError, match="int64"):
        normalize_first_frame(torch.zeros(1, 9, 4, 4, 4, dtype=torch.long))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            normalize_first_frame(torch.randn(1, 9, 4, 4, 4), reference_frames=bad)


def test_generate_normalizes_the_first_frames_for_image_to_video():
    model = make(visual_cond=True)
    first = torch.randn(1, 8, 8, 4)
    kw = dict(shape=(6, 8, 8), num_steps=2, guidance_scale=1.0, first_frame=first,
              text=torch.randn(1, 4, 48), pooled_text=torch.randn(1, 24))
    raw = generate(model, normalize_first_frame=False, **kw).latent
    res = generate(model, **kw).latent
    assert torch.equal(raw[:, 0], first)
    assert torch.equal(res, normalize_first_frame(raw))
    assert not torch.allclose(res[:, :4], raw[:, :4]) and torch.equal(res[:, 4:], raw[:, 4:])
    # text-to-video (no first frame) is left alone
    kw.pop("first_frame")
    t2v = generate(model, **kw).latent
    assert torch.equal(t2v, generate(model, normalize_first_frame=False, **kw).latent)


# ------------------------------------------------------------------------------------------ MagCache
@pytest.mark.parametrize(
    "ratio, cfg_scale, skipped",
    [
        # retention: slots 0-3 of 20 compute. Ratio 1: error 0, so each branch skips K = 2 calls, then
        # computes once: 8 remaining calls per branch -> skip, skip, compute, skip, skip, compute, skip, skip.
        (1.0, 5.0, 12),
        # 1.05: error 0.05 after one skip, 0.05 + 0.1025 > 0.12 after two: skip, compute, ... = 4 per branch.
        (1.05, 5.0, 8),
        (1.5, 5.0, 0),
        (1.0, 1.0, 6),  # no CFG: only the cond slots exist
    ],
)
def test_magcache_skip_counts(ratio, cfg_scale, skipped):
    model = make()
    p = prompts(model.config)
    mc = MagCacheConfig(mag_ratios=[ratio] * 18)
    res = generate(model, shape=SHAPE, num_steps=10, guidance_scale=cfg_scale, magcache=mc, **p)
    calls = 20 if cfg_scale != 1.0 else 10
    assert res.skipped == skipped and res.nfe == calls - skipped
    if skipped == 0:
        plain = generate(model, shape=SHAPE, num_steps=10, guidance_scale=cfg_scale, **p)
        assert torch.equal(res.latent, plain.latent)


def test_magcache_interpolates_ratios_and_calibrates():
    cache = MagCache(MagCacheConfig(mag_ratios=[2.0, 3.0] * 4), num_steps=10)
    # nearest interpolation per branch of [1, r, r, r, r] (the [1, 1] prefix included) onto 10 steps
    assert cache.ratios[0::2] == [1.0] * 2 + [2.0] * 8 and cache.ratios[1::2] == [1.0] * 2 + [3.0] * 8
    model = make()
    p = prompts(model.config)
    cal = generate(model, shape=SHAPE, num_steps=6, calibrate=True, **p)
    assert len(cal.mag_ratios) == 10 and all(r > 0 for r in cal.mag_ratios)
    res = generate(model, shape=SHAPE, num_steps=6, magcache=MagCacheConfig(mag_ratios=cal.mag_ratios), **p)
    assert res.nfe + res.skipped == 12


OFFICIAL_CONFIGS = {
    "k5_lite_i2v_5s_sft_sd", "k5_lite_t2i_sft_hd", "k5_lite_t2v_10s_nocfg_sd", "k5_lite_t2v_10s_sft_sd",
    "k5_lite_t2v_5s_nocfg_sd", "k5_lite_t2v_5s_sft_sd", "k5_pro_i2v_5s_sft_hd", "k5_pro_i2v_5s_sft_sd",
    "k5_pro_t2v_10s_sft_hd", "k5_pro_t2v_10s_sft_sd", "k5_pro_t2v_5s_sft_hd", "k5_pro_t2v_5s_sft_sd",
}


def test_bundled_official_mag_ratios():
    assert set(OFFICIAL_MAG_RATIOS) == set(OFFICIAL_NUM_STEPS) == OFFICIAL_CONFIGS
    for name, ratios in OFFICIAL_MAG_RATIOS.items():
        assert OFFICIAL_NUM_STEPS[name] == 50  # none of the distil (16-step) configs has MagCache
        assert len(ratios) == 2 * OFFICIAL_NUM_STEPS[name] - 2 and len(ratios) % 2 == 0, name
        assert all(type(r) is float for r in ratios), name
        assert all(0.7 < r < 1.2 for r in ratios[0::2]), name  # cond slots
        if "nocfg" in name:
            assert set(ratios[1::2]) == {0.0}, name  # guidance 1: no uncond calls
        else:
            assert all(0.7 < r < 1.2 for r in ratios[1::2]), name
    # spot checks of the transcription (first and last pair of a few configs)
    assert OFFICIAL_MAG_RATIOS["k5_lite_t2v_5s_sft_sd"][:2] == (0.91607, 0.91507)
    assert OFFICIAL_MAG_RATIOS["k5_lite_t2v_5s_sft_sd"][-2:] == (0.84336, 0.84193)
    assert OFFICIAL_MAG_RATIOS["k5_pro_i2v_5s_sft_hd"][:2] == (1.03563, 1.03368)
    assert OFFICIAL_MAG_RATIOS["k5_pro_i2v_5s_sft_hd"][-2:] == (0.81038, 0.81322)
    assert OFFICIAL_MAG_RATIOS["k5_lite_t2v_10s_nocfg_sd"][-2:] == (0.79353, 0.0)

    mc = MagCacheConfig.official("k5_pro_t2v_5s_sft_sd", threshold=0.2, max_skips=3)
    assert tuple(mc.mag_ratios) == OFFICIAL_MAG_RATIOS["k5_pro_t2v_5s_sft_sd"]
    assert (mc.threshold, mc.max_skips, mc.retention_ratio) == (0.2, 3, 0.2)
    assert MagCacheConfig.official("k5_lite_t2i_sft_hd").threshold == 0.12
    cache = MagCache(MagCacheConfig.official("k5_lite_i2v_5s_sft_sd"), num_steps=50)  # used as is
    assert cache.ratios == [1.0, 1.0, *OFFICIAL_MAG_RATIOS["k5_lite_i2v_5s_sft_sd"]]
    with pytest.raises(ValueError, match="k5_lite_t2v_5s_sft_sd"):
        MagCacheConfig.official("k5_lite_t2v_5s_distil_sd")


def _expected_skips(ratios, num_steps, use_cfg, threshold=0.12, max_skips=2, retention=0.2):
    """The official skip rule, written out: per branch, accumulate |1 - prod ratios| over calls."""
    ratios = [1.0, 1.0, *ratios]
    skipped = 0
    for branch in (0, 1) if use_cfg else (0,):
        acc_ratio, acc_err, acc_steps, have_residual = 1.0, 0.0, 0, False
        for slot in range(branch, 2 * num_steps, 2):
            if slot >= int(2 * num_steps * retention):
                acc_ratio *= ratios[slot]
                acc_steps += 1
                acc_err += abs(1 - acc_ratio)
                if acc_err < threshold and acc_steps <= max_skips and have_residual:
                    skipped += 1
                    continue
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
            have_residual = True
    return skipped


@pytest.mark.parametrize("name, cfg_scale, overrides", [
    ("k5_lite_t2v_5s_sft_sd", 5.0, {}),  # 52 skips of 100 calls
    ("k5_lite_t2v_5s_sft_sd", 5.0, {"max_skips": 3}),  # 58
    ("k5_lite_t2v_5s_nocfg_sd", 1.0, {}),  # 26 of 50
])
def test_official_magcache_skip_counts(name, cfg_scale, overrides):
    model = make()
    p = prompts(model.config)
    if cfg_scale == 1.0:
        p = dict(text=p["text"], text_mask=p["text_mask"], pooled_text=p["pooled_text"])
    res = generate(model, shape=(1, 8, 8), num_steps=50, guidance_scale=cfg_scale,
                   magcache=MagCacheConfig.official(name, **overrides), **p)
    skipped = _expected_skips(OFFICIAL_MAG_RATIOS[name], 50, cfg_scale != 1.0, **overrides)
    calls = 100 if cfg_scale != 1.0 else 50
    assert skipped > 0 and res.skipped == skipped and res.nfe == calls - skipped


def test_cli_runs_a_tiny_model_end_to_end(tmp_path):
    from kandinsky_model.__main__ import main

    args = ["--steps", "2", "--frames", "2", "--height", "8", "--width", "8", "--out", str(tmp_path / "l.pt")]
    out = main(args)
    saved = torch.load(tmp_path / "l.pt")
    assert saved["latent"].shape == (1, 2, 8, 8, 4) and saved["nfe"] == 4
    assert torch.equal(saved["latent"], out["latent"])


def test_encode_prompt_applies_template_and_crop():
    """The adapter with stand-ins for the transformers objects: template, truncation, crop, mask."""
    from types import SimpleNamespace

    from kandinsky_model.sampler import CROP_START, PROMPT_TEMPLATES, encode_prompt

    seen = {}

    def processor(text, padding, truncation, max_length, return_tensors):
        seen.update(text=text, max_length=max_length)
        n = CROP_START["image"] + 3
        mask = torch.tensor([[1] * n, [1] * (n - 1) + [0]])
        return {"input_ids": torch.arange(n).repeat(2, 1), "attention_mask": mask}

    class Qwen(torch.nn.Linear):
        def forward(self, input_ids, attention_mask, output_hidden_states):
            return SimpleNamespace(hidden_states=[None, input_ids[..., None].float().expand(-1, -1, 4)])

    class Clip(torch.nn.Linear):
        def forward(self, input_ids):
            return SimpleNamespace(pooler_output=torch.ones(input_ids.shape[0], 2))

    def clip_tok(prompts, padding, truncation, max_length, return_tensors):
        return {"input_ids": torch.zeros(len(prompts), max_length, dtype=torch.long)}

    text, mask, pooled = encode_prompt(["a cat", "a dog"], qwen=Qwen(1, 1), qwen_processor=processor,
                                       clip=Clip(1, 1), clip_tokenizer=clip_tok, kind="image")
    assert seen["text"][0] == PROMPT_TEMPLATES["image"].format("a cat") and seen["max_length"] == 512 + 41
    assert text.shape == (2, 3, 4) and text[0, 0, 0] == 41
    assert mask.tolist() == [[True, True, True], [True, True, False]] and pooled.shape == (2, 2)
