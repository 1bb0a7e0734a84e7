"""Latent shards on S3: moto's threaded server on 127.0.0.1 + s3fs, the same fsspec code path as local."""
from __future__ import annotations

import os

import fsspec
import pytest
import s3fs  # noqa: F401  (needed for s3:// URLs: fail here, not skip)
import torch
from moto.server import ThreadedMotoServer

from test_training import losses, run_train
from training.config import get_config
from training.data import LatentLoader, ShardError, write_synthetic

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_env():
    old_env = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bucket")
    try:
        yield {**CREDS, "FSSPEC_S3_ENDPOINT_URL": endpoint}, fs
    finally:
        server.stop()
        if old_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old_conf
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_shards_train_like_local(s3_env, tmp_path):
    env, fs = s3_env
    cfg = get_config("tiny-cpu")
    write_synthetic("s3://bucket/ds", cfg.model, cfg.synthetic, seed=cfg.data.seed)
    write_synthetic(str(tmp_path / "local"), cfg.model, cfg.synthetic, seed=cfg.data.seed)
    remote = LatentLoader("s3://bucket/ds", t_max=cfg.data.t_max, seed=3, rank=1, world=2)
    local = LatentLoader(str(tmp_path / "local"), t_max=cfg.data.t_max, seed=3, rank=1, world=2)
    for _ in range(remote.batcher.num_batches):
        (g1, a), (g2, b) = remote.next(), local.next()
        assert g1 == g2 and [s["key"] for s in a] == [s["key"] for s in b]
        for x, y in zip(a, b):
            assert torch.equal(x["latent"], y["latent"]) and torch.equal(x["text"], y["text"])
    # a training run streams from s3:// and sees the same batches as one on the local copy
    args = ("--max-steps", "2", "checkpoint.every=0", "checkpoint.export_ema=False", "log.plot=False")
    run_train(tmp_path / "s3run", "--data", "s3://bucket/ds", *args, env_extra=env)
    run_train(tmp_path / "localrun", "--data", str(tmp_path / "local"), *args)
    assert losses(tmp_path / "s3run") == losses(tmp_path / "localrun")


def test_s3_corrupt_shard_is_named(s3_env):
    _, fs = s3_env
    cfg = get_config("tiny-cpu")
    write_synthetic("s3://bucket/bad", cfg.model, {**cfg.synthetic, "samples": 4}, samples_per_shard=2)
    fs.pipe("bucket/bad/shard-00001.tar", b"garbage" * 200)
    loader = LatentLoader("s3://bucket/bad", t_max=cfg.data.t_max)
    with pytest.raises(ShardError, match="s3://bucket/bad/shard-00001.tar"):
        for _ in range(loader.batcher.num_batches):
            loader.next()


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    """An S3 endpoint nobody listens on: exit code 2 and a message naming the manifest URL."""
    import socket
    with socket.socket() as sock:  # a free port, closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**CREDS, "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}
    res = run_train(tmp_path / "run", "--data", "s3://bucket/ds", env_extra=env, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot read the dataset manifest s3://bucket/ds/manifest.json" in res.stderr
    assert "Traceback" not in res.stderr
