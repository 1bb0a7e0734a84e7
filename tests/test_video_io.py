"""The end of the pipeline: decoded videos written as files a person can open, and the CLI that makes
them (tiny random DiT and VAE)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky_model.video_io import contact_sheet, to_uint8_frames, write_video

HAVE_AV = importlib.util.find_spec("av") is not None


def _video(f=5, h=24, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, f, h, w, generator=g) * 2 - 1


def test_uint8_conversion_and_errors():
    v = torch.zeros(3, 2, 4, 6)
    v[0, 0, 0, 0], v[1, 1, 3, 5], v[2, 0, 1, 1] = 1.0, -1.0, 7.0  # 7 is clipped
    u = to_uint8_frames(v[None])
    assert u.shape == (2, 4, 6, 3) and u.dtype == torch.uint8
    assert u[0, 0, 0, 0] == 255 and u[1, 3, 5, 1] == 0 and u[0, 1, 1, 2] == 255 and u[0, 2, 2, 0] == 128
    for bad, match in [(torch.zeros(4, 2, 4, 6), r"\(3, F, H, W\)"), (torch.zeros(2, 3, 2, 4, 6), "one video"),
                       (torch.zeros(3, 2, 4, 6, dtype=torch.int32), "float"),
                       (torch.full((3, 2, 4, 6), float("nan")), "NaN"), ([1, 2], "torch.Tensor")]:
        with pytest.raises(ValueError, match=match):
            to_uint8_frames(bad)


@pytest.mark.parametrize("suffix", [".webp", ".gif"])
def test_pillow_formats_open_with_every_frame(tmp_path, suffix):
    v = _video()
    path = write_video(v, tmp_path / f"clip{suffix}", fps=12)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (40, 24)
        if suffix == ".webp":  # lossless: the pixels come back exactly
            im.seek(3)
            got = torch.from_numpy(np.array(im.convert("RGB")))
            assert torch.equal(got, to_uint8_frames(v)[3])


def test_mp4_or_webp_fallback(tmp_path, monkeypatch):
    from kandinsky_model import video_io

    monkeypatch.setattr(video_io, "_have_pyav", lambda: False)
    path = write_video(_video(), tmp_path / "clip.mp4")
    assert path.suffix == ".webp" and path.exists()  # no encoder installed: animated WebP instead
    with pytest.raises(ValueError, match=r"\.mp4, \.webp or \.gif"):
        write_video(_video(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="fps"):
        write_video(_video(), tmp_path / "clip.gif", fps=0)


@pytest.mark.skipif(not HAVE_AV, reason="PyAV is not installed (optional: pip install av)")
def test_mp4_through_pyav_has_frames_and_size(tmp_path):
    import av

    path = write_video(_video(f=9, h=23, w=41), tmp_path / "clip.mp4", fps=24)  # odd sizes get padded
    assert path.suffix == ".mp4"
    with av.open(str(path)) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (42, 24)


def test_contact_sheet(tmp_path):
    v = _video(f=7, h=8, w=10)
    path = contact_sheet(v, tmp_path / "sheet.png", max_frames=4, cols=2)
    with Image.open(path) as im:
        assert im.size == (20, 16)


        a = torch.from_numpy(np.array(im.convert("RGB")))
    u = to_uint8_frames(v)
    for k, i in enumerate([0, 2, 4, 6]):  # evenly spaced, first and last included
        r, c = divmod(k, 2)
        assert torch.equal(a[r * 8:(r + 1) * 8, c * 10:(c + 1) * 10], u[i])
    with pytest.raises(ValueError, match=r"\.png"):
        contact_sheet(v, tmp_path / "sheet.jpg")


def test_cli_end_to_end_writes_latent_video_and_sheet(tmp_path):
    """``python -m kandinsky_model`` with the tiny defaults: latent, a video with 1 + 4 (T - 1) frames of
    8x the latent size, and a contact sheet (the issue asks for under a minute on this CPU)."""
    import time

    from kandinsky_model.__main__ import main

    t0 = time.perf_counter()
    out = main(["--out", str(tmp_path / "run" / "latent.pt"), "--frames", "3", "--height", "8", "--width", "12",
                "--steps", "2", "--video-format", "webp"])
    assert time.perf_counter() - t0 < 60
    assert out["latent"].shape == (1, 3, 8, 12, 4)
    with Image.open(out["video_path"]) as im:
        assert im.n_frames == 9 and im.size == (96, 64)
    assert (tmp_path / "run" / "latent_frames.png").exists()
    none = main(["--out", str(tmp_path / "n.pt"), "--frames", "1", "--steps", "1", "--no-vae"])
    assert "video_path" not in none


def test_generate_decodes_with_the_vae_and_checks_it():
    from kandinsky_model import CrossDiT, generate, tiny
    from kandinsky_model.__main__ import tiny_vae

    torch.manual_seed(0)
    model = CrossDiT(tiny()).eval()
    text, pooled = torch.randn(1, 5, 48), torch.randn(1, 24)
    vae = tiny_vae(4).eval()
    res = generate(model, text, pooled, shape=(2, 4, 6), num_steps=2, guidance_scale=1.0, vae=vae)
    assert res.video.shape == (1, 3, 5, 32, 48)
    with torch.no_grad():  # generate decodes without autograd (the VAE's fused kernels; with autograd
        # recording, the ops take their differentiable torch references, equal only to ~1e-6)
        expected = vae.decode((res.latent / vae.scaling_factor).permute(0, 4, 1, 2, 3))
    torch.testing.assert_close(res.video, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="latent channels"):
        generate(model, text, pooled, shape=(2, 4, 6), num_steps=1, guidance_scale=1.0, vae=tiny_vae(16))
    with pytest.raises(ValueError, match="CausalVideoVAE"):
        generate(model, text, pooled, shape=(2, 4, 6), num_steps=1, guidance_scale=1.0, vae="vae")
