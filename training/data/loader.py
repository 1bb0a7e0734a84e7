"""Bucketed, rank-sharded, resumable batches of latent clips.

Buckets (``pack=True``, the report's recipe): one per (image or video, H, W): clips of one aspect
ratio and any length. A batch pops clips from its bucket's shuffled queue while the sum of latent
frames stays <= ``t_max``; they are packed along T into one sequence and the model keeps them apart
(``CrossDiT.forward(cu_frames=...)``: per-video attention, text, timestep and RoPE). Images (T = 1)
have their own buckets, so image batches are image-only. ``pack=False``: one bucket per exact latent
shape (T, H, W), ``t_max // T`` clips stacked along the batch dimension.

Resolution weights (``weights={"HxW": p}``, the report's Table 4 probabilities): batch ``g`` of the
global stream is drawn from the clips of one pixel size, chosen with those probabilities by a
generator seeded by (seed, g); within a size the buckets (image / video, or exact shapes) are chosen
in proportion to their clip counts. Each bucket is a queue walked in passes: pass ``k`` is a
shuffle seeded by (seed, bucket, k), a batch pops clips from it while the frame sum fits and ends
at the end of the pass, so within a pass no clip is repeated or skipped, across ranks too. The state
is the stream position plus every bucket's (pass, offset), equal on every rank.

Order without weights: epoch ``e`` shuffles each bucket and the list of batches with a generator seeded by
(seed, e); the global stream is epoch 0's batches, then epoch 1's, ... Rank ``r`` of ``W`` takes
global batches ``p + r`` for p = 0, W, 2W, ... (the same rule per micro-batch of gradient
accumulation), so over an epoch no sample is lost or repeated across ranks, and an epoch boundary may
fall inside a round. The state ``{"epoch", "position"}`` (the next global batch, equal on every rank)
is saved in checkpoints; a resumed run continues with the next unseen batch.

Reading: with ``workers = 0`` one background prefetch thread per rank reads ``data.prefetch`` batches
ahead (one ShardReader per rank, shards cached LRU). With ``workers = n > 0`` a
``torch.utils.data.DataLoader`` runs n worker processes per rank: worker w reads this rank's batches
w, w + n, w + 2n, ... (its own ShardReader), and the DataLoader hands them out in order, so the stream,
the checkpointed state and a resume are the same as with one reader.
"""
from __future__ import annotations

import json
import queue
import random
import threading
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import VAE_STRIDE
from .shards import ShardReader, read_manifest, read_null_text


@dataclass(frozen=True)
class Entry:
    shard: str
    key: str
    shape: tuple[int, int, int, int]


class BucketBatcher:
    """The batch plan of a dataset (metadata only) and this rank's cursor in it."""

    def __init__(self, url: str, *, t_max: int, seed: int = 0, rank: int = 0, world: int = 1, pack: bool = True,
                 weights: dict[str, float] | None = None):
        if not (0 <= rank < world):
            raise ValueError(f"rank {rank} must be in [0, world={world})")
        self.url, self.t_max, self.seed, self.rank, self.world = url, t_max, seed, rank, world
        self.pack = pack
        self.manifest = read_manifest(url)
        self.entries: list[Entry] = []
        for shard in self.manifest["shards"]:
            for s in shard["samples"]:
                self.entries.append(Entry(shard["name"], s["key"], tuple(int(v) for v in s["shape"])))
        channels = {e.shape[3] for e in self.entries}
        if len(channels) != 1:
            raise ValueError(f"dataset {url} mixes latent channel counts {sorted(channels)}")
        self.buckets: dict[tuple[int, ...], list[int]] = {}
        for i, e in enumerate(self.entries):
            if e.shape[0] > t_max:
                raise ValueError(f"sample {e.key!r} in {e.shard} has {e.shape[0]} latent frames, more than "
                                 f"data.t_max = {t_max}")
            self.buckets.setdefault(self.bucket_of(e.shape), []).append(i)
        self.epoch = 0
        self.position = 0
        self._plan_epoch = -1
        self._plan: list[list[int]] = []
        self.num_batches = len(self._batches(0))
        """Batches of one epoch (with weights: of one pass over every bucket)."""
        self.weights = None if weights is None else self._bucket_weights(weights, VAE_STRIDE)
        self._keys = sorted(self.buckets)
        self._cursors = {b: [0, 0] for b in self._keys}  # with weights: bucket -> [pass, offset]
        self._orders: dict[tuple, tuple[int, list[int]]] = {}

    def _bucket_weights(self, weights: dict[str, float], stride: int) -> tuple[list[tuple], list[float]]:
        """(sizes, their probabilities); each size's buckets get its probability by clip count."""
        data_sizes: dict[tuple[int, int], list[tuple]] = {}
        for b in self.buckets:
            data_sizes.setdefault((b[1] * stride, b[2] * stride), []).append(b)
        wanted = {}
        for k, p in weights.items():
            h, w = (int(v) for v in str(k).split("x"))
            wanted[(h, w)] = float(p)
        fmt = lambda sizes: ", ".join(f"{h}x{w}" for h, w in sorted(sizes))  # noqa: E731
        missing = [hw for hw, p in wanted.items() if p > 0 and hw not in data_sizes]
        if missing:
            raise ValueError(f"data.resolutions asks for {fmt(missing)} but dataset {self.url} has no clips of "
                             f"that size (it has {fmt(data_sizes)}); drop them or set data.resolutions=data")
        unlisted = [hw for hw in data_sizes if hw not in wanted]
        if unlisted:
            raise ValueError(f"dataset {self.url} holds clips of {fmt(unlisted)} that data.resolutions does not "
                             f"list ({fmt(wanted)}); give them a probability or set data.resolutions=data")
        sizes = sorted(hw for hw, p in wanted.items() if p > 0)
        return [sorted(data_sizes[hw]) for hw in sizes], [wanted[hw] for hw in sizes]

    def _draw_bucket(self, gid: int) -> tuple:
        groups, probs = self.weights
        rng = random.Random(self.seed * 1_000_003 + gid)
        cands = rng.choices(groups, weights=probs)[0]
        return rng.choices(cands, weights=[len(self.buckets[b]) for b in cands])[0]

    def _pop(self, bucket: tuple) -> list[int]:
        """The next batch of ``bucket``'s queue; it ends at the end of the current pass."""
        cur = self._cursors[bucket]
        cached = self._orders.get(bucket)
        if cached is None or cached[0] != cur[0]:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self._keys.index(bucket)) * 1_000_003 + cur[0])
            idx = self.buckets[bucket]
            cached = (cur[0], [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()])
            self._orders[bucket] = cached
        order, start = cached[1], cur[1]
        if self.pack:
            end, frames = start, 0
            while end < len(order) and (end == start or frames + self.entries[order[end]].shape[0] <= self.t_max):
                frames += self.entries[order[end]].shape[0]
                end += 1
        else:
            end = min(len(order), start + max(1, self.t_max // bucket[0]))
        cur[:] = [cur[0] + 1, 0] if end == len(order) else [cur[0], end]
        return order[start:end]

    def bucket_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Bucket key of a latent shape (T, H, W, C): (image?, H, W) when packing, else (T, H, W)."""
        return (int(shape[0] == 1), shape[1], shape[2]) if self.pack else tuple(shape[:3])

    def _batches(self, epoch: int) -> list[list[int]]:
        if epoch == self._plan_epoch:
            return self._plan
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for shape in sorted(self.buckets):
            idx = self.buckets[shape]
            order = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
            if self.pack:  # pop clips while the frame sum fits
                cur, frames = [], 0
                for i in order:
                    t = self.entries[i].shape[0]
                    if cur and frames + t > self.t_max:
                        batches.append(cur)
                        cur, frames = [], 0
                    cur.append(i)
                    frames += t
                batches.append(cur)
                continue
            per = max(1, self.t_max // shape[0])
            batches += [order[i:i + per] for i in range(0, len(order), per)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def next(self) -> tuple[int, list[Entry]]:
        """This rank's next batch: (global batch id, entries); advances every rank's cursor by W."""
        if self.weights is not None:  # walk the W global batches of this round; keep ours
            mine = None
            for r in range(self.world):
                batch = self._pop(self._draw_bucket(self.position))
                if r == self.rank:
                    mine = (self.position, [self.entries[i] for i in batch])
                self.position += 1
            return mine
        e, p = self.epoch, self.position + self.rank
        while p >= self.num_batches:
            p -= self.num_batches
            e += 1
        gid = e * self.num_batches + p
        batch = [self.entries[i] for i in self._batches(e)[p]]
        self.position += self.world
        while self.position >= self.num_batches:
            self.position -= self.num_batches
            self.epoch += 1
        return gid, batch

    def _weights_tag(self) -> str:
        if self.weights is None:
            return ""
        return json.dumps([[list(map(list, g)), p] for g, p in zip(*self.weights)])

    def state_dict(self) -> dict:
        # cursors as a JSON string: checkpoints keep flat scalars
        return {"epoch": self.epoch, "position": self.position, "num_batches": self.num_batches,
                "seed": self.seed, "world": self.world, "pack": self.pack, "weights": self._weights_tag(),
                "cursors": json.dumps([self._cursors[b] for b in self._keys])}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_batches"] != self.num_batches or state["seed"] != self.seed
                or state.get("pack", False) != self.pack or state.get("weights", "") != self._weights_tag()):
            raise ValueError(f"loader state does not fit this dataset: saved {state}, now "
                             f"num_batches={self.num_batches} seed={self.seed} pack={self.pack} "
                             f"weights={self._weights_tag() or None}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if "cursors" in state:
            cursors = json.loads(state["cursors"])
            self._cursors = {b: [int(c[0]), int(c[1])] for b, c in zip(self._keys, cursors)}


class _PlanStream(IterableDataset):
    """This rank's batches from a saved batcher state, for DataLoader workers: every worker walks the
    whole plan (metadata only) and reads the samples of every n-th batch; yields (state after the
    batch, (gid, samples))."""

    def __init__(self, url: str, batcher_args: dict, state: dict):
        self.url, self.batcher_args, self.state = url, batcher_args, state

    def __iter__(self):
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        batcher = BucketBatcher(self.url, **self.batcher_args)
        batcher.load_state_dict(self.state)
        reader = ShardReader(self.url)
        try:
            i = 0
            while True:
                gid, entries = batcher.next()
                if i % n == wid:
                    yield batcher.state_dict(), (gid, _read_entries(reader, entries))
                i += 1
        finally:
            reader.close()


def _read_entries(reader, entries) -> list[dict]:
    samples = []
    for e in entries:
        s = reader.read(e.shard, e.key)
        if tuple(s["latent"].shape) != e.shape:
            raise ValueError(f"sample {e.key!r} in {e.shard}: latent shape {tuple(s['latent'].shape)} "
                             f"differs from the manifest's {e.shape}")
        samples.append({"key": e.key, **s})
    return samples


class LatentLoader:
    """Iterates this rank's batches: (global batch id, list of samples {key, latent, text, pooled}).

    With ``prefetch > 0`` a background thread reads up to that many batches ahead (overlapping shard
    I/O, e.g. from S3, with the step); the order is the same, errors surface at the batch that hit
    them, and :meth:`state_dict` describes the batches *consumed*, not the ones read ahead."""

    def __init__(self, url: str, *, t_max: int, seed: int = 0, rank: int = 0, world: int = 1,
                 prefetch: int = 0, pack: bool = True, workers: int = 0,
                 weights: dict[str, float] | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        self._batcher_args = dict(t_max=t_max, seed=seed, rank=rank, world=world, pack=pack, weights=weights)
        self.batcher = BucketBatcher(url, **self._batcher_args)
        self.url = url
        self.workers = workers
        self._workers_iter = None
        self.reader = ShardReader(url)
        self.null_text = read_null_text(url, self.batcher.manifest)
        self.prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._consumed = self.batcher.state_dict()

    def next(self) -> tuple[int, list[dict]]:
        if self.workers > 0:
            if self._workers_iter is None:
                dl = DataLoader(_PlanStream(self.url, self._batcher_args, self.batcher.state_dict()),
                                batch_size=None, num_workers=self.workers,
                                prefetch_factor=max(1, self.prefetch), collate_fn=None)
                self._workers_iter = iter(dl)
            state, out = next(self._workers_iter)
            self._consumed = state
            return out
        if self.prefetch <= 0:
            out = self._read_next()
            self._consumed = self.batcher.state_dict()
            return out
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._run, name="latent-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        state, out = item
        self._consumed = state
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = self._read_next()
                item = (self.batcher.state_dict(), out)
            except BaseException as e:  # handed to the consumer
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def close(self) -> None:
        self._workers_iter = None  # the DataLoader iterator shuts its workers down when dropped
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.reader.close()

    def _read_next(self) -> tuple[int, list[dict]]:
        gid, entries = self.batcher.next()
        return gid, _read_entries(self.reader, entries)

    def state_dict(self) -> dict:
        return dict(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None or self._workers_iter is not None:
            raise RuntimeError("load the loader state before the first batch is read")
        self.batcher.load_state_dict(state)
        self._consumed = self.batcher.state_dict()
