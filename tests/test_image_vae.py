"""kandinsky_model.FluxImageVAE: the FLUX.1-dev config, outputs equal to diffusers' AutoencoderKL with
the same weights, the latent normalisation, local-folder loading, input errors, and the ImportError
naming the pip spec when diffusers is missing. Tiny random configs only (no weights are downloaded)."""
from __future__ import annotations

import builtins
import json

import pytest
import torch

from kandinsky_model import FLUX_DEV_VAE_CONFIG, FluxImageVAE

diffusers = pytest.importorskip("diffusers", reason="FluxImageVAE wraps diffusers' AutoencoderKL")

# Two blocks (compression 2), a few channels, groups of 2: milliseconds per call.
TINY = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)


def tiny_vae(seed: int = 0) -> FluxImageVAE:
    torch.manual_seed(seed)
    vae = FluxImageVAE(TINY).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norms and biases, so a dropped one would show
        for name, p in vae.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return vae


def images(b=2, h=16, w=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def test_flux_dev_config_on_meta():
    with torch.device("meta"):
        vae = FluxImageVAE()
    cfg = vae.config
    assert cfg.latent_channels == 16 and list(cfg.block_out_channels) == [128, 256, 512, 512]
    assert cfg.scaling_factor == pytest.approx(0.3611) and cfg.shift_factor == pytest.approx(0.1159)
    assert vae.spatial_compression_ratio == 8
    keys = vae.model.state_dict().keys()
    # FLUX.1-dev has no 1x1 quant convs: its checkpoint has no such keys
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in keys)
    assert FLUX_DEV_VAE_CONFIG["use_quant_conv"] is False  # the module constant is not mutated by builds


def test_same_outputs_as_diffusers_autoencoder_kl():
    vae = tiny_vae()
    theirs = diffusers.AutoencoderKL(**{**FLUX_DEV_VAE_CONFIG, **TINY}).eval()
    theirs.load_state_dict(vae.model.state_dict())
    x = images()
    with torch.no_grad():
        z = vae.encode(x)
        dist = theirs.encode(x).latent_dist
        assert z.shape == (2, 4, 8, 12)
        torch.testing.assert_close(z, dist.mode())
        zs = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(zs, dist.sample(generator=torch.Generator().manual_seed(3)))
        y = vae.decode(z)
        assert y.shape == x.shape
        torch.testing.assert_close(y, theirs.decode(z).sample)
        torch.testing.assert_close(vae(x), y)


def test_normalize_is_flux_shift_and_scale():
    vae = tiny_vae()
    z = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(vae.normalize(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)


def test_bf16_weights_cast_the_input():
    vae = tiny_vae().to(torch.bfloat16)
    with torch.no_grad():
        z = vae.encode(images())  # fp32 input, bf16 weights
    assert z.dtype == torch.bfloat16 and vae.dtype == torch.bfloat16


def test_from_pretrained_local_folder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    cfg = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["shift_factor"] == pytest.approx(0.1159)
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):  # the folder, or a pipeline holding vae/
        back = FluxImageVAE.from_pretrained(path)
        sd = vae.model.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in back.model.state_dict().items())
    half = FluxImageVAE.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="local Diffusers-layout folders only"):
        FluxImageVAE.from_pretrained("black-forest-labs/FLUX.1-dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        FluxImageVAE.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype must be None or a floating-point"):
        FluxImageVAE.from_pretrained(tmp_path / "empty", dtype=torch.int8)
    with pytest.raises(ValueError, match="path must be a str"):
        FluxImageVAE.from_pretrained(3)
    # weights of another width than the config says
    tiny_vae().save_pretrained(tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["block_out_channels"] = [8, 32]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="cannot load it"):
        FluxImageVAE.from_pretrained(tmp_path / "bad")


@pytest.mark.parametrize("make,match", [
    (lambda: [1.0], "images must be a tensor of shape \\(B, 3, H, W\\), got list"),
    (lambda: torch.zeros(3, 16, 16), "4-D tensor .* got 3-D shape \\(3, 16, 16\\)"),
    (lambda: torch.zeros(1, 3, 1, 16, 16), "pass x\\[:, :, 0\\]"),
    (lambda: torch.zeros(1, 3, 16, 16, dtype=torch.int64), "floating-point tensor .* got dtype int64"),
    (lambda: torch.zeros(1, 4, 16, 16), "3 channels on dim 1 .* got shape \\(1, 4, 16, 16\\)"),
    (lambda: torch.zeros(1, 3, 15, 16), "multiples of 2, got H=15, W=16"),
    (lambda: torch.zeros(0, 3, 16, 16), "no empty dimension"),
    (lambda: torch.zeros(1, 3, 16, 16, device="meta"), "is on meta but the VAE's weights are on cpu"),
])
def test_encode_rejects_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae().encode(make())


def test_decode_and_option_errors():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="latents must have 4 channels on dim 1"):
        vae.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="sample must be"):
        vae.encode(images(), sample="yes")
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got int"):
        vae.encode(images(), generator=1)
    with pytest.raises(ValueError, match="config must be None or a dict"):
        FluxImageVAE([1])
    with pytest.raises(ValueError, match="not valid for diffusers' AutoencoderKL"):
        FluxImageVAE({"no_such_key": 1})


def test_missing_diffusers_names_the_pip_spec(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match='pip install "diffusers==0.42.1"'):
        FluxImageVAE(TINY)
