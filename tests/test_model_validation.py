"""Boundary validation of kandinsky_model: configs, CrossDiT forward, the loader and the sampler.

Every bad input must raise ValueError (FileNotFoundError for a missing file) whose message names the
argument or file and what is accepted; each case fails before any model computation, so the file is
fast. Valid edge inputs (scalar timestep, integer masks, lists) are checked to still run.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from kandinsky_model import (
    CrossDiT, CrossDiTConfig, MagCacheConfig, NablaConfig, generate, normalize_first_frame, pack_text,
    time_grid, tiny, video_rope_scale,
)
from kandinsky_model.sampler import encode_prompt
from test_model import make_inputs

NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def model() -> CrossDiT:
    return CrossDiT(tiny()).eval()


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("overrides, match", [
    ({"model_dim": 0}, "model_dim must be a positive int, got 0"),
    ({"ff_dim": 64.5}, "ff_dim must be a positive int, got 64.5"),
    ({"in_text_dim": True}, "in_text_dim must be a positive int, got True"),
    ({"num_visual_blocks": -2}, "num_visual_blocks must be a positive int"),
    ({"num_text_blocks": -1}, "num_text_blocks must be an int >= 0"),
    ({"patch_size": (1, 2)}, r"patch_size \(pt, ph, pw\) must be 3 positive ints"),
    ({"patch_size": (1, 2.5, 2)}, r"patch_size \(pt, ph, pw\) must be 3 positive ints, got \(1, 2.5, 2\)"),
    ({"axes_dims": (8, 12, 11)}, r"axes_dims \(T, H, W\) must be 3 positive even ints"),
    ({"axes_dims": (8, 12, 0)}, r"axes_dims \(T, H, W\) must be 3 positive even ints"),
    ({"model_dim": 48}, "model_dim 48 is not a multiple of head_dim = sum.axes_dims. = 32"),  # heads
    ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0"),
    ({"rope_theta": NAN}, "rope_theta must be a finite number > 0, got nan"),
    ({"visual_cond": 1}, "visual_cond must be a bool, got 1"),
    ({"instruct_type": "mask"}, "instruct_type must be one of"),
    ({"attention": "dense"}, "attention must be one of"),
    ({"nabla": 0.9}, "nabla must be a NablaConfig or a dict"),
    ({"nabla": {"threshold": 0.0}}, r"nabla threshold P must be a finite number > 0 and <= 1, got 0.0"),
    ({"nabla": {"threshold": NAN}}, "nabla threshold P must be a finite number > 0 and <= 1, got nan"),
    ({"nabla": {"window": (3, 2, 3)}}, r"nabla window \(wT, wH, wW\) must be 3 odd positive ints"),
    ({"nabla": {"window": (3.0, 3, 3)}}, r"nabla window \(wT, wH, wW\) must be 3 odd positive ints"),
    ({"nabla": {"add_sta": "yes"}}, "nabla add_sta must be a bool"),
    ({"nabla": {"block_size": 36}}, "nabla block_size must be a multiple of 16, got 36"),
    ({"nabla": {"block_size": 32}}, r"nabla block_size must be a square \(tile x tile\), got 32"),
])
def test_config_rejects(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


@pytest.mark.parametrize("official, match", [
    ([1, 2], "official config must be a dict, got list"),
    ({"dit_params": [1]}, "official config section 'dit_params' must be a dict"),
    ({"attention": "nabla"}, "official config section 'attention' must be a dict"),
    ({"attention_P": "0.9"}, "nabla threshold P must be a finite number"),
    ({"attention_wT": 11}, r"nabla window \(wT, wH, wW\) must be 3 odd positive ints, got \(11, None, None\)"),
    ({"attention_add_sta": "false"}, "nabla add_sta must be a bool, got 'false'"),
])
def test_official_dict_rejects(official, match):
    with pytest.raises(ValueError, match=match):
        CrossDiTConfig.from_official_dict(official)


@pytest.mark.parametrize("kwargs, match", [
    ({"mag_ratios": [1.0]}, r"mag_ratios must be a list of cond/uncond pairs \(an even count >= 2\), got 1"),
    ({"mag_ratios": [1.0, 1.0, 1.0]}, "mag_ratios must be a list of cond/uncond pairs"),
    ({"mag_ratios": "1111"}, "mag_ratios must be a list of cond/uncond pairs .*got str"),
    ({"mag_ratios": [1.0, NAN]}, r"mag_ratios\[1\] must be a finite number >= 0, got nan"),
    ({"mag_ratios": [1.0, 1.0], "threshold": NAN}, "threshold must be a finite number >= 0, got nan"),
    ({"mag_ratios": [1.0, 1.0], "max_skips": 1.5}, "max_skips must be an int >= 0, got 1.5"),
    ({"mag_ratios": [1.0, 1.0], "retention_ratio": 1.2}, "retention_ratio must be a finite number >= 0 and <= 1"),
])
def test_magcache_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MagCacheConfig(**kwargs)


def test_model_rejects_a_config_of_another_type():
    with pytest.raises(ValueError, match="config must be a CrossDiTConfig"):
        CrossDiT(tiny().to_official_dict())


# --------------------------------------------------------------------------------------- forward
FORWARD_CASES = [
    # (argument, bad value from the valid inputs, expected message)
    ("x", lambda a: a["x"][0], r"x must have shape \(B, T, H, W, C_in=4\), got shape \(3, 8, 8, 4\)"),
    ("x", lambda a: a["x"][..., :3], r"x must have shape \(B, T, H, W, C_in=4\), got shape \(2, 3, 8, 8, 3\)"),
    ("x", lambda a: a["x"].tolist(), r"x must be a tensor of shape \(B, T, H, W, C_in=4\), got list"),
    ("x", lambda a: a["x"].long(), "x must be a floating-point tensor, got dtype int64"),
    ("x", lambda a: a["x"].double(), "x has dtype torch.float64 but the model's weights are torch.float32"),
    ("x", lambda a: a["x"].to("meta"), "x is on meta but the model's weights are on cpu"),
    ("x", lambda a: a["x"][:, :, :7], r"x has latent grid \(T, H, W\) = \(3, 7, 8\) .* not divisible by "
                                      r"patch_size \(1, 2, 2\)"),
    ("text", lambda a: a["text"][0], r"text must have shape \(B=2, L, in_text_dim=48\), got shape \(7, 48\)"),
    ("text", lambda a: a["text"][:1], r"text must have shape \(B=2, L, in_text_dim=48\), got shape \(1, 7, 48\)"),
    ("text", lambda a: a["text"][..., :40], r"text must have shape \(B=2, L, in_text_dim=48\), got shape"),
    ("text", lambda a: a["text"].int(), "text must be a floating-point tensor, got dtype int32"),
    ("text", lambda a: a["text"].to("meta"), "text is on meta but x is on cpu"),
    ("pooled_text", lambda a: a["pooled_text"][:, None],
     r"pooled_text must have shape \(B=2, in_text_dim2=24\), got shape \(2, 1, 24\)"),
    ("pooled_text", lambda a: a["pooled_text"][:1], r"pooled_text must have shape \(B=2, in_text_dim2=24\)"),
    ("timestep", lambda a: torch.tensor([1.0, 2.0, 3.0]),
     r"timestep must be a scalar or of shape \(B,\) = \(2,\), got shape \(3,\)"),
    ("timestep", lambda a: a["timestep"][:, None], r"timestep must be a scalar or of shape \(B,\) = \(2,\)"),
    ("timestep", lambda a: a["timestep"] > 0, "timestep must be a floating-point or integer tensor, got dtype bool"),
    ("timestep", lambda a: torch.tensor([NAN, 1.0]), "timestep holds NaN or infinite values"),
    ("timestep", lambda a: INF, r"timestep \(a number, or a \(B,\) tensor\) must be a finite number, got inf"),
    ("timestep", lambda a: [900.0, 250.0], r"timestep \(a number, or a \(B,\) tensor\) must be a finite number"),
    ("text_mask", lambda a: a["text_mask"][:, :5], r"text_mask must have shape \(B=2, L=7\), got shape \(2, 5\)"),
    ("text_mask", lambda a: a["text_mask"].float(), r"text_mask must be a bool \(or 0/1 integer\) tensor"),
    ("text_mask", lambda a: a["text_mask"] & torch.tensor([[True], [False]]),
     r"text_mask: every sample needs at least one real \(True\) text token"),
    ("rope_scale", lambda a: (1.0, 0.0, 2.0), r"rope_scale \(T, H, W\) must be 3 positive finite numbers, got \(1.0, 0.0"),
    ("rope_scale", lambda a: (1.0, NAN, 2.0), r"rope_scale \(T, H, W\) must be 3 positive finite numbers"),
    ("rope_scale", lambda a: (1.0, 2.0), r"rope_scale must be 3 positive finite numbers \(T, H, W\), got \(1.0, 2.0\)"),
    ("rope_scale", lambda a: 2.0, r"rope_scale must be 3 positive finite numbers \(T, H, W\), got 2.0"),
    ("attention_backend", lambda a: "xformers", "attention_backend must be one of .*'sdpa'.* got 'xformers'"),
]


def _inputs(model):
    x, text, pooled, ts, mask = make_inputs(model.config, grid=(3, 8, 8))
    return dict(x=x, text=text, pooled_text=pooled, timestep=ts, text_mask=mask)


@pytest.mark.parametrize("name, bad, match", FORWARD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FORWARD_CASES)])
def test_forward_rejects(model, name, bad, match):
    kwargs = _inputs(model)
    kwargs[name] = bad(kwargs)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_prepare_rejects_a_record_masks_of_another_type(model):
    with pytest.raises(ValueError, match="record_masks must be a list or None, got tuple"):
        model.prepare(**_inputs(model), record_masks=())


def test_forward_accepts_every_documented_form_of_timestep_and_mask(model):
    """Scalar / (1,) / integer timesteps and 0/1 integer masks are valid and mean the same thing."""
    kw = _inputs(model)
    kw["timestep"] = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        want = model(**kw)
        for ts in (500.0, 500, torch.tensor(500.0), torch.tensor([500]), torch.tensor([500, 500])):
            assert torch.equal(model(**{**kw, "timestep": ts}), want), ts
        assert torch.equal(model(**{**kw, "text_mask": kw["text_mask"].long(), "rope_scale": [1, 1, 1]}), want)


# ------------------------------------------------------------------------------------------ loader
def _folder(tmp_path):
    """A valid sharded tiny checkpoint folder (config.json, index and at least two shards)."""
    CrossDiT(tiny()).save_pretrained(tmp_path / "ckpt", max_shard_bytes=100_000)
    return tmp_path / "ckpt"


def _index(folder):
    return folder / "diffusion_pytorch_model.safetensors.index.json"


def _edit_json(file, fn):
    file.write_text(json.dumps(fn(json.loads(file.read_text()))))


def _shards(folder):
    return sorted(folder.glob("*-of-*.safetensors"))


def _rewrite_shard(folder, fn):
    """Apply ``fn`` to the state dict of the first shard, keeping the index consistent."""
    from safetensors.torch import load_file, save_file

    shard = _shards(folder)[0]
    sd = fn(load_file(str(shard)))
    save_file(sd, str(shard))
    _edit_json(_index(folder), lambda i: {**i, "weight_map": {
        **{k: v for k, v in i["weight_map"].items() if v != shard.name}, **dict.fromkeys(sd, shard.name)}})


def _store_twice(folder):
    """A second shard holding the first shard's keys again (the index lists it for one extra key)."""
    import shutil

    shutil.copy(_shards(folder)[0], folder / "copy.safetensors")
    _edit_json(_index(folder), lambda i: {"weight_map": {**i["weight_map"], "extra": "copy.safetensors"}})


LOADER_CASES = [
    # (id, corrupt the folder, exception, expected message)
    ("config-not-json", lambda f: (f / "config.json").write_text("{'model_dim': 64"), ValueError,
     r"ckpt/config.json is not valid JSON"),
    ("config-a-list", lambda f: (f / "config.json").write_text("[64]"), ValueError,
     r"ckpt/config.json must hold a JSON object, got a list"),
    ("config-bad-value", lambda f: _edit_json(f / "config.json", lambda c: {**c, "model_dim": 0}), ValueError,
     r"ckpt/config.json: model_dim must be a positive int, got 0"),
    ("config-bad-section", lambda f: _edit_json(f / "config.json", lambda c: {**c, "dit_params": 3}), ValueError,
     r"ckpt/config.json: official config section 'dit_params' must be a dict"),
    ("index-not-json", lambda f: _index(f).write_text("weight_map"), ValueError,
     r"diffusion_pytorch_model.safetensors.index.json is not valid JSON"),
    ("index-without-weight_map", lambda f: _edit_json(_index(f), lambda i: {"metadata": i["metadata"]}), ValueError,
     r"index.json needs a non-empty 'weight_map' object .* got None"),
    ("index-path-escape", lambda f: _edit_json(_index(f), lambda i: {"weight_map": {"a": "../w.safetensors"}}),
     ValueError, r"index.json needs a non-empty 'weight_map' object mapping each key to a shard file name"),
    ("missing-shard", lambda f: _shards(f)[-1].unlink(), FileNotFoundError,
     r"shards named in .*index.json are absent: .*-of-.*safetensors"),
    ("corrupt-shard", lambda f: _shards(f)[0].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"), ValueError,
     r"-of-\d+.safetensors is not a readable safetensors file"),
    ("missing-key", lambda f: _rewrite_shard(f, lambda sd: dict(list(sd.items())[1:])), ValueError,
     r"checkpoint .*ckpt' does not match the CrossDiT config:\n  1 missing keys: \['[\w.]+'\]"),
    ("unexpected-key", lambda f: _rewrite_shard(f, lambda sd: {**sd, "extra.weight": torch.zeros(2)}), ValueError,
     r"1 unexpected keys: \['extra.weight \(in diffusion_pytorch_model-00001-of-\d+.safetensors\)'\]"),
    ("mis-shaped-key", lambda f: _rewrite_shard(f, lambda sd: {**sd, "time_embeddings.in_layer.bias": torch.zeros(3)}),
     ValueError, r"time_embeddings.in_layer.bias \(in diffusion_pytorch_model-00001-of-\d+.safetensors\): "
                 r"checkpoint \(3,\) torch.float32 vs model \(32,\)"),
    ("integer-key", lambda f: _rewrite_shard(f, lambda sd: {**sd, "time_embeddings.in_layer.bias":
                                                            torch.zeros(32, dtype=torch.int32)}),
     ValueError, r"time_embeddings.in_layer.bias \(in .*\): checkpoint \(32,\) torch.int32 vs model \(32,\)"),
    ("key-stored-twice", _store_twice, ValueError,
     r"key '[\w.]+' is stored twice: in copy.safetensors and in diffusion_pytorch_model-00001-of-\d+.safetensors"),
]


@pytest.mark.parametrize("corrupt, exc, match", [c[1:] for c in LOADER_CASES], ids=[c[0] for c in LOADER_CASES])
def test_from_pretrained_rejects_malformed_files(tmp_path, corrupt, exc, match):
    folder = _folder(tmp_path)
    assert len(_shards(folder)) > 1
    CrossDiT.from_pretrained(folder)  # valid before the corruption
    corrupt(folder)
    with pytest.raises(exc, match=match):
        CrossDiT.from_pretrained(folder)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"path": 3}, ValueError, "path must be a str or os.PathLike, got int"),
    ({"path": "nowhere"}, FileNotFoundError, "no checkpoint at nowhere"),
    ({"dtype": "bfloat16"}, ValueError, "dtype must be None or a floating-point torch.dtype, got 'bfloat16'"),
    ({"dtype": torch.int8}, ValueError, "dtype must be None or a floating-point torch.dtype, got torch.int8"),
    ({"device": "gpu0"}, ValueError, "device must name a torch device .* got 'gpu0'"),
    ({"strict": "no"}, ValueError, "strict must be a bool, got 'no'"),
    ({"attention_backend": "dense"}, ValueError, "attention_backend must be one of"),
    ({"config": 3}, ValueError, "config must be a CrossDiTConfig, a preset name, .* got int"),
    ({"config": "huge"}, ValueError, "unknown config 'huge'"),
    ({"config": "missing.json"}, FileNotFoundError, "missing.json"),
])
def test_from_pretrained_rejects_bad_arguments(tmp_path, kwargs, exc, match):
    kwargs = {"path": _folder(tmp_path), **kwargs}
    with pytest.raises(exc, match=match):
        CrossDiT.from_pretrained(**kwargs)


def test_save_pretrained_rejects_a_bad_shard_size(tmp_path, model):
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int, got 0"):
        model.save_pretrained(tmp_path, max_shard_bytes=0)


# ----------------------------------------------------------------------------------------- sampler
def _prompt(cfg, b=1):
    text, pooled = torch.randn(b, 5, cfg.in_text_dim), torch.randn(b, cfg.in_text_dim2)
    return dict(text=text, pooled_text=pooled, text_mask=torch.ones(b, 5, dtype=torch.bool),
                negative_text=torch.randn(b, 3, cfg.in_text_dim), negative_pooled_text=torch.randn(b, cfg.in_text_dim2))


GENERATE_CASES = [
    # (model overrides, argument, bad value from the valid arguments, expected message)
    ({}, "num_steps", 0, "num_steps must be a positive int, got 0"),
    ({}, "num_steps", 2.0, "num_steps must be a positive int, got 2.0"),
    ({}, "num_steps", True, "num_steps must be a positive int, got True"),
    ({}, "guidance_scale", NAN, "guidance_scale must be a finite number, got nan"),
    ({}, "guidance_scale", INF, "guidance_scale must be a finite number, got inf"),
    ({}, "guidance_scale", "5", "guidance_scale must be a finite number, got '5'"),
    ({}, "shift", 0.0, "shift must be a finite number > 0, got 0.0"),
    ({}, "shift", -5.0, "shift must be a finite number > 0, got -5.0"),
    ({}, "shift", NAN, "shift must be a finite number > 0, got nan"),
    ({}, "shape", (3, 8), r"shape \(T, H, W\) must be 3 positive ints, got \(3, 8\)"),
    ({}, "shape", (3, 8, 8.0), r"shape \(T, H, W\) must be 3 positive ints, got \(3, 8, 8.0\)"),
    ({}, "shape", (0, 8, 8), r"shape \(T, H, W\) must be 3 positive ints"),
    ({}, "shape", (True, 8, 8), r"shape \(T, H, W\) must be 3 positive ints"),
    ({}, "shape", (3, 7, 8), r"shape \(T, H, W\) = \(3, 7, 8\) must be divisible by the model's patch_size"),
    ({}, "rope_scale", (1.0, 0.0, 1.0), r"rope_scale \(T, H, W\) must be 3 positive finite numbers"),
    ({}, "seed", 1.5, "seed must be None, an int or a list of 1 ints .* got 1.5"),
    ({}, "seed", True, "seed must be None, an int or a list of 1 ints"),
    ({}, "seed", [1, 2], r"seed must be None, an int or a list of 1 ints \(one per sample\), got \[1, 2\]"),
    ({}, "noise", lambda a: torch.randn(1, 3, 8, 8, 5),
     r"noise must have shape \(B=1, T=3, H=8, W=8, C=4\), got shape \(1, 3, 8, 8, 5\)"),
    ({}, "noise", lambda a: torch.zeros(1, 3, 8, 8, 4, dtype=torch.int64), "noise must be a floating-point tensor"),
    ({}, "noise", lambda a: torch.full((1, 3, 8, 8, 4), NAN), "noise holds NaN or infinite values"),
    ({}, "text", lambda a: a["text"][0], r"text must have shape \(B, L, in_text_dim=48\), got shape \(5, 48\)"),
    ({}, "text", lambda a: a["text"] * NAN, "text holds NaN or infinite values"),
    ({}, "pooled_text", lambda a: torch.randn(2, 24), r"pooled_text must have shape \(B=1, in_text_dim2=24\)"),
    ({}, "pooled_text", lambda a: a["pooled_text"] / 0, "pooled_text holds NaN or infinite values"),
    ({}, "text_mask", lambda a: a["text_mask"].float(), "text_mask must be a bool"),
    ({}, "text_mask", lambda a: a["text_mask"][:, :4], r"text_mask must have shape \(B=1, L=5\)"),
    ({}, "text_mask", lambda a: ~a["text_mask"], "text_mask: every sample needs at least one real"),
    ({}, "negative_text", lambda a: a["negative_text"][..., :8],
     r"negative_text must have shape \(B=1, L, in_text_dim=48\), got shape \(1, 3, 8\)"),
    ({}, "negative_text", None, "guidance_scale != 1 needs negative_text and negative_pooled_text"),
    ({}, "negative_text_mask", lambda a: torch.ones(1, 5, dtype=torch.bool),
     r"negative_text_mask must have shape \(B=1, L=3\), got shape \(1, 5\)"),
    ({}, "negative_pooled_text", lambda a: a["negative_pooled_text"].double() * INF,
     "negative_pooled_text holds NaN or infinite values"),
    ({"visual_cond": True}, "first_frame", lambda a: torch.randn(1, 1, 8, 8, 4),
     r"first_frame must have shape \(B=1, H=8, W=8, C=4\), got shape \(1, 1, 8, 8, 4\)"),
    ({"visual_cond": True}, "first_frame", lambda a: torch.randn(1, 8, 4, 8),
     r"first_frame must have shape \(B=1, H=8, W=8, C=4\), got shape \(1, 8, 4, 8\)"),
    ({}, "first_frame", lambda a: torch.randn(1, 8, 8, 4), "first_frame .* needs a model with visual_cond=True"),
    ({"instruct_type": "channel"}, "source_image", lambda a: torch.randn(2, 8, 8, 4),
     r"source_image must have shape \(B=1, H=8, W=8, C=4\)"),
    ({}, "cfg_batch", "yes", "cfg_batch must be a bool, got 'yes'"),
    ({}, "normalize_first_frame", 0, "normalize_first_frame must be a bool, got 0"),
    ({}, "i2v_cond_channels", None, "i2v_cond_channels must be a bool, got None"),
    ({}, "calibrate", 1, "calibrate must be a bool, got 1"),
    ({}, "attention_backend", "dense", "attention_backend must be one of"),
    ({}, "magcache", {"mag_ratios": [1.0, 1.0]}, "magcache must be a MagCacheConfig or None, got dict"),
    ({}, "dtype", "bfloat16", "dtype must be None or a floating-point torch.dtype, got 'bfloat16'"),
    ({}, "dtype", torch.bfloat16, r"dtype torch.bfloat16 differs from the model's weights \(torch.float32\)"),
    ({}, "model", lambda a: torch.nn.Linear(2, 2), "model must be a CrossDiT, got Linear"),
]


@pytest.mark.parametrize("overrides, name, bad, match", GENERATE_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(GENERATE_CASES)])
def test_generate_rejects(overrides, name, bad, match):
    m = CrossDiT(tiny(**overrides)).eval()
    kwargs = dict(model=m, shape=(3, 8, 8), num_steps=1, **_prompt(m.config))
    kwargs[name] = bad(kwargs) if callable(bad) else bad
    with pytest.raises(ValueError, match=match):
        generate(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: time_grid(0, 5.0), "num_steps must be a positive int, got 0"),
    (lambda: time_grid(4, -1.0), "shift must be a finite number > 0, got -1.0"),
    (lambda: video_rope_scale(512.0, 768), "height must be a positive int, got 512.0"),
    (lambda: video_rope_scale(512, 0), "width must be a positive int, got 0"),
    (lambda: pack_text([]), r"embeds must be a non-empty list of \(L_i, D\) tensors, got \[\]"),
    (lambda: pack_text(torch.randn(2, 3, 4)), r"embeds must be a non-empty list of \(L_i, D\) tensors"),
    (lambda: pack_text([torch.randn(3, 4), torch.randn(2, 5)]), r"embeds\[1\] must have shape \(L_1, D=4\)"),
    (lambda: pack_text([torch.randn(3, 4), torch.randn(2, 4).double()]), r"embeds\[1\] is torch.float64 on cpu"),
    (lambda: normalize_first_frame(torch.randn(1, 9, 4, 4, 4), clamp_values="no"), "clamp_values must be a bool"),
    (lambda: encode_prompt(["a cat"], qwen=None, qwen_processor=None, clip=None, clip_tokenizer=None,
                           kind="audio"), "kind must be one of .* got 'audio'"),
    (lambda: encode_prompt("a cat", qwen=None, qwen_processor=None, clip=None, clip_tokenizer=None),
     "prompts must be a non-empty list of strings, got 'a cat'"),
    (lambda: NablaConfig(threshold=1.5), "nabla threshold P must be a finite number > 0 and <= 1, got 1.5"),
])
def test_sampler_helpers_reject(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- optional dependencies
def test_flash_backend_absent_versus_broken(tmp_path, monkeypatch):
    """flash-attn is optional: its absence is a clear RuntimeError, but an installed flash-attn that
    fails to import (here: a missing dependency of its own) surfaces its own error, not "absent"."""
    from kandinsky_model.attention import dense_attention

    q = torch.randn(1, 4, 2, 16)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import of flash_attn -> ModuleNotFoundError
    with pytest.raises(RuntimeError, match="attention backend 'flash' needs the flash-attn package"):
        dense_attention(q, q, q, backend="flash")
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("import flash_attn_missing_dependency_for_tests\n")
    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="flash_attn_missing_dependency_for_tests"):
        dense_attention(q, q, q, backend="flash")
