"""Paired A/B timings of the VAE kernels against the plain-torch path they replace, in one process.

Each pair runs alternately (A, B, A, B, ...) and reports the median of each side, so load from other
processes on a shared machine hits both sides alike. Per kernel at the VAE's real sizes, then (unless
--no-vae) one whole encode + decode of the published-config VAE (random weights) untiled, with
``kandinsky_model.vae.USE_KERNELS`` False (plain torch) vs True.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/vae_kernels_ab.py [--frames 9 --size 160] [--reps 5] [--conv] [--no-vae]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def pair(name, a, b, reps):
    ta, tb = [], []
    a(), b()  # warm up
    for _ in range(reps):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"{name:58s} torch {ma * 1e3:9.1f} ms   kernels {mb * 1e3:9.1f} ms   speedup {ma / mb:5.2f}x", flush=True)
    return ma, mb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--vae-reps", type=int, default=2)
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--conv", action="store_true", help="also time the conv layouts (contiguous vs channels-last-3d)")
    args = p.parse_args()

    from kandinsky_kernels.ops.causal_conv3d import causal_pad3d
    from kandinsky_kernels.ops.group_norm_silu import group_norm, group_norm_silu
    from kandinsky_kernels.ops.tile_blend import tile_blend_
    from kandinsky_model import vae as vae_mod
    from kandinsky_model.vae import _upsample_causal
    from kandinsky_model.vae_tiling import _ramp

    torch.manual_seed(0)
    f, s = args.frames, args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; clip {f}x{s}x{s}")
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, 128, f, s, s, dtype=dtype)
            w, b = torch.rand(128, dtype=dtype), torch.randn(128, dtype=dtype)
            pair(f"GroupNorm+SiLU+causal pad 128x{f}x{s}x{s} {str(dtype)[6:]}",
                 lambda: F.pad(F.silu(F.group_norm(x, 32, w, b, 1e-6), inplace=True), (1, 1, 1, 1, 2, 0),
                               mode="replicate") if dtype == torch.float32 else
                 torch.nn.functional.pad(F.silu(F.group_norm(x, 32, w, b, 1e-6), inplace=True).float(),
                                         (1, 1, 1, 1, 2, 0), mode="replicate").to(dtype),
                 lambda: group_norm_silu(x, w, b, 32, pad=(2, 1, 1)), args.reps)
            pair(f"GroupNorm+SiLU (no pad) 128x{f}x{s}x{s} {str(dtype)[6:]}",
                 lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6), inplace=True),
                 lambda: group_norm_silu(x, w, b, 32), args.reps)
        lt, ls = (f - 1) // 4 + 1, s // 8
        x = torch.randn(1, 512, lt, ls, ls)
        w, b = torch.rand(512), torch.randn(512)
        pair(f"GroupNorm (attention) 512x{lt}x{ls}x{ls} fp32", lambda: F.group_norm(x, 32, w, b, 1e-6),
             lambda: group_norm(x, w, b, 32), args.reps)
        x = torch.randn(1, 128, f, s, s)
        pair(f"causal pad (downsampler input) 128x{f}x{s}x{s} fp32",
             lambda: F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate"), lambda: causal_pad3d(x, (2, 1, 1)), args.reps)
        x = torch.randn(1, 256, (f - 1) // 2 + 1, s // 2, s // 2)
        pair(f"upsample(2,2,2)+causal pad 256x{x.shape[2]}x{s // 2}x{s // 2} fp32",
             lambda: F.pad(_upsample_causal(x, (2, 2, 2)), (1, 1, 1, 1, 2, 0), mode="replicate"),
             lambda: causal_pad3d(x, (2, 1, 1), (2, 2, 2)), args.reps)

        def stitch_torch(out, tile, dim, start, prev):
            n = tile.shape[dim]
            e = max(0, min(prev - start, n))
            old, new = out.narrow(dim, start, e), tile.narrow(dim, 0, e)
            shape = [1] * out.dim()
            shape[dim] = e
            old.copy_(torch.lerp(old, new, _ramp(e, out.device, out.dtype).view(shape)))
            out.narrow(dim, start + e, n - e).copy_(tile.narrow(dim, e, n - e))

        out = torch.randn(1, 3, 17, 256, 512)
        tile = torch.randn(1, 3, 17, 256, 256)
        pair("tile blend along W (decode strip 3x17x256, 64 px overlap)",
             lambda: stitch_torch(out, tile, 4, 192, 256), lambda: tile_blend_(out, tile, 4, 192, 256), args.reps)
        out = torch.randn(1, 3, 33, 256, 256)
        tile = torch.randn(1, 3, 18, 256, 256)
        pair("tile blend along T (decode, 4 frames overlap, sliced tile)",
             lambda: stitch_torch(out, tile[:, :, 1:], 2, 13, 17),
             lambda: tile_blend_(out, tile[:, :, 1:], 2, 13, 17), args.reps)

        if args.conv:
            # The conv itself: F.pad + conv3d (the plain path) vs conv3d on the kernel-written padded input,
            # contiguous vs channels-last-3d (input and weight), at the VAE's channel counts per stage.
            for c, ff, hw in ((128, f, s), (256, (f - 1) // 2 + 1, s // 2), (512, lt, s // 4), (512, lt, ls)):
                x = torch.randn(1, c, ff, hw, hw)
                w = torch.randn(c, c, 3, 3, 3) * 0.02
                xp = causal_pad3d(x, (2, 1, 1))
                xpc = xp.contiguous(memory_format=torch.channels_last_3d)
                wc = w.contiguous(memory_format=torch.channels_last_3d)
                pair(f"conv {c}x{ff}x{hw}x{hw}: F.pad+conv vs conv(padded)",
                     lambda: F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0), mode="replicate"), w), lambda: F.conv3d(xp, w), 2)
                pair(f"conv {c}x{ff}x{hw}x{hw}: conv(padded) vs channels-last-3d",
                     lambda: F.conv3d(xp, w), lambda: F.conv3d(xpc, wc), 2)
        if args.no_vae:
            return
        vae = vae_mod.CausalVideoVAE().eval()
        video = torch.rand(1, 3, f, s, s) * 2 - 1

        def run(kernels):
            def go():
                vae_mod.USE_KERNELS = kernels
                try:
                    return vae.decode(vae.encode(video, tiling="none"), tiling="none")
                finally:
                    vae_mod.USE_KERNELS = True
            return go

        times = {False: [], True: []}
        peaks = {False: [], True: []}
        outs = {}
        for rep in range(args.vae_reps):
            for kernels in (False, True):
                with _PeakRSS() as peak:
                    t0 = time.perf_counter()
                    y = run(kernels)()
                    times[kernels].append(time.perf_counter() - t0)
                peaks[kernels].append(peak.bytes - y.numel() * y.element_size())
                if rep == 0:
                    outs[kernels] = y
                del y
        print(f"whole VAE: max |kernels - torch| = {(outs[True] - outs[False]).abs().max().item():.3e}")
        ma, mb = statistics.median(times[False]), statistics.median(times[True])
        pa, pb = max(peaks[False]) / 2**20, max(peaks[True]) / 2**20
        print(f"VAE encode+decode {f}x{s}x{s} fp32 (published config, untiled): torch {ma:.2f} s, kernels {mb:.2f} s,"
              f" speedup {ma / mb:.2f}x; peak RSS above the start (output excluded) torch {pa:.0f} MiB, kernels "
              f"{pb:.0f} MiB ({pb / pa:.2f}x); times {times}")


class _PeakRSS:
    """Peak resident memory above the value at entry, sampled every 2 ms by a thread (large tensors are
    mmap-ed by glibc, so freeing them lowers RSS)."""

    def __enter__(self):
        import threading

        self.base = self.bytes = 0
        self.base = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.bytes = max(self.bytes, _rss() - self.base)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _rss() -> int:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    main()
