"""benchmarks/_vae_runner.py: one VAE side in its own process answers rounds with its times and peak RSS,
saves its outputs, and reports why it cannot load. Tiny config, 5x16x16 clip (a second or two a side)."""
from __future__ import annotations

import pytest
import torch

from benchmarks._vae_runner import Runner
from kandinsky_model import CausalVAEConfig, CausalVideoVAE


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    vae = CausalVideoVAE(CausalVAEConfig(block_out_channels=(8, 16, 16, 32), norm_num_groups=4, latent_channels=8))
    return str(vae.save_pretrained(tmp_path_factory.mktemp("vae")))


def test_round_and_save(weights, tmp_path):
    with Runner("reference", weights, "fp32", 5, 16, latent_channels=8,
                env={"KANDINSKY_KERNELS_BACKEND": "reference"}) as r:
        ready = r.wait_ready()
        assert ready["settings"] == {"tiling": "none", "KANDINSKY_KERNELS_BACKEND": "reference"}
        rep = r.round()
        assert rep["encode_s"] > 0 and rep["decode_s"] > 0
        assert rep["peak_mb"] == max(rep["encode_peak_mb"], rep["decode_peak_mb"]) >= 0
        assert rep["hwm_mb"] >= ready["rss_mb"] > 0
        r.save(str(tmp_path / "out.pt"))
    out = torch.load(tmp_path / "out.pt")
    assert out["latents"].shape == (1, 8, 2, 2, 2) and out["video"].shape == (1, 3, 5, 16, 16)
    # the same seeds and weights in this process give the same outputs
    vae = CausalVideoVAE.from_pretrained(weights)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 16, 16, generator=g) * 2 - 1
    latents = torch.randn(1, 8, 2, 2, 2, generator=g)
    from kandinsky_kernels.backends import use_backend

    with torch.no_grad(), use_backend("reference"):  # as the runner's side (its environment above)
        torch.testing.assert_close(out["latents"], vae.encode(video, tiling="none"))
        torch.testing.assert_close(out["video"], vae.decode(latents, tiling="none"))


def test_a_side_that_cannot_load_says_why(tmp_path):
    with Runner("ours", str(tmp_path / "missing"), "fp32", 5, 16) as r:
        with pytest.raises(RuntimeError, match="ours: FileNotFoundError: no VAE checkpoint at"):
            r.wait_ready()
