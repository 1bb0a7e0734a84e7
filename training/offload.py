"""Host offload of each checkpointed block's input between forward and backward.

With activation checkpointing (``parallel.activation_checkpointing``) a CrossDiT block keeps one
tensor per block from forward to backward: its input ``h`` (B, S, D), saved by the checkpoint to
recompute the block (the text, the time embedding and the RoPE table are shared by every block and
stay where they are; the outputs of the sequence-parallel all-to-alls that the selective policy
keeps are held by the checkpoint's own storage and are not offloaded either). With
``parallel.offload`` the runner in :mod:`training.parallelize` wraps each checkpointed block in
:meth:`BlockInputOffloader.block`, a ``torch.autograd.graph.saved_tensors_hooks`` pair that acts on
that one tensor:

- forward (pack): the input is copied into a host buffer and the saved slot holds a handle instead
  of the tensor, so the device memory is released as soon as the loop moves on to the next block;
- backward (unpack): the block's input is copied back to the device and the copy of the block
  before it is started (prefetch, one block ahead: backward visits the blocks last to first); the
  last block's input is prefetched by a gradient hook on the stack's output, i.e. while the head's
  backward runs.

On CUDA the copies run on one side stream into pinned host buffers with ``non_blocking=True``, so
they overlap the blocks' compute: the side stream waits for the compute stream before each copy,
the offloaded device tensor is ``record_stream``-ed on the side stream (its memory is reused only
after the copy to host finished), the compute stream waits on an event recorded after each copy
back before the recompute reads it, and a host buffer is handed out again only after its copy back
was queued on the same side stream (stream order keeps the next copy to host behind it).

On the CPU the same code runs with synchronous copies: "device" and "host" are the same RAM, and
offloading means moving the block input out of the tensors the step allocates into the pool of
reusable host buffers (:class:`HostPool`, allocated in the first step, then reused; pinned on
CUDA, where allocating pinned memory per step would be slow). The step's own allocations (what the
allocator or the profiler's memory events show above the step's start) then drop by about
``L - 2`` block inputs (all but the one in use and the one prefetched); the pool is a fixed cost
outside the step, like the optimizer state. That is what the CPU tests measure.

A saved input is unpacked once (backward with ``retain_graph=True`` over offloaded blocks raises).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

__all__ = ["BlockInputOffloader", "HostPool"]


class HostPool:
    """Reusable flat host buffers by dtype (pinned when ``pin``): :meth:`acquire` returns the
    smallest free buffer that holds the shape (viewed to it) or allocates one; :meth:`release` gives
    it back. At most ``max_free`` buffers are kept free (the smallest are dropped first)."""

    def __init__(self, pin: bool = False, max_free: int = 256):
        self.pin, self.max_free = pin, max_free
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self.allocated_bytes = 0
        """Bytes of every buffer this pool allocated (kept or handed out)."""

    def acquire(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        free = self._free.setdefault(dtype, [])
        for i, buf in enumerate(free):  # kept sorted by size: the first that fits is the smallest
            if buf.numel() >= n:
                del free[i]
                return buf[:n].view(shape)
        buf = torch.empty(n, dtype=dtype, pin_memory=self.pin)
        self.allocated_bytes += buf.nbytes
        return buf.view(shape)

    def release(self, view: torch.Tensor) -> None:
        flat = view._base if view._base is not None else view  # the flat buffer acquire() viewed
        free = self._free.setdefault(view.dtype, [])
        free.append(flat)
        free.sort(key=torch.Tensor.numel)
        while len(free) > self.max_free:
            free.pop(0)

    def free_bytes(self) -> int:
        return sum(b.nbytes for bufs in self._free.values() for b in bufs)


def _same(t: torch.Tensor, h: torch.Tensor | None) -> bool:
    """``t`` is the block input ``h``: the same object, or (should a torch version hand the hook
    another wrapper) the same memory with the same layout."""
    if h is None:
        return False
    if t is h:
        return True
    return (t.device == h.device and t.dtype == h.dtype and t.shape == h.shape and t.stride() == h.stride()
            and t.data_ptr() == h.data_ptr())


class _Offloaded:
    """A saved block input that lives on the host between forward and backward."""

    __slots__ = ("owner", "run", "index", "host", "shape", "dtype", "device", "on_device", "ready", "used")

    def __init__(self, owner: "BlockInputOffloader", run: list, index: int, t: torch.Tensor):
        self.owner, self.run, self.index = owner, run, index
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.on_device = self.ready = None
        self.used = False
        self.host = owner.pool.acquire(t.shape, t.dtype)
        stream = owner.stream_for(t.device)
        if stream is None:
            self.host.copy_(t)
        else:
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t has been computed
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # its memory is reused only after this copy finished
        owner.offloaded_bytes += t.nbytes

    def prefetch(self) -> None:
        """Start the copy back to the device (once)."""
        if self.on_device is not None or self.used:
            return
        dev = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # on the compute stream
        stream = self.owner.stream_for(self.device)
        if stream is None:
            dev.copy_(self.host)
        else:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # dev's memory is free
            with torch.cuda.stream(stream):
                dev.copy_(self.host, non_blocking=True)
                self.ready = stream.record_event()
            dev.record_stream(stream)  # freed unused (an aborted backward): not reused before the copy ends
        # the next copy into this buffer is queued behind this one on the same stream
        self.owner.pool.release(self.host)
        self.host = None
        self.on_device = dev

    def load(self) -> torch.Tensor:
        if self.used:
            raise RuntimeError("an offloaded block input was unpacked twice: backward with retain_graph=True "
                               "(or a second backward) over blocks with parallel.offload is not supported")
        self.prefetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        dev, self.on_device, self.used = self.on_device, None, True
        self.run[self.index] = None
        if self.index > 0 and self.run[self.index - 1] is not None:
            self.run[self.index - 1].prefetch()  # the block that backward visits next
        return dev


class BlockInputOffloader:
    """Offloads the input of each checkpointed block to the host (see the module docstring).

    Use one per model; per forward of the block stack, :meth:`new_run` starts a list of handles,
    :meth:`block` wraps each block's checkpoint call and :meth:`prefetch_on_grad` hooks the stack's
    output. ``offloaded_bytes`` counts the bytes moved to the host (for tests and reports);
    ``on_offload`` (optional) is called with each offloaded tensor before its copy (tests keep a
    weakref to check that the device tensor is freed)."""

    def __init__(self, pool: HostPool | None = None):
        self.pool = pool
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.offloaded_bytes = 0
        self.on_offload = None

    def stream_for(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def new_run(self) -> list:
        return []

    @contextlib.contextmanager
    def block(self, run: list, h: torch.Tensor):
        """Offload ``h`` (this block's input) wherever the autograd graph saves it inside the
        ``with``; every other saved tensor passes through unchanged."""
        if self.pool is None:
            self.pool = HostPool(pin=h.device.type == "cuda")
        index = len(run)
        run.append(None)
        href = weakref.ref(h)

        def pack(t):
            if run[index] is not None or not _same(t, href()):
                return t
            if self.on_offload is not None:
                self.on_offload(t)
            handle = _Offloaded(self, run, index, t)
            run[index] = handle
            return handle

        def unpack(x):
            return x.load() if isinstance(x, _Offloaded) else x

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def prefetch_on_grad(self, run: list, out: torch.Tensor) -> None:
        """When the gradient of the stack's output ``out`` arrives, start the copy back of the last
        offloaded block (the first one backward needs)."""
        if not out.requires_grad:
            return

        def hook(grad):
            for handle in reversed(run):
                if handle is not None:
                    handle.prefetch()
                    break
            return None

        out.register_hook(hook)
