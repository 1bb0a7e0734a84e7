"""Latent shards: plain ``.tar`` archives of per-sample safetensors blobs plus a ``manifest.json``.

Layout of a dataset folder (local path or ``s3://bucket/prefix``; every access goes through
``fsspec``, so both share one code path)::

    manifest.json             {"format": ..., "shards": [{"name", "samples": [{"key", "shape", "text_len"}]}],
                               "null_text": "null_text.safetensors" | null}
    shard-00000.tar           members "<key>.safetensors", one per sample, holding
                                latent (T, H, W, C)   VAE latents, channels last, as CrossDiT.forward takes x
                                text   (L, D_text)    text-encoder hidden states (template cropped)
                                pooled (D_pooled,)    pooled CLIP vector
    null_text.safetensors     text (L0, D_text), pooled (D_pooled,): the empty caption (null-text dropout)

Why not webdataset: it has no resume support and no ``s3://`` opener of its own (it shells out
``pipe:aws s3 cp``), and a sample here is a single member, so stdlib ``tarfile`` over an fsspec file
object (random access by member offset, read from the manifest-free tar headers) is less code. The
manifest carries every sample's shape so bucketing and the per-rank batch plan need no shard reads.
Serialization is safetensors (no pickle: shards from untrusted storage cannot run code).
"""
from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "kandinsky-latent-shards/1"
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.safetensors"
SAMPLE_KEYS = ("latent", "text", "pooled")


class ShardError(RuntimeError):
    """A shard (or the manifest) is missing, corrupt or does not hold what the manifest says."""


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def encode_sample(latent: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> bytes:
    """One sample as safetensors bytes; validates shapes (latent 4-D, text 2-D, pooled 1-D)."""
    if latent.dim() != 4 or text.dim() != 2 or pooled.dim() != 1:
        raise ValueError(f"a sample needs latent (T, H, W, C), text (L, D) and pooled (D2,), got shapes "
                         f"{tuple(latent.shape)}, {tuple(text.shape)}, {tuple(pooled.shape)}")
    if text.shape[0] < 1 or latent.numel() == 0:
        raise ValueError("a sample needs at least one text token and a non-empty latent")
    return st_save({"latent": latent.contiguous(), "text": text.contiguous(), "pooled": pooled.contiguous()})


# Samples per shard by (image?, size class), the report's section 6.1: archives of about one size
# whatever the resolution, and few objects to open.
REPORT_SHARD_SIZES = {(True, "low"): 1024, (True, "medium"): 256, (True, "high"): 64,
                      (False, "low"): 16, (False, "medium"): 4, (False, "high"): 1}


def size_class(latent_hw: tuple[int, int], stride: int = 8) -> str:
    """``low`` below 512x512 pixels (256, 256x384), ``medium`` below 768x1024 (512x512, 512x768),
    ``high`` from there (1024x1024, 1280x768, ...): the report's three resolution stages."""
    area = latent_hw[0] * latent_hw[1] * stride * stride
    return "low" if area < 512 * 512 else ("medium" if area < 768 * 1024 else "high")


def report_shard_size(shape) -> int:
    """Samples per shard for a latent of ``shape`` (T, H, W, C) as the report sizes its archives."""
    return REPORT_SHARD_SIZES[(int(shape[0]) == 1, size_class((int(shape[1]), int(shape[2]))))]


def write_dataset(dst: str, samples, *, samples_per_shard: int | None = 16,
                  null_text: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Write ``samples`` (iterable of (key, latent, text, pooled)) as shards + manifest under ``dst``.

    ``samples_per_shard``: a fixed count, or None for the report's sizes (:func:`report_shard_size`:
    each shard holds one modality and size class, 1024 low-resolution images down to 1 HD video)."""
    if samples_per_shard is not None and (isinstance(samples_per_shard, bool) or not isinstance(
            samples_per_shard, int) or samples_per_shard < 1):
        raise ValueError(f"samples_per_shard must be an int >= 1 or None, got {samples_per_shard!r}")
    fs, root = fsspec.core.url_to_fs(dst)
    fs.makedirs(root, exist_ok=True)
    shards: list[dict[str, Any]] = []
    bufs: dict[tuple, list[tuple[str, bytes, dict]]] = {}
    seen: set[str] = set()

    def flush(buf):
        name = f"shard-{len(shards):05d}.tar"
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            for key, blob, _ in buf:
                info = tarfile.TarInfo(f"{key}.safetensors")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        with fs.open(join(root, name), "wb") as f:
            f.write(raw.getvalue())
        shards.append({"name": name, "samples": [meta for _, _, meta in buf]})
        buf.clear()

    for key, latent, text, pooled in samples:
        if not isinstance(key, str) or not key or "/" in key or key in seen:
            raise ValueError(f"sample keys must be unique non-empty names without '/', got {key!r}")
        seen.add(key)
        blob = encode_sample(latent, text, pooled)
        if samples_per_shard is None:
            group = (int(latent.shape[0]) == 1, size_class((int(latent.shape[1]), int(latent.shape[2]))))
            cap = REPORT_SHARD_SIZES[group]
        else:
            group, cap = None, samples_per_shard
        buf = bufs.setdefault(group, [])
        buf.append((key, blob, {"key": key, "shape": list(latent.shape), "text_len": int(text.shape[0])}))
        if len(buf) >= cap:
            flush(buf)
    for buf in bufs.values():
        if buf:
            flush(buf)
    if not shards:
        raise ValueError(f"no samples to write into {dst}")
    manifest = {"format": FORMAT, "shards": shards, "null_text": None}
    if null_text is not None:
        text, pooled = null_text
        with fs.open(join(root, NULL_TEXT), "wb") as f:
            f.write(st_save({"text": text.contiguous(), "pooled": pooled.contiguous()}))
        manifest["null_text"] = NULL_TEXT
    with fs.open(join(root, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return manifest


def read_manifest(url: str) -> dict:
    path = join(url, MANIFEST)
    try:
        with fsspec.open(path, "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ShardError(f"no dataset manifest at {path} "
                         "(write one with python -m training.data.write_shards)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"dataset manifest {path} is not valid JSON: {e}") from None
    except Exception as e:  # unreachable endpoint, credentials, permissions: name the URL and the cause
        raise ShardError(f"cannot read the dataset manifest {path}: {type(e).__name__}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("shards"):
        raise ShardError(f"{path} is not a {FORMAT} manifest with shards")
    return manifest


class ShardReader:
    """Reads samples by (shard name, key); keeps a few shards' tar indexes open (LRU)."""

    def __init__(self, url: str, *, cache: int = 2):
        self.url = url
        self.cache = cache
        self._open: OrderedDict[str, tuple[Any, tarfile.TarFile]] = OrderedDict()

    def _tar(self, name: str) -> tarfile.TarFile:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name][1]
        path = join(self.url, name)
        try:
            f = fsspec.open(path, "rb").open()
        except FileNotFoundError:
            raise ShardError(f"shard {path} is missing") from None
        except OSError as e:
            raise ShardError(f"shard {path} cannot be opened: {e}") from e
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError, EOFError) as e:
            f.close()
            raise ShardError(f"shard {path} is not a readable tar archive: {e}") from e
        self._open[name] = (f, tar)
        while len(self._open) > self.cache:
            _, (old_f, old_tar) = self._open.popitem(last=False)
            old_tar.close()
            old_f.close()
        return tar

    def read(self, name: str, key: str) -> dict[str, torch.Tensor]:
        path = join(self.url, name)
        tar = self._tar(name)
        try:
            member = tar.extractfile(f"{key}.safetensors")
            blob = member.read() if member is not None else None
        except KeyError:
            raise ShardError(f"shard {path} has no sample {key!r} (the manifest lists it)") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"shard {path}: reading sample {key!r} failed: {e}") from e
        if blob is None:
            raise ShardError(f"shard {path}: member {key!r} is not a file")
        try:
            sample = st_load(blob)
        except Exception as e:  # safetensors raises its own error type on corrupt bytes
            raise ShardError(f"shard {path}: sample {key!r} is corrupt: {e}") from e
        if set(sample) != set(SAMPLE_KEYS):
            raise ShardError(f"shard {path}: sample {key!r} holds {sorted(sample)}, "
                             f"expected {list(SAMPLE_KEYS)}")
        return sample

    def close(self) -> None:
        for f, tar in self._open.values():
            tar.close()
            f.close()
        self._open.clear()


def read_null_text(url: str, manifest: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not manifest.get("null_text"):
        return None
    path = join(url, manifest["null_text"])
    try:
        with fsspec.open(path, "rb") as f:
            d = st_load(f.read())
        return d["text"], d["pooled"]
    except Exception as e:
        raise ShardError(f"null-text embedding {path} is unreadable: {e}") from e
