"""Peak memory of a piece of work, on CUDA and on the CPU.

CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU:
torch keeps no peak for its CPU allocator, so :func:`peak_bytes` runs the work under
``torch.profiler`` with ``profile_memory=True`` and reads the allocation events, each of which
carries the allocator's running total since the profiler started. Either way the figure is the
peak of tensor memory allocated *above the start* (what was alive before, e.g. parameters and
optimizer state, is the caller's to add).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["peak_bytes", "allocation_trace"]


def allocation_trace(fn: Callable[[], object], device: str = "cpu") -> list[tuple[int, int, int]]:
    """Run ``fn`` under the profiler -> [(time_ns, bytes allocated (< 0: freed), running total)] of
    ``device``'s tensor allocations, in time order; the total starts at 0 when the profiler starts
    (memory freed that was allocated before then is not seen: it is never subtracted)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            e = node.extra_fields
            if e.device.type == torch.device(device).type:
                out.append((node.start_time_ns, e.alloc_size))
        stack.extend(node.children)
    out.sort()
    # the events' own running total (total_allocated) carries over what earlier profiler sessions
    # left allocated; the sum from this session's start is what is wanted. Frees of memory allocated
    # before the profiler started are not reported (the profiler warns about such blocks).
    total, trace = 0, []
    for t, a in out:
        total += a
        trace.append((t, a, total))
    return trace


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory allocated above the start while ``fn()`` runs, on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    trace = allocation_trace(fn, device.type)
    return max([0] + [total for _, _, total in trace])
