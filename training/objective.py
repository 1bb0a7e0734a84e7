"""Flow-matching objective of the official code, task mixing and null-text dropout.

For clean latents x0 (B, T, H, W, C), noise eps ~ N(0, I) and t in (0, 1):

    x_t = (1 - t) x0 + t eps,   target v = eps - x0,   the model sees 1000 t,
    loss = mean over the loss frames of (model(x_t) - v)^2.

This is the convention of the official sampler (t = 1 is pure noise; ``kandinsky_model.sampler``).
Timesteps: the report and the official code do not state the training distribution; default
``logit_normal`` (t = sigmoid(N(mean, std)), SD3), or ``uniform``, then the inference shift
t <- s t / (1 + (s - 1) t) (``flow.shift``, 1 = none).

Tasks (per batch): image batches (T = 1) are T2I. Video batches draw T2I / T2V / I2V with
``data.task_probs``; T2I keeps each clip's first latent frame (an image latent of the causal VAE).
With a ``visual_cond`` model the input is [x_t | cond | mask] (2C + 1 channels) as in the official
sampler: cond channels zero, mask 1 on the clean frame. I2V: frame 0 of x_t is the clean x0 frame,
mask 1 there, and the loss skips frame 0. Null text: each sample's text and pooled vector are replaced
with the dataset's null (empty-caption) embedding with probability ``data.null_text_prob`` (a zero
one-token embedding when the dataset has none).

Packed batches (``data.pack``, the default): the n clips of a batch (one aspect ratio, any lengths,
sum of latent frames <= t_max) are concatenated along T into one sample (1, sum T_i, H, W, C) with
``cu_frames``; each clip has its own t, text and null-text draw, and the model keeps the clips apart.
I2V keeps every clip's first frame clean and out of the loss; T2I uses every clip's first frame. The
loss is the mean over all loss frames' elements, so a clip weighs by its length (every token alike).

All randomness of a batch comes from one generator seeded by (data.seed, global batch id), drawn in
this order: task u ~ U(0,1); drop (B,) ~ U(0,1); t (B,); eps (shape of the used x0; packed: of the
packed x0). So a batch is the same whatever the rank count, accumulation or resume point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kandinsky_model import pack_text

from .config import TASKS, DataConfig, FlowConfig


@dataclass
class FlowBatch:
    x: torch.Tensor          # (B, T, H, W, C_in) model input
    target: torch.Tensor     # (B, T, H, W, C) eps - x0
    loss_frames: torch.Tensor  # (T,) bool, frames in the loss
    timestep: torch.Tensor   # (B,) 1000 t
    t: torch.Tensor          # (B,) t
    text: torch.Tensor       # (B, L, D)
    text_mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor     # (B, D2)
    task: str
    tokens: int              # visual tokens (after the patch) in the batch
    cu_frames: list[int] | None = None
    """Packed: latent-frame offsets of the n clips along T (x is (1, sum T_i, ...), timestep, text and
    pooled have n rows); None: clips stacked along B."""

    def to(self, device, dtype) -> "FlowBatch":
        return FlowBatch(self.x.to(device, dtype), self.target.to(device), self.loss_frames.to(device),
                         self.timestep.to(device), self.t, self.text.to(device, dtype),
                         self.text_mask.to(device), self.pooled.to(device, dtype), self.task, self.tokens,
                         self.cu_frames)


def batch_generator(seed: int, gid: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + gid * 7919 + 12345) % (2 ** 63))


def sample_t(flow: FlowConfig, n: int, g: torch.Generator) -> torch.Tensor:
    if flow.timesteps == "uniform":
        t = torch.rand(n, generator=g, dtype=torch.float64)
    else:
        t = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64) * flow.std + flow.mean)
    s = flow.shift
    t = s * t / (1 + (s - 1) * t)
    return t.clamp(1e-5, 1 - 1e-5).float()


def choose_task(u: float, frames: int, probs: dict) -> str:
    if frames == 1:
        return "t2i"
    acc = 0.0
    for task in TASKS:
        acc += probs.get(task, 0.0)
        if u < acc:
            return task
    return "t2v"


def build_batch(samples: list[dict], gid: int, data: DataConfig, flow: FlowConfig, *, visual_cond: bool,
                null_text: tuple[torch.Tensor, torch.Tensor] | None, patch=(1, 2, 2),
                pack: bool = False) -> FlowBatch:
    if pack:
        return _build_packed(samples, gid, data, flow, visual_cond=visual_cond, null_text=null_text, patch=patch)
    g = batch_generator(data.seed, gid)
    x0 = torch.stack([s["latent"].float() for s in samples])
    b = x0.shape[0]
    task = choose_task(float(torch.rand(1, generator=g)), x0.shape[1], data.task_probs)
    if task == "i2v" and not visual_cond:
        raise ValueError("an I2V batch needs a visual_cond model")
    drop = torch.rand(b, generator=g) < data.null_text_prob
    t = sample_t(flow, b, g)
    if task == "t2i":
        x0 = x0[:, :1]
    eps = torch.randn(x0.shape, generator=g)
    tb = t.view(b, 1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    target = eps - x0
    frames = x0.shape[1]
    loss_frames = torch.ones(frames, dtype=torch.bool)
    if visual_cond:
        mask = torch.zeros(*x0.shape[:4], 1)
        if task == "i2v":
            xt[:, 0] = x0[:, 0]
            mask[:, 0] = 1.0
            loss_frames[0] = False
        x = torch.cat([xt, torch.zeros_like(xt), mask], dim=-1)
    else:
        x = xt
    text, text_mask, pooled = _texts(samples, drop, null_text)
    tokens = b * (frames // patch[0]) * (x0.shape[2] // patch[1]) * (x0.shape[3] // patch[2])
    return FlowBatch(x, target, loss_frames, 1000.0 * t, t, text, text_mask, pooled, task, tokens)


def _texts(samples, drop, null_text):
    """(text (n, L, D) right-padded, text_mask (n, L), pooled (n, D2)) with the dropped ones null."""
    if null_text is None:
        d, d2 = samples[0]["text"].shape[1], samples[0]["pooled"].shape[0]
        null_text = (torch.zeros(1, d), torch.zeros(d2))
    texts, pooled = [], []
    for s, dropped in zip(samples, drop.tolist()):
        texts.append((null_text[0] if dropped else s["text"]).float())
        pooled.append((null_text[1] if dropped else s["pooled"]).float())
    text, text_mask = pack_text(texts)
    return text, text_mask, torch.stack(pooled)


def _build_packed(samples, gid, data, flow, *, visual_cond, null_text, patch) -> FlowBatch:
    g = batch_generator(data.seed, gid)
    clips = [s["latent"].float() for s in samples]
    n = len(clips)
    if len({c.shape[1:] for c in clips}) != 1:
        raise ValueError(f"a packed batch needs clips of one (H, W, C), got {[tuple(c.shape) for c in clips]}")
    task = choose_task(float(torch.rand(1, generator=g)), min(c.shape[0] for c in clips), data.task_probs)
    if task == "i2v" and not visual_cond:
        raise ValueError("an I2V batch needs a visual_cond model")
    drop = torch.rand(n, generator=g) < data.null_text_prob
    t = sample_t(flow, n, g)
    if task == "t2i":
        clips = [c[:1] for c in clips]
    lengths = [c.shape[0] for c in clips]
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    x0 = torch.cat(clips)[None]  # (1, sum T_i, H, W, C)
    eps = torch.randn(x0.shape, generator=g)
    tf = torch.repeat_interleave(t, torch.tensor(lengths)).view(1, -1, 1, 1, 1)  # t per frame
    xt = (1 - tf) * x0 + tf * eps
    target = eps - x0
    loss_frames = torch.ones(cu[-1], dtype=torch.bool)
    firsts = torch.tensor(cu[:-1])
    if visual_cond:
        mask = torch.zeros(*x0.shape[:4], 1)
        if task == "i2v":
            xt[:, firsts] = x0[:, firsts]
            mask[:, firsts] = 1.0
            loss_frames[firsts] = False
        x = torch.cat([xt, torch.zeros_like(xt), mask], dim=-1)
    else:
        x = xt
    text, text_mask, pooled = _texts(samples, drop, null_text)
    tokens = (cu[-1] // patch[0]) * (x0.shape[2] // patch[1]) * (x0.shape[3] // patch[2])
    return FlowBatch(x, target, loss_frames, 1000.0 * t, t, text, text_mask, pooled, task, tokens, cu)


def flow_loss(model, fb: FlowBatch, rope_scale=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Mean squared error of the velocity over the loss frames (fp32)."""
    kwargs = {} if fb.cu_frames is None else {"cu_frames": fb.cu_frames}
    pred = model(fb.x, fb.text, fb.pooled, fb.timestep, fb.text_mask, rope_scale, **kwargs)
    err = (pred.float() - fb.target.float()) ** 2
    return err[:, fb.loss_frames].mean()
