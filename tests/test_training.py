"""Training harness (CPU, one process): configs, shards, buckets, objective, loop, resume, EMA export.

Runs of ``python -m training.train`` are subprocesses with OMP_NUM_THREADS=1 and a timeout; the
multi-process FSDP2 check is in test_training_dist.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec  # noqa: F401  (the harness needs it: fail here, not skip)
import pytest
import torch
import tqdm  # noqa: F401
from safetensors.torch import save_file

from kandinsky_model import CrossDiT
from training.config import REGISTRY, apply_overrides, get_config, memory_estimate
from training.data import BucketBatcher, LatentLoader, ShardError, ShardReader, read_manifest, write_dataset
from training.data.synthetic import synthetic_samples, write_synthetic
from training.objective import batch_generator, build_batch

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def run_train(output, *args, env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "training.train", "--config", "tiny-cpu", "--output", str(output),
           "log.progress=False", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def metrics(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def losses(output, key="loss") -> dict[int, float]:
    rows = {r["step"]: r[key] for r in metrics(output)}
    assert len(rows) == len(metrics(output)), "one metrics line per step"
    return rows


def assert_same_losses(a: dict, b: dict, steps, rtol=1e-5):
    for s in steps:
        assert abs(a[s] - b[s]) <= rtol * abs(a[s]), f"step {s}: {a[s]} vs {b[s]}"


# the runs compared with ``full_run``: a cosine schedule (fixed length: --max-steps differs between the
# runs), so a resumed scheduler state matters
COMMON = ("checkpoint.every=4", "schedule.kind=cosine", "schedule.total_steps=8")


# ------------------------------------------------------------------------------------------- configs
def test_overrides_and_validation():
    cfg = apply_overrides(get_config("tiny-cpu"), [
        "optim.lr=3e-4", "model.num_visual_blocks=3", "optim.betas=(0.8, 0.9)", "log.progress=false",
        'data.task_probs={"t2i": 0.0, "t2v": 1.0, "i2v": 0.0}', "schedule.kind=cosine",
    ])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.model.num_visual_blocks == 3
    assert cfg.log.progress is False and cfg.data.task_probs["t2v"] == 1.0
    base = get_config("tiny-cpu")
    assert base.optim.betas == (0.9, 0.95) and base.optim.eps == 1e-8 and base.optim.grad_clip == 1.0
    for bad, msg in [("optim.lrr=1", "unknown config key 'optim.lrr'"), ("nope.x=1", "unknown config key"),
                     ("optim.lr=abc", "optim.lr"), ("optim.lr=-1", "optim.lr must be > 0"),
                     ("optim.grad_accum=1.5", "optim.grad_accum"), ("model=3", "section"),
                     ("model.visual_cond=False", "visual_cond"), ("schedule.kind=linear", "schedule.kind"),
                     ("data.task_probs={'t2v': 0.5}", "sum to 1"), ("novalue", "key=value"),
                     ("model.num_visual_blocks=0", "num_visual_blocks")]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(get_config("tiny-cpu"), [bad])
    with pytest.raises(ValueError, match="unknown config"):
        get_config("video-huge")


def test_schedule():
    cfg = apply_overrides(get_config("tiny-cpu"), ["schedule.warmup_steps=4", "schedule.kind=cosine",
                                                   "schedule.min_lr_ratio=0.1"])
    f = [cfg.schedule.factor(s, 14) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and abs(f[-1] - 0.1) < 0.05
    assert all(a >= b for a, b in zip(f[3:], f[4:]))


def test_stage_configs_build_on_meta():
    names = [n for n in REGISTRY if n != "tiny-cpu"]
    assert any(n.startswith("video-lite") for n in names) and any(n.startswith("video-pro") for n in names)
    for name in names:
        cfg = get_config(name)
        assert cfg.optim.betas == (0.9, 0.95) and cfg.ema.decay == 0.9999 and cfg.data.null_text_prob == 0.1
        est = memory_estimate(cfg, world_size=64)
        n = est["num_params"]
        assert (1.9e9 < n < 2.1e9) if "lite" in name else (19e9 < n < 19.6e9), (name, n)
        assert abs(est["total_gib"] * 1024 ** 3 - 20 * n) < 1e3  # 4 param + 4 grad + 8 AdamW + 4 EMA
        assert abs(est["per_rank_gib"] * 64 - est["total_gib"]) < 1e-6
    lite = get_config("video-lite-mr-5s")
    assert lite.optim.lr == 3e-5 and lite.max_steps == 50_000 and lite.data.task_probs["i2v"] == 0.2


def test_config_cli_prints_memory_estimate(capsys):
    from training.config import main

    est = main(["video-lite-mr-10s", "--world", "8", "optim.lr=1e-5"])
    out = capsys.readouterr().out
    assert "video-lite-mr-10s" in out and "per rank over 8 FSDP ranks" in out and "lr=1e-05" in out
    assert abs(est["per_rank_gib"] * 8 - est["total_gib"]) < 1e-9


# ---------------------------------------------------------------------------------------------- data
def _samples(n=5):
    return list(synthetic_samples(n, [[1, 4, 4], [3, 4, 6]], 4, 8, 6, (2, 5), seed=1))


def test_shard_roundtrip_and_corrupt_shard(tmp_path):
    samples = _samples()
    write_dataset(str(tmp_path / "ds"), samples, samples_per_shard=2)
    manifest = read_manifest(str(tmp_path / "ds"))
    assert [len(s["samples"]) for s in manifest["shards"]] == [2, 2, 1]
    reader = ShardReader(str(tmp_path / "ds"))
    where = {s["key"]: sh["name"] for sh in manifest["shards"] for s in sh["samples"]}
    for key, latent, text, pooled in samples:
        got = reader.read(where[key], key)
        assert torch.equal(got["latent"], latent) and torch.equal(got["text"], text)
        assert torch.equal(got["pooled"], pooled)
    reader.close()
    # corrupt one shard: the error names it
    bad = tmp_path / "ds" / "shard-00001.tar"
    raw = bytearray(bad.read_bytes())
    raw[600:1200] = b"\x13" * 600
    bad.write_bytes(bytes(raw))
    reader = ShardReader(str(tmp_path / "ds"))
    with pytest.raises(ShardError, match="shard-00001.tar"):
        for s in manifest["shards"][1]["samples"]:
            reader.read("shard-00001.tar", s["key"])
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ShardError, match="shard-00001.tar"):
        ShardReader(str(tmp_path / "ds")).read("shard-00001.tar", manifest["shards"][1]["samples"][0]["key"])
    bad.unlink()
    with pytest.raises(ShardError, match="shard-00001.tar is missing"):
        ShardReader(str(tmp_path / "ds")).read("shard-00001.tar", "x")
    with pytest.raises(ShardError, match="no dataset manifest"):
        read_manifest(str(tmp_path / "nowhere"))


def test_write_shards_cli(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for key, latent, text, pooled in _samples(3):
        save_file({"latent": latent, "text": text, "pooled": pooled}, str(src / f"{key}.safetensors"))
    res = subprocess.run([sys.executable, "-m", "training.data.write_shards", str(src), str(tmp_path / "dst"),
                          "--samples-per-shard", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    loader = LatentLoader(str(tmp_path / "dst"), t_max=3)
    keys = {s["key"] for _ in range(loader.batcher.num_batches) for s in loader.next()[1]}
    assert keys == {f"sample-{i:06d}" for i in range(3)}


def test_shards_sized_by_resolution_as_the_report(tmp_path):
    """Default shard sizes: one modality and size class per shard, 1024/256/64 images and 16/4/1
    videos per shard at low/medium/high resolution; Table 4's sizes fall in their stage's class."""
    from training.config import HR_RES, LR_RES, MR_RES
    from training.data.shards import size_class
    for table, cls in ((LR_RES, "low"), (MR_RES, "medium"), (HR_RES, "high")):
        for k in table:
            h, w = (int(v) // 8 for v in k.split("x"))
            assert size_class((h, w)) == cls, k
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 32, 32)] * 5 + [(3, 32, 32)] * 3 + [(2, 64, 96)] * 5 + [(2, 128, 128)] * 2
    samples = [(f"s{i:02d}", torch.randn(*sh, 2, generator=g), torch.randn(2, 8, generator=g), torch.randn(4))
               for i, sh in enumerate(shapes)]
    manifest = write_dataset(str(tmp_path), iter(samples), samples_per_shard=None)
    groups = sorted((len(sh["samples"]), tuple(sh["samples"][0]["shape"][:3])) for sh in manifest["shards"])
    for sh in manifest["shards"]:
        assert len({tuple(x["shape"][:3]) for x in sh["samples"]}) == 1, "one class per shard here"
    assert groups == [(1, (2, 64, 96)), (1, (2, 128, 128)), (1, (2, 128, 128)), (3, (3, 32, 32)),
                      (4, (2, 64, 96)), (5, (1, 32, 32))]
    loader = LatentLoader(str(tmp_path), t_max=4)
    keys = {x["key"] for _ in range(loader.batcher.num_batches) for x in loader.next()[1]}
    assert keys == {k for k, *_ in samples}
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_dataset(str(tmp_path / "x"), iter(samples), samples_per_shard=0)


def test_buckets_ranks_and_resume(tmp_path):
    cfg = get_config("tiny-cpu")
    write_synthetic(str(tmp_path), cfg.model, {**cfg.synthetic, "samples": 37})
    shapes = {e.key: e.shape for e in BucketBatcher(str(tmp_path), t_max=6).entries}
    mixed = 0
    for world, pack in ((1, True), (2, True), (2, False)):
        batchers = [BucketBatcher(str(tmp_path), t_max=6, seed=3, rank=r, world=world, pack=pack)
                    for r in range(world)]
        n = batchers[0].num_batches
        seen, epoch1 = [], []
        for _ in range(n // world + 2):
            for b in batchers:
                gid, batch = b.next()
                if pack:  # one aspect ratio per batch, images only with images, any lengths
                    assert len({(e.shape[0] == 1, e.shape[1], e.shape[2]) for e in batch}) == 1
                    mixed += len({e.shape[0] for e in batch}) > 1
                else:
                    assert len({e.shape[:3] for e in batch}) == 1  # one exact shape per batch
                assert sum(e.shape[0] for e in batch) <= 6  # frame budget
                (seen if gid < n else epoch1).extend(e.key for e in batch)
        assert sorted(seen) == sorted(shapes), "every sample exactly once per epoch across ranks"
    assert mixed > 0, "the test data must make packed batches of unequal clips"
    # resume: a fresh batcher with the saved state continues with the next unseen batch
    a = BucketBatcher(str(tmp_path), t_max=6, seed=3, rank=1, world=2)
    for _ in range(5):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    b = BucketBatcher(str(tmp_path), t_max=6, seed=3, rank=1, world=2)
    b.load_state_dict(state)
    for _ in range(n):
        assert a.next() == b.next()
    with pytest.raises(ValueError, match="more than data.t_max"):
        BucketBatcher(str(tmp_path), t_max=2)


def test_resolution_weights_drive_sampling(tmp_path):
    """data.resolutions (Table 4 probabilities) choose each batch's size; passes over every bucket
    never repeat or skip a clip across ranks; the state resumes exactly; mismatches are named."""
    cfg = get_config("tiny-cpu")
    write_synthetic(str(tmp_path), cfg.model, {**cfg.synthetic, "samples": 37})
    weights = {"64x64": 0.6, "64x96": 0.1, "96x64": 0.3}
    batchers = [BucketBatcher(str(tmp_path), t_max=6, seed=5, rank=r, world=2, weights=weights) for r in range(2)]
    counts, stream = {k: 0 for k in weights}, {}
    for _ in range(1500):
        for b in batchers:
            gid, batch = b.next()
            assert len({(e.shape[0] == 1, e.shape[1], e.shape[2]) for e in batch}) == 1
            assert sum(e.shape[0] for e in batch) <= 6
            counts[f"{batch[0].shape[1] * 8}x{batch[0].shape[2] * 8}"] += 1
            assert gid not in stream
            stream[gid] = batch
    for k, p in weights.items():  # 3000 draws: the binomial sd is <= 0.009
        assert abs(counts[k] / 3000 - p) < 0.04, (k, counts[k], p)
    # in global order, each bucket's clips come in passes: every pass is a permutation of the bucket
    per_bucket = {}
    for gid in sorted(stream):
        for e in stream[gid]:
            per_bucket.setdefault((e.shape[0] == 1, e.shape[1], e.shape[2]), []).append(e.key)
    for bucket, keys in per_bucket.items():
        size = len(set(keys))
        full = len(keys) // size * size
        for i in range(0, full, size):
            assert len(set(keys[i:i + size])) == size, f"bucket {bucket}: a clip repeated within a pass"
    # resume: the saved state (through JSON, as checkpoints keep it) continues the same stream
    a = BucketBatcher(str(tmp_path), t_max=6, seed=5, rank=1, world=2, weights=weights)
    for _ in range(7):
        a.next()
    b = BucketBatcher(str(tmp_path), t_max=6, seed=5, rank=1, world=2, weights=weights)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(40):
        assert a.next() == b.next()
    with pytest.raises(ValueError, match="does not fit"):  # other weights: not the same stream
        BucketBatcher(str(tmp_path), t_max=6, seed=5, weights={"64x64": 0.5, "64x96": 0.25, "96x64": 0.25}
                      ).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"asks for 512x768 .* has no clips of that size"):
        BucketBatcher(str(tmp_path), t_max=6, weights={**weights, "64x64": 0.3, "512x768": 0.3})
    with pytest.raises(ValueError, match=r"holds clips of 96x64 that data.resolutions does not list"):
        BucketBatcher(str(tmp_path), t_max=6, weights={"64x64": 0.5, "64x96": 0.5})
    with pytest.raises(ValueError, match="multiples of 8"):
        apply_overrides(cfg, ["data.resolutions={'60x64': 1.0}"])
    assert apply_overrides(cfg, ["data.resolutions=data"]).data.resolutions == "data"


def test_prefetch_keeps_order_state_and_errors(tmp_path):
    cfg = get_config("tiny-cpu")
    write_synthetic(str(tmp_path), cfg.model, {**cfg.synthetic, "samples": 12}, samples_per_shard=4)
    plain = LatentLoader(str(tmp_path), t_max=6, seed=1)
    ahead = LatentLoader(str(tmp_path), t_max=6, seed=1, prefetch=3)
    for _ in range(plain.batcher.num_batches + 2):  # across an epoch boundary
        (g1, a), (g2, b) = plain.next(), ahead.next()
        assert g1 == g2 and [x["key"] for x in a] == [x["key"] for x in b]
        assert ahead.state_dict() == plain.state_dict()  # consumed, not read ahead
    ahead.close()
    (tmp_path / "shard-00002.tar").write_bytes(b"broken" * 300)
    broken = LatentLoader(str(tmp_path), t_max=6, seed=1, prefetch=2)
    with pytest.raises(ShardError, match="shard-00002.tar"):
        for _ in range(plain.batcher.num_batches):
            broken.next()
    broken.close()


def test_objective_tasks_null_text_and_i2v_inputs():
    cfg = apply_overrides(get_config("tiny-cpu"), ['data.task_probs={"t2i": 0.2, "t2v": 0.5, "i2v": 0.3}'])
    g = torch.Generator().manual_seed(0)
    video = [{"latent": torch.randn(3, 2, 2, 4, generator=g), "text": torch.randn(2 + i, 48, generator=g),
              "pooled": torch.randn(24, generator=g)} for i in range(4)]
    image = [{**s, "latent": s["latent"][:1]} for s in video]
    null = (torch.full((1, 48), 7.0), torch.full((24,), 7.0))
    tasks, dropped, n = {"t2i": 0, "t2v": 0, "i2v": 0}, 0, 1500
    for gid in range(n):
        fb = build_batch(video, gid, cfg.data, cfg.flow, visual_cond=True, null_text=null)
        tasks[fb.task] += 1
        is_null = (fb.pooled == 7.0).all(-1)
        dropped += int(is_null.sum())
        assert torch.equal(fb.text_mask.sum(-1)[is_null], torch.ones(int(is_null.sum()), dtype=torch.long))
        x0 = torch.stack([s["latent"] for s in video])[:, : fb.x.shape[1]]
        t = fb.t.view(-1, 1, 1, 1, 1)
        eps = fb.target + x0
        assert fb.x.shape[-1] == 2 * 4 + 1 and not fb.x[..., 4:8].any()  # [x_t | cond = 0 | mask]
        if fb.task == "i2v":
            assert torch.equal(fb.x[:, 0, ..., :4], x0[:, 0]) and (fb.x[:, 0, ..., 8] == 1).all()
            assert not fb.x[:, 1:, ..., 8].any() and fb.loss_frames.tolist() == [False, True, True]
            torch.testing.assert_close(fb.x[:, 1:, ..., :4], ((1 - t) * x0 + t * eps)[:, 1:])
        else:
            assert not fb.x[..., 8].any() and fb.loss_frames.all()
            torch.testing.assert_close(fb.x[..., :4], (1 - t) * x0 + t * eps)
            assert fb.x.shape[1] == (1 if fb.task == "t2i" else 3)  # T2I: the first latent frame
        torch.testing.assert_close(fb.timestep, 1000 * fb.t)
        assert ((fb.t > 0) & (fb.t < 1)).all()
    for task, p in cfg.data.task_probs.items():
        assert abs(tasks[task] / n - p) < 0.04, (task, tasks)
    assert abs(dropped / (4 * n) - 0.1) < 0.02
    assert all(build_batch(image, gid, cfg.data, cfg.flow, visual_cond=True, null_text=null).task == "t2i"
               for gid in range(50))  # image batches are always T2I


# ---------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run_train(out, "--max-steps", "8", *COMMON)
    return out


def test_first_step_loss_is_flow_matching(full_run):
    """Step 1's logged loss equals the flow-matching loss computed here by hand on the same batch."""
    cfg = get_config("tiny-cpu")
    loader = LatentLoader(str(full_run / "data"), t_max=cfg.data.t_max, seed=cfg.data.seed,
                          weights=cfg.data.resolutions)
    gid, samples = loader.next()
    torch.manual_seed(cfg.seed)
    model = CrossDiT(cfg.model)
    g = batch_generator(cfg.data.seed, gid)
    clips = [s["latent"] for s in samples]
    n = len(clips)
    u = float(torch.rand(1, generator=g))
    p = cfg.data.task_probs
    images = min(c.shape[0] for c in clips) == 1
    task = "t2i" if images or u < p["t2i"] else ("t2v" if u < p["t2i"] + p["t2v"] else "i2v")
    drop = (torch.rand(n, generator=g) < cfg.data.null_text_prob).tolist()
    t = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64)).clamp(1e-5, 1 - 1e-5).float()
    if task == "t2i":
        clips = [c[:1] for c in clips]
    # packed along T, one t per clip
    x0 = torch.cat(clips)[None]
    eps = torch.randn(x0.shape, generator=g)
    tf = torch.cat([t[i].expand(c.shape[0]) for i, c in enumerate(clips)]).view(1, -1, 1, 1, 1)
    xt = (1 - tf) * x0 + tf * eps
    mask = torch.zeros(*x0.shape[:4], 1)
    starts = [sum(c.shape[0] for c in clips[:i]) for i in range(n)]
    keep = torch.ones(x0.shape[1], dtype=torch.bool)
    if task == "i2v":
        for f in starts:
            xt[:, f], mask[:, f], keep[f] = x0[:, f], 1.0, False
    null_text, null_pooled = loader.null_text
    texts = [null_text if d else s["text"] for s, d in zip(samples, drop)]
    length = max(x.shape[0] for x in texts)
    text = torch.stack([torch.cat([x, x.new_zeros(length - x.shape[0], x.shape[1])]) for x in texts])
    text_mask = torch.stack([torch.arange(length) < x.shape[0] for x in texts])
    pooled = torch.stack([null_pooled if d else s["pooled"] for s, d in zip(samples, drop)])
    with torch.no_grad():
        v = model(torch.cat([xt, torch.zeros_like(xt), mask], -1), text, pooled, 1000 * t, text_mask,
                  cu_frames=[*starts, x0.shape[1]])
    expected = ((v - (eps - x0))[:, keep] ** 2).mean().item()
    got = losses(full_run)[1]
    assert abs(got - expected) <= 1e-5 * expected, (got, expected, task)


def test_resume_matches_uninterrupted(full_run, tmp_path):
    out = tmp_path / "resumed"
    run_train(out, "--max-steps", "5", *COMMON)
    assert (out / "checkpoints" / "step-00000005" / "COMPLETE").exists()
    run_train(out, "--max-steps", "8", *COMMON)
    assert_same_losses(losses(full_run), losses(out), range(1, 9))
    assert_same_losses(losses(full_run, "lr"), losses(out, "lr"), range(1, 9), rtol=1e-12)
    assert len(set(losses(out, "lr").values())) > 3  # warmup, then a decaying cosine


def test_killed_during_async_save_resumes_from_previous(full_run, tmp_path):
    out = tmp_path / "killed"
    res = run_train(out, "--max-steps", "8", *COMMON,
                    env_extra={"KANDINSKY_TRAIN_KILL_AFTER_SAVE": "8"}, check=False)
    assert res.returncode == 17, res.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "step-00000004" / "COMPLETE").exists()
    assert not (ckpts / "step-00000008" / "COMPLETE").exists()
    assert max(losses(out)) == 8  # it logged steps 5..8 before the kill
    run_train(out, "--max-steps", "8", *COMMON)  # resumes from step 4, redoes 5..8
    assert_same_losses(losses(full_run), losses(out), range(1, 9))
    assert (ckpts / "step-00000008" / "COMPLETE").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000008"]  # keep_last=2


def test_user_errors_end_with_a_message_and_exit_2(full_run, tmp_path):
    """A bad config key, a missing dataset and a damaged checkpoint: one message naming the problem,
    exit code 2, no traceback, and the checkpoints left exactly as they were."""
    import shutil
    res = run_train(tmp_path / "a", "optim.lrr=1", check=False)
    assert res.returncode == 2 and "unknown config key 'optim.lrr'" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_train(tmp_path / "b", "--data", str(tmp_path / "nowhere"), check=False)
    assert res.returncode == 2 and "no dataset manifest at" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "damaged"
    shutil.copytree(full_run, out)
    newest = out / "checkpoints" / "step-00000008"
    victim = next(newest.glob("*.distcp"))
    victim.unlink()
    before = sorted(p.relative_to(out) for p in (out / "checkpoints").rglob("*"))
    res = run_train(out, "--max-steps", "9", *COMMON, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"checkpoint {newest} is marked complete but cannot be loaded" in res.stderr
    assert victim.name in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.relative_to(out) for p in (out / "checkpoints").rglob("*")) == before


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP read in this single process
def test_ema_export_loads_with_from_pretrained(full_run):
    import torch.distributed.checkpoint as dcp

    cfg = get_config("tiny-cpu")
    exported = CrossDiT.from_pretrained(full_run / "ema")
    ref = CrossDiT(cfg.model)
    ema = {f"ema.{k}": torch.empty_like(v) for k, v in ref.state_dict().items()}
    dcp.load(ema, checkpoint_id=str(full_run / "checkpoints" / "step-00000008"))
    ref.load_state_dict({k[4:]: v for k, v in ema.items()})
    trained = {f"model.{k}": torch.empty_like(v) for k, v in ref.state_dict().items()}
    dcp.load(trained, checkpoint_id=str(full_run / "checkpoints" / "step-00000008"))
    assert any(not torch.equal(trained[f"model.{k}"], v) for k, v in ref.state_dict().items())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, 4, cfg.model.in_channels, generator=g)
    text = torch.randn(1, 3, cfg.model.in_text_dim, generator=g)
    pooled = torch.randn(1, cfg.model.in_text_dim2, generator=g)
    for k, v in exported.state_dict().items():  # bit-equal weights
        assert torch.equal(v, ema[f"ema.{k}"]), k
    with torch.no_grad():  # outputs equal up to fp32 summation order (another memory layout)
        torch.testing.assert_close(exported(x, text, pooled, torch.tensor([500.0])),
                                   ref(x, text, pooled, torch.tensor([500.0])), rtol=1e-6, atol=1e-6)
    assert (full_run / "loss.png").stat().st_size > 0
    rows = metrics(full_run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in rows)


def test_loss_decreases_on_overfit_set(tmp_path):
    run_train(tmp_path, "--max-steps", "40", "data.null_text_prob=0.0", "optim.lr=3e-3", "checkpoint.every=0",
              "checkpoint.export_ema=False", "log.plot=False", "data.resolutions=data",
              'synthetic={"samples": 4, "shapes": [[2, 8, 8]], "text_len": [4, 4]}')
    ls = losses(tmp_path)
    first = sum(ls[s] for s in range(1, 6)) / 5
    last = sum(ls[s] for s in range(36, 41)) / 5
    assert last < 0.75 * first, (first, last)


def test_packed_batch_objective():
    """pack=True: clips of unequal lengths concatenated along T with cu_frames; every clip its own t
    (per frame in x_t), text and null draw; I2V keeps each clip's first frame clean, masked 1 and out of
    the loss; T2I takes each clip's first frame."""
    cfg = apply_overrides(get_config("tiny-cpu"), ['data.task_probs={"t2i": 0.2, "t2v": 0.4, "i2v": 0.4}'])
    g = torch.Generator().manual_seed(1)
    clips = [{"latent": torch.randn(t, 2, 4, 4, generator=g), "text": torch.randn(2 + i, 48, generator=g),
              "pooled": torch.randn(24, generator=g)} for i, t in enumerate((3, 1 + 1, 4))]
    seen = set()
    for gid in range(60):
        fb = build_batch(clips, gid, cfg.data, cfg.flow, visual_cond=True, null_text=None, pack=True)
        seen.add(fb.task)
        lengths = [1, 1, 1] if fb.task == "t2i" else [3, 2, 4]
        cu = [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
        assert fb.cu_frames == cu and fb.x.shape[:2] == (1, cu[-1]) and fb.text.shape[0] == 3
        x0 = torch.cat([c["latent"][:n] for c, n in zip(clips, lengths)])[None]
        eps = fb.target + x0
        tf = torch.cat([fb.t[i].expand(n) for i, n in enumerate(lengths)]).view(1, -1, 1, 1, 1)
        xt = (1 - tf) * x0 + tf * eps
        firsts = cu[:-1]
        if fb.task == "i2v":
            assert (fb.x[0, firsts, ..., 8] == 1).all() and fb.x[..., 8].sum() == 3 * 2 * 4
            assert torch.equal(fb.x[0, firsts, ..., :4], x0[0, firsts])
            assert fb.loss_frames.tolist() == [i not in firsts for i in range(cu[-1])]
            rest = [i for i in range(cu[-1]) if i not in firsts]
            torch.testing.assert_close(fb.x[0, rest, ..., :4], xt[0, rest])
        else:
            assert not fb.x[..., 8].any() and fb.loss_frames.all()
            torch.testing.assert_close(fb.x[..., :4], xt)
        assert fb.tokens == cu[-1] * 1 * 2
    assert seen == {"t2i", "t2v", "i2v"}
    with pytest.raises(ValueError, match="one \\(H, W, C\\)"):
        build_batch([clips[0], {**clips[1], "latent": torch.randn(2, 4, 2, 4)}], 0, cfg.data, cfg.flow,
                    visual_cond=True, null_text=None, pack=True)


def test_dataloader_workers_keep_order_state_resume_and_errors(tmp_path):
    """workers=2: two DataLoader processes per rank read alternate batches; the stream, the consumed
    state, a resume from it and a corrupt shard's error are those of the single reader."""
    cfg = get_config("tiny-cpu")
    write_synthetic(str(tmp_path), cfg.model, {**cfg.synthetic, "samples": 12}, samples_per_shard=4)
    w = cfg.data.resolutions  # the weighted stream (the config's default)
    plain = LatentLoader(str(tmp_path), t_max=6, seed=1, rank=1, world=2, weights=w)
    work = LatentLoader(str(tmp_path), t_max=6, seed=1, rank=1, world=2, workers=2, prefetch=1, weights=w)
    states = []
    for _ in range(plain.batcher.num_batches + 3):  # across an epoch boundary
        (g1, a), (g2, b) = plain.next(), work.next()
        assert g1 == g2 and [x["key"] for x in a] == [x["key"] for x in b]
        assert torch.equal(a[0]["latent"], b[0]["latent"])
        assert work.state_dict() == plain.state_dict()
        states.append(work.state_dict())
    work.close()
    resumed = LatentLoader(str(tmp_path), t_max=6, seed=1, rank=1, world=2, workers=2, weights=w)
    resumed.load_state_dict(states[2])
    ref = LatentLoader(str(tmp_path), t_max=6, seed=1, rank=1, world=2, weights=w)
    ref.load_state_dict(states[2])
    for _ in range(4):
        assert resumed.next()[0] == ref.next()[0]
    resumed.close()
    with pytest.raises(ValueError, match="workers"):
        LatentLoader(str(tmp_path), t_max=6, workers=-1)
    (tmp_path / "shard-00001.tar").write_bytes(b"broken" * 300)
    broken = LatentLoader(str(tmp_path), t_max=6, seed=1, workers=2)
    with pytest.raises(ShardError, match="shard-00001.tar"):
        for _ in range(plain.batcher.num_batches):
            broken.next()
    broken.close()
