"""One side of the VAE benchmark in its own process, so that its peak RSS is its own.

    python -m benchmarks._vae_runner --side ours|reference|diffusers --weights DIR --dtype fp32|bf16
                                     --frames F --size S [--latent-channels C]

Loads the VAE from ``DIR`` (a Diffusers-layout folder that every side reads: identical weights), builds
the inputs from fixed seeds (the same on every side: a video (1, 3, F, S, S) in [-1, 1] to encode and
unit-normal latents (1, C, 1 + (F - 1) / 4, S / 8, S / 8) to decode), then answers commands, one per
line on stdin, with one JSON line each on its stdout (everything else the libraries print goes to
stderr):

  ``round``       encode the video, then decode the latents (``torch.no_grad``); replies
                  ``{"encode_s", "decode_s", "encode_peak_mb", "decode_peak_mb", "peak_mb", "hwm_mb"}``:
                  seconds of each call, and the peak resident set size during each call above the RSS
                  just before it (``VmHWM`` reset through ``/proc/self/clear_refs`` before each call;
                  where that is not possible, ``ru_maxrss`` above the RSS after loading: then the
                  figure is the process's peak so far). ``peak_mb`` is the larger of the two calls'
                  peaks, ``hwm_mb`` the absolute peak RSS of the process (weights, libraries and all);
  ``save PATH``   ``torch.save`` ``{"latents", "video"}`` of the last round (as float32) to PATH;
  ``quit``        exit.
:class:`Runner` is the parent's end (the suite ``benchmarks/test_bench_vae.py`` and
``scripts/vae_profile.py`` use it).
The first line it prints is ``{"ready": true, "load_s", "rss_mb", "rss_method", "torch_threads", "side",
"settings"}`` once loaded (``{"error": ...}`` and exit status 1 when it cannot load).

Sides:
  ``ours``        :class:`kandinsky_model.CausalVideoVAE` with its defaults (``tiling="auto"``) and the
                  kernels library's automatic backend choice;
  ``reference``   the same class on its plain path: ``tiling="none"``, and the parent starts this
                  process with ``KANDINSKY_KERNELS_BACKEND=reference`` (pure-torch reference ops);
  ``diffusers``   diffusers' ``AutoencoderKLHunyuanVideo`` with its default settings (framewise encoding
                  and decoding above 16 frames / 4 latent frames, no spatial tiling);
                  ``latent_dist.mode()`` is the latent (our ``encode`` returns the same mean).

Library imports happen while loading, on every side (diffusers' package and model class; our model and
the kernels library's op modules, which otherwise load lazily inside the first call), so a per-call peak
is the call's working memory, not one-time imports; ``hwm_mb`` still counts everything.

glibc keeps freed memory of up to 32 MB chunks in its heap once it has seen such frees (its dynamic mmap
threshold), which would hide later peaks from an RSS delta. The parent therefore starts every side with
``MALLOC_MMAP_THRESHOLD_`` fixed (:data:`MALLOC_ENV`), the same for all sides.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
SIDES = ("ours", "reference", "diffusers")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _hwm_mb() -> float:
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


class _Peak:
    """Peak RSS above the RSS at entry, in MB (see the module docstring for the method)."""

    def __init__(self, can_reset: bool, floor_mb: float) -> None:
        self.can_reset, self.floor_mb = can_reset, floor_mb

    def __enter__(self):
        self.start = _rss_mb()
        if self.can_reset:
            _reset_hwm()
        return self

    def __exit__(self, *exc) -> None:
        base = self.start if self.can_reset else self.floor_mb
        self.mb = max(0.0, _hwm_mb() - base)


def _load(side: str, weights: str, dtype):
    if side == "diffusers":
        from diffusers import AutoencoderKLHunyuanVideo

        vae = AutoencoderKLHunyuanVideo.from_pretrained(weights, torch_dtype=dtype).eval()
        return vae, (lambda x: vae.encode(x).latent_dist.mode()), (lambda z: vae.decode(z).sample), {
            "use_framewise_encoding": vae.use_framewise_encoding,
            "use_framewise_decoding": vae.use_framewise_decoding, "use_tiling": vae.use_tiling,
            "tile_sample_min_num_frames": vae.tile_sample_min_num_frames}
    from kandinsky_model import CausalVideoVAE

    # The kernels library loads its op modules (and with them Triton, ~70 MB RSS where installed) on first
    # use; diffusers' side imports its library here, before the measured calls. Import ours here too, so
    # that no side's per-call peak holds one-time library imports (see the module doc).
    import kandinsky_kernels.ops.causal_conv3d  # noqa: F401
    import kandinsky_kernels.ops.group_norm_silu  # noqa: F401
    import kandinsky_kernels.ops.tile_blend  # noqa: F401

    vae = CausalVideoVAE.from_pretrained(weights, dtype=dtype).eval()
    if side == "reference":
        vae.tiling = "none"
    settings = {"tiling": str(vae.tiling), "KANDINSKY_KERNELS_BACKEND": os.environ.get("KANDINSKY_KERNELS_BACKEND")}
    return vae, vae.encode, vae.decode, settings


class Runner:
    """The parent's end of one side: starts ``python -m benchmarks._vae_runner`` (environment: this
    process's, plus :data:`MALLOC_ENV` and ``env``), waits until it has loaded (``ready`` holds its first
    reply) and sends it commands. Raises RuntimeError with the side's error (or the tail of its stderr)
    when it cannot load or dies. Use as a context manager, or call :meth:`close`."""

    def __init__(self, side: str, weights: str, dtype: str, frames: int, size: int, *, latent_channels: int = 16,
                 env: dict | None = None) -> None:
        import subprocess
        import tempfile

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        full_env = {**os.environ, **MALLOC_ENV, **(env or {})}
        full_env["PYTHONPATH"] = root + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
        self.side = side
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._vae_runner", "--side", side, "--weights", str(weights),
             "--dtype", dtype, "--frames", str(frames), "--size", str(size),
             "--latent-channels", str(latent_channels)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, cwd=root, env=full_env,
        )
        self.ready: dict | None = None

    def wait_ready(self) -> dict:
        """Block until the side has loaded; its ``ready`` reply."""
        if self.ready is None:
            self.ready = self._read()
        return self.ready

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self._err.seek(0)
            tail = self._err.read()[-1500:].strip()
            raise RuntimeError(f"the {self.side} runner exited (status {self.proc.returncode}): {tail}")
        obj = json.loads(line)
        if "error" in obj:
            raise RuntimeError(f"{self.side}: {obj['error']}")
        return obj

    def _ask(self, cmd: str) -> dict:
        self.wait_ready()
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def round(self) -> dict:
        """One encode + decode; the side's reply (times in seconds, peaks in MB)."""
        return self._ask("round")

    def save(self, path: str) -> None:
        self._ask(f"save {path}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:  # a dead pipe or a side that does not exit: kill it
                self.proc.kill()
                self.proc.wait()
        self._err.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks._vae_runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--side", choices=SIDES, required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--latent-channels", type=int, default=16)
    args = ap.parse_args(argv)

    # The protocol owns the real stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr

    def reply(obj) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    try:
        vae, encode, decode, settings = _load(args.side, args.weights, dtype)
    except Exception as e:  # reported to the parent, which shows it as the reason the side is skipped
        reply({"error": f"{type(e).__name__}: {e}"})
        return 1
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, args.frames, args.size, args.size, generator=g) * 2 - 1).to(dtype)
    t = 1 + (args.frames - 1) // 4
    latents = torch.randn(1, args.latent_channels, t, args.size // 8, args.size // 8, generator=g).to(dtype)
    load_s = time.perf_counter() - t0
    can_reset = _reset_hwm() and _status_kb("VmHWM") is not None
    floor = _rss_mb()
    reply({"ready": True, "side": args.side, "load_s": load_s, "rss_mb": floor,
           "rss_method": "VmHWM reset per call" if can_reset else "ru_maxrss above the RSS after loading",
           "torch_threads": torch.get_num_threads(), "settings": settings})
    last = None  # (latents, video) of the last round, for ``save``
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "round":
            last = None
            with torch.no_grad():
                with _Peak(can_reset, floor) as pe:
                    t0 = time.perf_counter()
                    z = encode(video)
                    t1 = time.perf_counter()
                with _Peak(can_reset, floor) as pd:
                    t2 = time.perf_counter()
                    y = decode(latents)
                    t3 = time.perf_counter()
            last = (z, y)
            reply({"encode_s": t1 - t0, "decode_s": t3 - t2, "encode_peak_mb": pe.mb, "decode_peak_mb": pd.mb,
                   "peak_mb": max(pe.mb, pd.mb), "hwm_mb": _hwm_mb()})
        elif cmd.startswith("save "):
            if last is None:
                reply({"error": "save before any round"})
                continue
            torch.save({"latents": last[0].float(), "video": last[1].float()}, cmd[5:])
            reply({"saved": cmd[5:]})
        elif cmd == "quit" or not cmd:
            break
        else:
            reply({"error": f"unknown command {cmd!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
