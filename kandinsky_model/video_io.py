"""Writing decoded videos: a file a person can open, and a PNG contact sheet of frames.

Frames come as the VAE returns them, ``(3, F, H, W)`` (or ``(B, 3, F, H, W)`` with B = 1) floats in
[-1, 1]. :func:`write_video` writes MP4 (H.264) through PyAV when it is installed and ``.mp4`` is
asked for, else an animated WebP (lossless) through Pillow, which every install of this package has
(matplotlib depends on it); ``.gif`` also works through Pillow. :func:`contact_sheet` lays frames out
in a grid in one PNG. Both return the path written.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

_PILLOW_FORMATS = {".webp": "WEBP", ".gif": "GIF"}


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) or (1, 3, F, H, W) float in [-1, 1] -> uint8 (F, H, W, 3) on the CPU (values
    outside [-1, 1] are clipped). ValueError for another shape, a non-float dtype or NaN/inf."""
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"video must be a torch.Tensor (3, F, H, W) in [-1, 1], got {type(video).__name__}")
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"write one video at a time: got a batch of {video.shape[0]} "
                             f"(shape {tuple(video.shape)}); pass video[i]")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3 or min(video.shape) == 0:
        raise ValueError(f"video must have shape (3, F, H, W) (RGB first, as CausalVideoVAE.decode returns), "
                         f"got {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1, 1], got {video.dtype}")
    v = video.detach().float().cpu()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("video holds NaN or infinite values")
    return ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def _have_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def write_video(video: torch.Tensor, path: str | os.PathLike, *, fps: float = 24.0) -> Path:
    """Write ``video`` (3, F, H, W) in [-1, 1] to ``path``.

    The suffix picks the format: ``.mp4`` (PyAV, H.264 yuv420p; width and height are padded to even
    sizes by repeating the last column/row, which H.264 needs), ``.webp`` (animated, lossless) or
    ``.gif`` (Pillow). ``.mp4`` without PyAV installed falls back to ``.webp`` next to it. Returns the
    path written. ValueError for a bad video, fps or suffix.
    """
    frames = to_uint8_frames(video)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", *_PILLOW_FORMATS):
        raise ValueError(f"path must end in .mp4, .webp or .gif, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        if _have_pyav():
            return _write_mp4(frames, path, fps)
        path = path.with_suffix(".webp")
        suffix = ".webp"
    from PIL import Image

    images = [Image.fromarray(f.numpy()) for f in frames]
    duration = max(1, round(1000.0 / fps))
    kwargs = {"lossless": True} if suffix == ".webp" else {"disposal": 2}
    images[0].save(path, format=_PILLOW_FORMATS[suffix], save_all=True, append_images=images[1:],
                   duration=duration, loop=0, **kwargs)
    return path


def _write_mp4(frames: torch.Tensor, path: Path, fps: float) -> Path:
    import av

    f, h, w, _ = frames.shape
    # H.264 in yuv420p needs even sizes; repeat the edge rather than scale
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = torch.cat([frames, frames[:, -1:]], 1) if pad_h else frames
        frames = torch.cat([frames, frames[:, :, -1:]], 2) if pad_w else frames
    with av.open(str(path), mode="w") as container:
        from fractions import Fraction

        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")))
        container.mux(stream.encode())
    return path


def contact_sheet(video: torch.Tensor, path: str | os.PathLike, *, max_frames: int = 16,
                  cols: int | None = None) -> Path:
    """A PNG grid of up to ``max_frames`` frames of ``video`` (3, F, H, W) in [-1, 1], evenly spaced
    (first and last included), ``cols`` per row (default: about square). Returns the path."""
    frames = to_uint8_frames(video)
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
    n_all = frames.shape[0]
    n = min(n_all, max_frames)
    idx = [round(i * (n_all - 1) / (n - 1)) for i in range(n)] if n > 1 else [0]
    cols = cols if cols is not None else math.ceil(math.sqrt(n))
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise ValueError(f"cols must be a positive int or None, got {cols!r}")
    rows = math.ceil(n / cols)
    _, h, w, _ = frames.shape
    sheet = torch.full((rows * h, cols * w, 3), 255, dtype=torch.uint8)
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = frames[i]
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet.numpy()).save(path, format="PNG")
    return path
