"""kandinsky_model.CausalVideoVAE: HunyuanVideo key layout, an independent plain-torch reference of the
whole VAE (dense block-causal mask, F.pad replicate, functional over the state dict), causality of the
causal conv and of the chunked attention, save/load round trips and their errors, input errors,
half precision, and (where installed) diffusers' AutoencoderKLHunyuanVideo with identical weights.

Tiny configs and small clips only; no tiling here (see the reference notes: tiled vs untiled must not
be compared with tolerances)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from kandinsky_model import CausalVideoVAE
from kandinsky_model.vae import CausalConv3d, CausalFrameAttention, CausalVAEConfig, block_causal_attention
from conftest import assert_close_to_reference

# The bar for the whole model against an independent implementation in fp32, untiled.
REL_L2_FP32 = 1e-3


# ------------------------------------------------------------------------------------------ helpers
def tiny_config(**overrides) -> CausalVAEConfig:
    """Four blocks like the real VAE (same strides), a few channels, 2 groups per norm... fast on 1 core."""
    kw = dict(block_out_channels=(8, 16, 16, 32), norm_num_groups=4, latent_channels=8)
    kw.update(overrides)
    return CausalVAEConfig(**kw)


def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random weights everywhere: GroupNorm affines away from (1, 0) and non-zero biases, so that a
    wrong norm or a dropped bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def make_vae(**overrides) -> CausalVideoVAE:
    return randomize(CausalVideoVAE(tiny_config(**overrides))).eval()


def video(b=2, f=9, h=32, w=40, seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, f, h, w, generator=g) * 2 - 1).to(dtype)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------- independent reference (functional, dense)
# Written from the HunyuanVideo / diffusers description, not from kandinsky_model.vae: it reads the
# state dict directly, pads with F.pad(replicate), upsamples with repeat_interleave and builds the
# dense (S, S) block-causal mask.
def _ref_conv(sd, p, x, stride=1):
    w = sd[p + ".weight"]
    kt, kh, kw = w.shape[2:]
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0), mode="replicate")
    return F.conv3d(x, w, sd[p + ".bias"], stride=stride)


def _ref_gn(sd, p, x, groups):
    return F.group_norm(x, groups, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _ref_resnet(sd, p, x, g):
    h = _ref_conv(sd, p + ".conv1.conv", F.silu(_ref_gn(sd, p + ".norm1", x, g)))
    h = _ref_conv(sd, p + ".conv2.conv", F.silu(_ref_gn(sd, p + ".norm2", h, g)))
    if p + ".conv_shortcut.conv.weight" in sd:
        x = _ref_conv(sd, p + ".conv_shortcut.conv", x)
    return x + h


def _ref_attention(sd, p, x, g):
    b, c, t, h, w = x.shape
    lin = lambda name, y: F.linear(y, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"])  # noqa: E731
    tok = _ref_gn(sd, p + ".group_norm", x, g).reshape(b, c, t * h * w).transpose(1, 2)
    q, k, v = lin("to_q", tok), lin("to_k", tok), lin("to_v", tok)
    frame = torch.arange(t).repeat_interleave(h * w)
    allowed = frame[None, :] <= frame[:, None]  # (S, S): query frame >= key frame
    scores = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(c)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
    out = lin("to_out.0", probs @ v) + x.reshape(b, c, t * h * w).transpose(1, 2)
    return out.transpose(1, 2).reshape(b, c, t, h, w)


def _ref_mid(sd, p, x, g):
    x = _ref_resnet(sd, p + ".resnets.0", x, g)
    x = _ref_attention(sd, p + ".attentions.0", x, g)
    return _ref_resnet(sd, p + ".resnets.1", x, g)


def _ref_strides(n):
    # diffusers: spatial halving in blocks i < log2(8) = 3, temporal halving in blocks n-3 and n-2.
    return [(2 if n - 3 <= i < n - 1 else 1, 2 if i < 3 else 1, 2 if i < 3 else 1) for i in range(n)]


def ref_encode_moments(sd, cfg, x):
    g, n = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = _ref_conv(sd, "encoder.conv_in.conv", x)
    for i, stride in enumerate(_ref_strides(n)):
        for j in range(cfg.layers_per_block):
            x = _ref_resnet(sd, f"encoder.down_blocks.{i}.resnets.{j}", x, g)
        if stride != (1, 1, 1):
            x = _ref_conv(sd, f"encoder.down_blocks.{i}.downsamplers.0.conv.conv", x, stride)
    x = _ref_mid(sd, "encoder.mid_block", x, g)
    x = _ref_conv(sd, "encoder.conv_out.conv", F.silu(_ref_gn(sd, "encoder.conv_norm_out", x, g)))
    return F.conv3d(x, sd["quant_conv.weight"], sd["quant_conv.bias"])


def ref_decode(sd, cfg, z):
    g, n = cfg.norm_num_groups, len(cfg.block_out_channels)
    x = F.conv3d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    x = _ref_conv(sd, "decoder.conv_in.conv", x)
    x = _ref_mid(sd, "decoder.mid_block", x, g)
    for i, (ft, fh, fw) in enumerate(_ref_strides(n)):
        for j in range(cfg.layers_per_block + 1):
            x = _ref_resnet(sd, f"decoder.up_blocks.{i}.resnets.{j}", x, g)
        if (ft, fh, fw) != (1, 1, 1):
            # frame 0 only upsampled in space; every later frame repeated ft times
            first = x[:, :, :1].repeat_interleave(fh, 3).repeat_interleave(fw, 4)
            rest = x[:, :, 1:].repeat_interleave(ft, 2).repeat_interleave(fh, 3).repeat_interleave(fw, 4)
            x = _ref_conv(sd, f"decoder.up_blocks.{i}.upsamplers.0.conv.conv", torch.cat([first, rest], 2))
    return _ref_conv(sd, "decoder.conv_out.conv", F.silu(_ref_gn(sd, "decoder.conv_norm_out", x, g)))


# --------------------------------------------------------------------------------------- layout
KEY_PATTERNS = [
    r"encoder\.conv_in\.conv\.(weight|bias)",
    r"(encoder\.down_blocks|decoder\.up_blocks)\.\d+\.resnets\.\d+\."
    r"(norm1|conv1\.conv|norm2|conv2\.conv|conv_shortcut\.conv)\.(weight|bias)",
    r"encoder\.down_blocks\.\d+\.downsamplers\.0\.conv\.conv\.(weight|bias)",
    r"(encoder|decoder)\.mid_block\.resnets\.\d+\.(norm1|conv1\.conv|norm2|conv2\.conv)\.(weight|bias)",
    r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
    r"decoder\.up_blocks\.\d+\.upsamplers\.0\.conv\.conv\.(weight|bias)",
    r"decoder\.conv_in\.conv\.(weight|bias)",
    r"(encoder|decoder)\.conv_norm_out\.(weight|bias)",
    r"(encoder|decoder)\.conv_out\.conv\.(weight|bias)",
    r"(quant_conv|post_quant_conv)\.(weight|bias)",
]


def test_default_layout_on_meta():
    vae = CausalVideoVAE.on_meta()
    sd = vae.state_dict()
    assert all(t.is_meta for t in sd.values())
    assert len(sd) == 248
    assert vae.num_parameters() == 246_478_803
    assert sum(p.numel() for p in vae.encoder.parameters()) == pytest.approx(100.34e6, abs=0.01e6)
    assert sum(p.numel() for p in vae.decoder.parameters()) == pytest.approx(146.14e6, abs=0.01e6)
    unmatched = [k for k in sd if not any(re.fullmatch(p, k) for p in KEY_PATTERNS)]
    assert not unmatched, unmatched
    shapes = {
        "encoder.conv_in.conv.weight": (128, 3, 3, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.conv.weight": (256, 128, 1, 1, 1),
        "encoder.down_blocks.2.downsamplers.0.conv.conv.weight": (512, 512, 3, 3, 3),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "encoder.conv_out.conv.weight": (32, 512, 3, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1, 1),
        "decoder.conv_in.conv.weight": (512, 16, 3, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight": (256, 512, 1, 1, 1),
        "decoder.up_blocks.2.resnets.2.conv2.conv.weight": (256, 256, 3, 3, 3),
        "decoder.up_blocks.2.upsamplers.0.conv.conv.weight": (256, 256, 3, 3, 3),
        "decoder.conv_norm_out.weight": (128,),
        "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    # 3 downsamplers (none in the last block), 3 upsamplers (none in the last), 2 + 3 resnets per block
    assert sum(".downsamplers.0.conv.conv.weight" in k for k in sd) == 3
    assert "encoder.down_blocks.3.downsamplers.0.conv.conv.weight" not in sd
    assert sum(".upsamplers.0.conv.conv.weight" in k for k in sd) == 3
    assert "decoder.up_blocks.3.upsamplers.0.conv.conv.weight" not in sd
    assert sum(re.fullmatch(r"decoder\.up_blocks\.\d\.resnets\.\d\.conv1\.conv\.weight", k) is not None
               for k in sd) == 12
    assert vae.config.down_strides == [(1, 2, 2), (2, 2, 2), (2, 2, 2), None]
    assert vae.scaling_factor == 0.476986


def test_config_validation_and_dicts():
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide every block width"):
        CausalVAEConfig(block_out_channels=(48, 64, 64, 64))
    with pytest.raises(ValueError, match="temporal_compression_ratio must be 4"):
        CausalVAEConfig(temporal_compression_ratio=8)
    with pytest.raises(ValueError, match="spatial_compression_ratio must be a power of 2"):
        CausalVAEConfig(spatial_compression_ratio=6)
    with pytest.raises(ValueError, match="block_out_channels must be a list of >= 3"):
        CausalVAEConfig(block_out_channels=(128, 256))
    with pytest.raises(ValueError, match="act_fn must be 'silu'"):
        CausalVAEConfig(act_fn="gelu")
    cfg = tiny_config()
    assert CausalVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # the original release's config.json (AutoencoderKLCausal3D names, its tiling settings)
    original = {
        "_class_name": "AutoencoderKLCausal3D", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlockCausal3D"] * 4, "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
        "norm_num_groups": 32, "scaling_factor": 0.476986, "time_compression_ratio": 4,
        "mid_block_add_attention": True, "sample_size": 256, "sample_tsize": 64,
    }
    with pytest.warns(UserWarning, match=r"ignores keys \['sample_size', 'sample_tsize'\]"):
        assert CausalVAEConfig.from_dict(original) == CausalVAEConfig()
    with pytest.raises(ValueError, match="down_block_types must list one of"):
        CausalVAEConfig.from_dict({"down_block_types": ["DownBlock2D"] * 4})


# ------------------------------------------------------------------------------ reference parity
@pytest.mark.parametrize("shape", [(2, 9, 32, 40), (1, 1, 16, 24), (1, 5, 8, 16)], ids=str)
def test_matches_independent_reference_fp32(shape):
    b, f, h, w = shape
    vae = make_vae()
    cfg, sd = vae.config, vae.state_dict()
    x = video(b, f, h, w)
    with torch.no_grad():
        z = vae.encode(x)
        moments = ref_encode_moments(sd, cfg, x)
        mean, logvar = moments.chunk(2, dim=1)
        assert z.shape == (b, 8, 1 + (f - 1) // 4, h // 8, w // 8)
        assert rel_l2(z, mean) < REL_L2_FP32

        gen = torch.Generator().manual_seed(5)
        zs = vae.encode(x, sample=True, generator=gen)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
        assert rel_l2(zs, mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) < REL_L2_FP32

        y = vae.decode(z)
        assert y.shape == (b, 3, f, h, w)
        assert rel_l2(y, ref_decode(sd, cfg, z)) < REL_L2_FP32


def test_sample_uses_generator_and_clamps_logvar():
    vae = make_vae()
    x = video(1, 5, 16, 16)
    with torch.no_grad():
        a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
        # a huge log-variance is clamped at 20: std = e^10, finite
        vae.quant_conv.bias[8:] += 1e4
        d = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(d).all()
    mean = vae.encode(x).detach()
    assert (d - mean).abs().max() <= math.exp(10) * 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_close_to_fp32(dtype):
    vae = make_vae()
    cfg, sd = vae.config, vae.state_dict()
    x = video(1, 9, 32, 32)
    with torch.no_grad():
        moments = ref_encode_moments(sd, cfg, x)
        z_ref = moments[:, :8]
        y_ref = ref_decode(sd, cfg, z_ref)
        sd_half = {k: v.to(dtype) for k, v in sd.items()}
        # plain torch at this dtype: the same reference run with half weights and inputs
        z_torch = ref_encode_moments(sd_half, cfg, x.to(dtype))[:, :8]
        y_torch = ref_decode(sd_half, cfg, z_ref.to(dtype))
        half = vae.to(dtype)
        z = half.encode(x)  # fp32 input: cast to the weights' dtype
        y = half.decode(z_ref.to(dtype))
    assert z.dtype == dtype and y.dtype == dtype
    assert_close_to_reference(z, z_ref, z_torch, name="latents")
    assert_close_to_reference(y, y_ref, y_torch, name="frames")


# ------------------------------------------------------------------------------------ causality
@pytest.mark.parametrize(
    "kernel, stride", [(3, 1), (3, (2, 2, 2)), (3, (1, 2, 2)), ((1, 3, 3), 1), ((3, 1, 1), 1), (1, 1)], ids=str
)
def test_causal_conv3d_is_causal_and_replicates_frame0(kernel, stride):
    conv = randomize(CausalConv3d(4, 6, kernel, stride=stride))
    x = torch.randn(2, 4, 9, 10, 12)
    with torch.no_grad():
        y = conv(x)
        st = conv.conv.stride[0]
        assert y.shape[2:] == ((9 - 1) // st + 1, -(-10 // conv.conv.stride[1]), -(-12 // conv.conv.stride[2]))
        for j in range(1, 9):  # change frames >= j: outputs that read only frames < j stay bit-identical
            x2 = x.clone()
            x2[:, :, j:] = torch.randn_like(x2[:, :, j:])
            y2 = conv(x2)
            unchanged = (j - 1) // st + 1  # output i reads input frames <= i * st
            assert torch.equal(y2[:, :, :unchanged], y[:, :, :unchanged]), j
            assert not torch.equal(y2[:, :, unchanged:], y[:, :, unchanged:]), j
        # frame 0 is repeated k-1 times in front: a clip of one frame equals the first output of a
        # clip whose first k frames all equal it
        kt = conv.conv.kernel_size[0]
        still = x[:, :, :1].expand(-1, -1, kt, -1, -1).contiguous()
        assert torch.equal(conv(x[:, :, :1]), conv(still)[:, :, :1])


def test_block_causal_attention_is_causal_and_never_dense(monkeypatch):
    t, hw, d = 5, 6, 16
    q, k, v = (torch.randn(2, 1, t * hw, d) for _ in range(3))
    frame = torch.arange(t).repeat_interleave(hw)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=frame[None, :] <= frame[:, None])

    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q_, k_, v_, attn_mask=None, **kw):
        seen.append((q_.shape[-2], k_.shape[-2], None if attn_mask is None else attn_mask.numel()))
        return real_sdpa(q_, k_, v_, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for chunk in (1, 2, 3, 5):
        seen.clear()
        out = block_causal_attention(q, k, v, hw, frames_per_chunk=chunk)
        assert_close_to_reference(out, dense, name=f"chunk={chunk}")
        assert len(seen) == -(-t // chunk)
        for nq, nk, mask_numel in seen:
            assert nq <= chunk * hw and (mask_numel is None or mask_numel == nq * nk)
        if chunk == 1:
            assert all(m is None for *_, m in seen)  # one frame per chunk needs no mask at all
    monkeypatch.undo()
    # changing q, k, v of frames >= 3 never changes the outputs of frames 0..2
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for tensor in (q2, k2, v2):
        tensor[:, :, 3 * hw:] = torch.randn_like(tensor[:, :, 3 * hw:])
    out2 = block_causal_attention(q2, k2, v2, hw)
    out = block_causal_attention(q, k, v, hw)
    assert torch.equal(out2[:, :, : 3 * hw], out[:, :, : 3 * hw])


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_mid_block_attention_matches_dense_mask(chunk):
    attn = randomize(CausalFrameAttention(32, 4, frames_per_chunk=chunk))
    x = torch.randn(2, 32, 4, 3, 5)
    sd = {f"a.{k}": v for k, v in attn.state_dict().items()}
    with torch.no_grad():
        assert_close_to_reference(attn(x), _ref_attention(sd, "a", x, 4), name="attention")


# ----------------------------------------------------------------------------------- input errors
BAD_ENCODE = [
    (lambda: video(1, 8, 16, 16), r"1 \+ 4k frames .* got F=8; nearest accepted: 5 or 9"),
    (lambda: video(1, 5, 20, 16), "height and width must be multiples of 8, got H=20, W=16"),
    (lambda: video(1, 5, 16, 12), "height and width must be multiples of 8, got H=16, W=12"),
    (lambda: torch.zeros(1, 4, 5, 16, 16), r"must have 3 channels on dim 1 \(B, 3, F, H, W\)"),
    (lambda: torch.zeros(1, 3, 16, 16), r"5-D tensor .* got 4-D shape \(1, 3, 16, 16\) \(for images pass F = 1"),
    (lambda: torch.zeros(3, 5, 16, 16, 1, 1), "5-D tensor .* got 6-D"),
    (lambda: torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8), "floating-point tensor .* got dtype uint8"),
    (lambda: torch.zeros(0, 3, 5, 16, 16), "no empty dimension"),
    (lambda: [[0.0]], "must be a tensor of shape"),
]
BAD_DECODE = [
    (lambda: torch.zeros(1, 4, 2, 2, 2), r"must have 8 channels on dim 1 \(B, 8, t, h, w\)"),
    (lambda: torch.zeros(1, 8, 2, 2), "5-D tensor .* got 4-D"),
    (lambda: torch.zeros(1, 8, 2, 2, 2, dtype=torch.int64), "floating-point tensor .* got dtype int64"),
    (lambda: torch.zeros(1, 8, 0, 2, 2), "no empty dimension"),
]


@pytest.mark.parametrize("make, match", BAD_ENCODE, ids=range(len(BAD_ENCODE)))
def test_encode_rejects_bad_input(make, match):
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        make_vae().encode(make())


@pytest.mark.parametrize("make, match", BAD_DECODE, ids=range(len(BAD_DECODE)))
def test_decode_rejects_bad_input(make, match):
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        make_vae().decode(make())


def test_encode_rejects_bad_options():
    vae, x = make_vae(), video(1, 1, 8, 8)
    with pytest.raises(ValueError, match="sample must be a bool"):
        vae.encode(x, sample=1)
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        vae.encode(x, sample=True, generator=0)
    with pytest.raises(ValueError, match="config must be a CausalVAEConfig"):
        CausalVideoVAE({"latent_channels": 16})


# ------------------------------------------------------------------------------------ autograd
def test_no_grad_keeps_nothing_and_grad_still_works():
    vae = make_vae()
    x = video(1, 5, 16, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        with torch.no_grad():
            y = vae.decode(vae.encode(x))
        assert y.grad_fn is None and not saved  # nothing recorded, so no activation is kept alive
        # the in-place SiLU / residual adds are switched off under autograd: gradients are right
        x.requires_grad_(True)
        loss = vae(x).square().mean()
    assert saved
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in vae.parameters())


# ----------------------------------------------------------------------------------- save / load
def _same_weights(a: CausalVideoVAE, b: CausalVideoVAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_pretrained_round_trip(tmp_path):
    vae = make_vae()
    folder = vae.save_pretrained(tmp_path / "vae")
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKLHunyuanVideo" and cfg["block_out_channels"] == [8, 16, 16, 32]
    loaded = CausalVideoVAE.from_pretrained(folder)
    assert loaded.config == vae.config
    _same_weights(loaded, vae)
    # a pipeline folder holding vae/, and a dtype cast on load
    assert CausalVideoVAE.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    x = video(1, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), vae.decode(vae.encode(x)))


def test_from_pretrained_on_cpu_owns_its_weights(tmp_path):
    """Loaded CPU weights are copies (no view of the memory-mapped file stays alive, so the file is
    unmapped) and the Conv3d weights are channels-last-3d, the layout the CPU VAE runs in."""
    from torch import nn

    vae = make_vae()
    folder = vae.save_pretrained(tmp_path / "vae")
    loaded = CausalVideoVAE.from_pretrained(folder)
    _same_weights(loaded, vae)
    for m in loaded.modules():
        if isinstance(m, nn.Conv3d):
            assert m.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with open("/proc/self/maps") as f:  # Linux; the test suite runs there
        assert not any(str(folder) in line for line in f)
    resaved = loaded.save_pretrained(tmp_path / "again")  # written contiguous, readable back
    _same_weights(CausalVideoVAE.from_pretrained(resaved), vae)


def test_sharded_folder_round_trip(tmp_path):
    vae = make_vae()
    vae.save_pretrained(tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    _same_weights(CausalVideoVAE.from_pretrained(tmp_path), vae)


@pytest.mark.parametrize("fmt", ["pt_prefix_wrapper", "pt_plain", "safetensors", "safetensors_prefix"])
def test_bare_original_state_dict(tmp_path, fmt):
    from safetensors.torch import save_file

    vae = make_vae()
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    if "prefix" in fmt:
        # the original loader keeps only vae.* keys when there are any; other entries are dropped
        sd = {**{f"vae.{k}": v for k, v in sd.items()}, "loss.logvar": torch.zeros(())}
    if fmt.startswith("pt"):
        file = tmp_path / "pytorch_model.pt"
        torch.save({"state_dict": sd} if "wrapper" in fmt else sd, file)
    else:
        file = tmp_path / "vae.safetensors"
        save_file(sd, str(file))
    loaded = CausalVideoVAE.from_pretrained(file, config=tiny_config())
    _same_weights(loaded, vae)
    with pytest.raises(ValueError, match="does not match the CausalVideoVAE config"):
        CausalVideoVAE.from_pretrained(file)  # a bare file means the published config by default


def test_mismatch_error_lists_every_problem(tmp_path):
    vae = make_vae()
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    del sd["decoder.conv_out.conv.bias"]
    del sd["encoder.mid_block.attentions.0.to_q.weight"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["quant_conv.weight"] = torch.zeros(4, 4, 1, 1, 1)
    sd["post_quant_conv.bias"] = torch.zeros(8, dtype=torch.int32)
    file = tmp_path / "bad.pt"
    torch.save(sd, file)
    with pytest.raises(ValueError) as info:
        CausalVideoVAE.from_pretrained(file, config=tiny_config())
    msg = str(info.value)
    for part in ("2 missing keys", "decoder.conv_out.conv.bias", "encoder.mid_block.attentions.0.to_q.weight",
                 "1 unexpected keys", "encoder.extra.weight (in bad.pt)",
                 "2 keys with another shape or a non-float dtype",
                 "quant_conv.weight (in bad.pt): checkpoint (4, 4, 1, 1, 1) float32 vs model (16, 16, 1, 1, 1)",
                 "post_quant_conv.bias (in bad.pt): checkpoint (8,) int32"):
        assert part in msg, (part, msg)


def test_loader_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no VAE checkpoint"):
        CausalVideoVAE.from_pretrained(tmp_path / "absent")
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="pipeline folder but has no vae/"):
        CausalVideoVAE.from_pretrained(tmp_path / "pipe")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a folder, a .safetensors file or a torch"):
        CausalVideoVAE.from_pretrained(tmp_path / "weights.npz")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pt is not a torch state-dict file"):
        CausalVideoVAE.from_pretrained(tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="must hold a state dict"):
        CausalVideoVAE.from_pretrained(tmp_path / "list.pt")
    with pytest.raises(ValueError, match="dtype must be None or a floating-point"):
        CausalVideoVAE.from_pretrained(tmp_path / "list.pt", dtype=torch.int8)


# ------------------------------------------------------------------------- diffusers (optional)
def _diffusers_vae_class():
    try:
        from diffusers import AutoencoderKLHunyuanVideo
    except ImportError as e:  # optional dependency; never installed by the Makefile
        pytest.skip(f"diffusers is not installed ({e}); pip install diffusers to compare with it")
    return AutoencoderKLHunyuanVideo


def test_diffusers_key_for_key_on_meta():
    cls = _diffusers_vae_class()
    with torch.device("meta"):
        theirs = cls().state_dict()
    ours = CausalVideoVAE.on_meta().state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_diffusers_same_outputs_fp32():
    cls = _diffusers_vae_class()
    vae = make_vae()
    theirs = cls(block_out_channels=(8, 16, 16, 32), norm_num_groups=4, latent_channels=8).eval()
    theirs.load_state_dict(vae.state_dict())
    x = video(2, 9, 32, 40)  # 9 frames: below diffusers' 16-frame framewise threshold, so untiled
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        z = vae.encode(x)
        assert rel_l2(z, dist.mean) < REL_L2_FP32
        zs = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        assert rel_l2(zs, dist.sample(generator=torch.Generator().manual_seed(7))) < REL_L2_FP32
        assert rel_l2(vae.decode(z), theirs.decode(z).sample) < REL_L2_FP32


def test_diffusers_reads_our_folder_and_we_read_theirs(tmp_path):
    cls = _diffusers_vae_class()
    vae = make_vae()
    theirs = cls.from_pretrained(vae.save_pretrained(tmp_path / "ours"))
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in theirs.state_dict().items())
    theirs.save_pretrained(tmp_path / "theirs")  # their config.json carries _diffusers_version etc.
    back = CausalVideoVAE.from_pretrained(tmp_path / "theirs")
    assert back.config == vae.config
    _same_weights(back, vae)
