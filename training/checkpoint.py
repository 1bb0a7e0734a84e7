"""Resumable DCP checkpoints: every rank writes its own shard, async, complete-marker, keep-last-k.

Layout under ``<output>/checkpoints``::

    step-00000010/         DCP files (one ``__<rank>_0.distcp`` per rank + ``.metadata``)
    step-00000010/COMPLETE written by rank 0 only after its save future completed (with collectives,
                           that future completes after every rank's data and the metadata are written)

Only folders with ``COMPLETE`` count: a run killed mid-save resumes from the previous one.
``async_save`` returns after staging (a copy of the state), so a step never waits for the write;
at most one save is in flight (a new save first waits for the previous one). The state holds the
model and optimizer (sharded, ``get_state_dict``), the EMA shards, the scheduler, the loader cursor,
the step and the torch RNG state.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint marked complete cannot be loaded (files missing or damaged)."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.name.startswith("step-") and (d / MARKER).exists():
            try:
                steps.append(int(d.name[5:]))
            except ValueError:
                pass
    return sorted(steps)


class Checkpointer:
    def __init__(self, root: str | Path, *, keep_last: int, async_save: bool, rank: int):
        self.root = Path(root)
        self.keep_last, self.async_save, self.rank = keep_last, async_save, rank
        self.pending: tuple[int, object] | None = None
        # a dedicated gloo group for the async writer thread's collectives (torchtitan's pattern)
        self.pg = dist.new_group(backend="gloo")
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> int | None:
        """Newest complete step, agreed on by every rank (rank 0 reads the folder)."""
        found = [complete_steps(self.root)[-1] if complete_steps(self.root) else None]
        dist.broadcast_object_list(found, src=0)
        return found[0]

    def save(self, step: int, state: dict) -> None:
        self.wait()
        path = step_dir(self.root, step)
        if self.async_save:
            fut = dcp.async_save(state, checkpoint_id=str(path), process_group=self.pg)
            self.pending = (step, fut)
        else:
            dcp.save(state, checkpoint_id=str(path), process_group=self.pg)
            self._complete(step)

    def poll(self) -> None:
        """Mark the in-flight save complete if it finished (call once per step)."""
        if self.pending is not None and self.pending[1].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is not None:
            step, fut = self.pending
            self.pending = None
            fut.result()  # re-raises a failed write
            self._complete(step)

    def _complete(self, step: int) -> None:
        if self.rank != 0:
            return
        (step_dir(self.root, step) / MARKER).write_text(f"{step}\n")
        steps = complete_steps(self.root)
        keep = set(steps[-self.keep_last:])
        newest = steps[-1]
        for d in self.root.iterdir():
            if not d.name.startswith("step-"):
                continue
            try:
                s = int(d.name[5:])
            except ValueError:
                continue
            # old complete ones beyond keep_last, and incomplete leftovers older than the newest
            if (s in steps and s not in keep) or (s not in steps and s < newest):
                shutil.rmtree(d, ignore_errors=True)

    def load(self, step: int, state: dict) -> None:
        path = step_dir(self.root, step)
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self.pg)
        except (Exception, CheckpointException) as e:  # nothing here deletes or rewrites the folder
            # DCP wraps each rank's failure (a BaseException, with tracebacks in its str)
            causes = ([x[0] for x in e.failures.values()] if isinstance(e, CheckpointException) else [e])
            why = "; ".join(f"{type(c).__name__}: {c}" for c in causes)
            raise CheckpointError(
                f"checkpoint {path} is marked complete but cannot be loaded ({why}); move that folder away to "
                f"resume from the previous checkpoint, or use another --output to start afresh") from e

    def close(self) -> None:
        self.wait()
        if self.pg is not None:
            dist.destroy_process_group(self.pg)
            self.pg = None


def export_ema(model: torch.nn.Module, ema: dict[str, torch.Tensor], path: str | Path,
               rank: int) -> Path | None:
    """Gather the EMA weights (collective: call on every rank) and, on rank 0, write them with the
    model's own ``save_pretrained`` (the folder ``CrossDiT.from_pretrained`` loads)."""
    from kandinsky_model import CrossDiT

    full = {}
    for name, t in ema.items():
        full[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu()
    if rank != 0:
        return None
    fresh = CrossDiT(model.config)
    fresh.load_state_dict(full, strict=True)
    return fresh.save_pretrained(path)
