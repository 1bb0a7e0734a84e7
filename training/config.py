"""Typed, self-validating training configs, a registry of named runs and ``key=value`` overrides.

Every section is a ``kw_only`` + ``slots`` dataclass that checks itself in ``__post_init__`` and
raises ``ValueError`` naming the field. :func:`get_config` returns a registered run
(``tiny-cpu``, the Video Lite and Video Pro stages of the report's Table 4);
:func:`apply_overrides` takes dotted ``key=value`` strings (``optim.lr=3e-4``,
``model.num_visual_blocks=4``, ``data.t_max=8``) and re-validates.

``python -m training.config NAME [--world N]`` builds the model on the meta device and prints a
memory estimate (fp32 params, grads, AdamW m and v, EMA; per rank under FSDP with N ranks).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from kandinsky_model import CrossDiTConfig, preset

TASKS = ("t2i", "t2v", "i2v")
VAE_STRIDE = 8
"""Pixels per latent cell of the video and image VAEs (``data.resolutions`` are in pixels)."""


def _num(name: str, v: Any, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, integer: bool = False) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'}, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v!r}")
    return v if integer else float(v)


def _choice(name: str, v: Any, choices: tuple) -> Any:
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


def _probs(name: str, v: Any, keys: tuple | None = None) -> dict:
    if not isinstance(v, dict) or not v:
        raise ValueError(f"{name} must be a non-empty dict of probabilities, got {v!r}")
    if keys is not None and set(v) - set(keys):
        raise ValueError(f"{name} has unknown keys {sorted(set(v) - set(keys))}; allowed: {keys}")
    out = {k: _num(f"{name}[{k!r}]", p, lo=0.0, hi=1.0) for k, p in v.items()}
    if abs(sum(out.values()) - 1.0) > 1e-3:
        raise ValueError(f"{name} must sum to 1, got {sum(out.values())} from {v}")
    return out


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (after warmup)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (report 6.3.2)."""
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per rank)."""

    def __post_init__(self) -> None:
        self.lr = _num("optim.lr", self.lr, lo=0.0, lo_open=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(_num("optim.betas", b, lo=0.0, hi=0.999999) for b in self.betas)
        self.eps = _num("optim.eps", self.eps, lo=0.0, lo_open=True)
        self.weight_decay = _num("optim.weight_decay", self.weight_decay, lo=0.0)
        self.grad_clip = _num("optim.grad_clip", self.grad_clip, lo=0.0)
        _num("optim.grad_accum", self.grad_accum, lo=1, integer=True)


@dataclass(kw_only=True, slots=True)
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak lr over this many optimizer steps."""
    kind: str = "constant"
    """After warmup: ``constant`` or ``cosine`` (down to ``min_lr_ratio * lr`` at ``total_steps``)."""
    total_steps: int = 0
    """Length of the cosine schedule (0: the run's max_steps; set it when a resumed run may be given
    another --max-steps, or the cosine changes shape on resume)."""
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _num("schedule.warmup_steps", self.warmup_steps, lo=0, integer=True)
        _choice("schedule.kind", self.kind, ("constant", "cosine"))
        _num("schedule.total_steps", self.total_steps, lo=0, integer=True)
        self.min_lr_ratio = _num("schedule.min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)

    def factor(self, step: int, max_steps: int) -> float:
        """lr multiplier for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        total = self.total_steps or max_steps
        span = max(1, total - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


@dataclass(kw_only=True, slots=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    """ema <- decay * ema + (1 - decay) * param after every optimizer step (report 6.3.2)."""

    def __post_init__(self) -> None:
        _bool("ema.enabled", self.enabled)
        self.decay = _num("ema.decay", self.decay, lo=0.0, hi=1.0)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    t_max: int = 8
    """Frame budget of one batch: clips of one bucket are taken while the sum of latent frames <= t_max."""
    pack: bool = True
    """Pack clips of one aspect ratio (any lengths) into one sequence along T, as the report trains:
    buckets per (image or video, H, W), the model gets ``cu_frames`` and keeps the videos apart.
    False: buckets per exact latent shape, clips stacked along the batch dimension."""
    resolutions: dict | str = "data"
    """Pixel resolution ``"HxW"`` -> probability that a batch is drawn from the clips of that size
    (report Table 4; latents are 8x smaller, so ``"512x768"`` selects 64 x 96 latents). Every listed
    size must occur in the data and every size in the data must be listed. ``"data"``: no weights,
    each epoch takes every clip once (sizes as frequent as in the data)."""
    task_probs: dict = field(default_factory=lambda: {"t2i": 0.0, "t2v": 1.0, "i2v": 0.0})
    """Probabilities of T2I / T2V / I2V for video batches (image batches are always T2I; a T2I video
    batch uses each clip's first latent frame). I2V needs a ``visual_cond`` model."""
    null_text_prob: float = 0.1
    """Probability that a sample's text is replaced by the null (empty-caption) embedding."""
    seed: int = 0
    """Seed of the shuffling (per epoch), noise, timesteps, dropout and task choice."""
    prefetch: int = 2
    """Batches read ahead: by a background thread, or per worker process with ``workers > 0``
    (0: read in the training thread)."""
    workers: int = 0
    """DataLoader worker processes per rank reading shards (0: the prefetch thread); each reads every
    n-th batch of its rank, handed out in order, so batches and resume are the same for any count."""
    rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """RoPE position divisor given to the model ((1, 2, 2) for 512 px video, (1, 3.16, 3.16) at 1024)."""

    def __post_init__(self) -> None:
        _num("data.t_max", self.t_max, lo=1, integer=True)
        if not isinstance(self.pack, bool):
            raise ValueError(f"data.pack must be true or false, got {self.pack!r}")
        if self.resolutions != "data":
            if isinstance(self.resolutions, str):
                raise ValueError(f"data.resolutions must be 'data' or a dict {{'HxW': probability}}, "
                                 f"got {self.resolutions!r}")
            self.resolutions = _probs("data.resolutions", self.resolutions)
            for k in self.resolutions:
                parts = str(k).split("x")
                if (len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts)
                        or any(int(p) % VAE_STRIDE for p in parts)):
                    raise ValueError(f"data.resolutions keys must be pixel sizes 'HxW', multiples of "
                                     f"{VAE_STRIDE} (e.g. '512x768'), got {k!r}")
        self.task_probs = _probs("data.task_probs", self.task_probs, TASKS)
        self.null_text_prob = _num("data.null_text_prob", self.null_text_prob, lo=0.0, hi=1.0)
        _num("data.seed", self.seed, lo=0, integer=True)
        _num("data.prefetch", self.prefetch, lo=0, integer=True)
        _num("data.workers", self.workers, lo=0, integer=True)
        if not isinstance(self.rope_scale, (tuple, list)) or len(self.rope_scale) != 3:
            raise ValueError(f"data.rope_scale must be 3 positive numbers, got {self.rope_scale!r}")
        self.rope_scale = tuple(_num("data.rope_scale", r, lo=0.0, lo_open=True) for r in self.rope_scale)


@dataclass(kw_only=True, slots=True)
class FlowConfig:
    timesteps: str = "logit_normal"
    """Distribution of t in (0, 1): ``logit_normal`` (t = sigmoid(N(mean, std)), SD3) or ``uniform``.
    The report and the official code do not state theirs; the sampled t is then shifted with the
    inference formula t <- s t / (1 + (s - 1) t)."""
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        _choice("flow.timesteps", self.timesteps, ("logit_normal", "uniform"))
        self.mean = _num("flow.mean", self.mean)
        self.std = _num("flow.std", self.std, lo=0.0, lo_open=True)
        self.shift = _num("flow.shift", self.shift, lo=0.0, lo_open=True)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 100
    """Save every this many optimizer steps (and at the last step); 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    async_save: bool = True
    """DCP ``async_save``: a step waits for staging only."""
    export_ema: bool = True
    """At the end, write the EMA weights in the ``CrossDiT.from_pretrained`` folder format."""

    def __post_init__(self) -> None:
        _num("checkpoint.every", self.every, lo=0, integer=True)
        _num("checkpoint.keep_last", self.keep_last, lo=1, integer=True)
        _bool("checkpoint.async_save", self.async_save)
        _bool("checkpoint.export_ema", self.export_ema)


@dataclass(kw_only=True, slots=True)
class LogConfig:
    every: int = 1
    """Write a metrics line every this many steps."""
    progress: bool = True
    """tqdm bar on rank 0."""
    plot: bool = True
    """PNG loss curve at the end (when matplotlib imports)."""

    def __post_init__(self) -> None:
        _num("log.every", self.every, lo=1, integer=True)
        _bool("log.progress", self.progress)
        _bool("log.plot", self.plot)


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the ranks are laid out: a ``(replicate, shard, sp)`` DeviceMesh with
    ``replicate x shard x sp = world size`` (``shard`` is what is left; see
    ``training.parallelize.ParallelDims``)."""

    sp: int = 1
    """Ulysses sequence-parallel degree: each of ``sp`` ranks holds 1/sp of the visual tokens of the
    same batch; it must divide the heads and, per batch, the token count. ``--sp N`` on the CLI."""
    replicate: int = 1
    """HSDP replica groups (parameters replicated across them, sharded within); 1: plain FSDP."""
    activation_checkpointing: bool = False
    """Recompute each CrossDiT block in backward (non-reentrant), saving only the block input and
    the outputs of the sequence-parallel all-to-alls, so the recompute never communicates again."""
    offload: bool = False
    """Move each checkpointed block's input to host memory between forward and backward (side stream,
    pinned buffers, prefetched one block ahead in backward; ``training.offload``). Needs
    ``activation_checkpointing`` (checked when the model is parallelized, so overrides may come in
    any order)."""

    def __post_init__(self) -> None:
        _num("parallel.sp", self.sp, lo=1, integer=True)
        _num("parallel.replicate", self.replicate, lo=1, integer=True)
        _bool("parallel.activation_checkpointing", self.activation_checkpointing)
        _bool("parallel.offload", self.offload)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    name: str
    model: CrossDiTConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to it)."""
    seed: int = 0
    """Seed of the model initialisation."""
    mixed_precision: str = "auto"
    """``auto`` (bf16 params + fp32 reduce on CUDA, fp32 on CPU), ``bf16`` or ``fp32``."""
    global_batch: int = 0
    """Table 4 batch size, for the record; the step batch is set by t_max x ranks x grad_accum."""
    synthetic: dict = field(default_factory=dict)
    """When no --data is given: {"samples": N, "shapes": [[T, H, W], ...], "text_len": [lo, hi]}."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for fname, typ in (("model", CrossDiTConfig), ("optim", OptimConfig), ("schedule", ScheduleConfig),
                           ("ema", EMAConfig), ("data", DataConfig), ("flow", FlowConfig),
                           ("checkpoint", CheckpointConfig), ("log", LogConfig),
                           ("parallel", ParallelConfig)):
            if not isinstance(getattr(self, fname), typ):
                got = type(getattr(self, fname)).__name__
                raise ValueError(f"{fname} must be a {typ.__name__}, got {got}")
        _num("max_steps", self.max_steps, lo=1, integer=True)
        _num("seed", self.seed, lo=0, integer=True)
        _choice("mixed_precision", self.mixed_precision, ("auto", "bf16", "fp32"))
        _num("global_batch", self.global_batch, lo=0, integer=True)
        if not isinstance(self.synthetic, dict):
            raise ValueError(f"synthetic must be a dict, got {self.synthetic!r}")
        if self.model.num_heads % self.parallel.sp:
            raise ValueError(f"parallel.sp = {self.parallel.sp} must divide the model's "
                             f"{self.model.num_heads} attention heads (Ulysses splits heads over sp ranks)")
        if self.data.task_probs.get("i2v", 0.0) > 0 and not self.model.visual_cond:
            raise ValueError("data.task_probs['i2v'] > 0 needs a model with visual_cond=True "
                             "(set model.visual_cond=True or data.task_probs)")


# ------------------------------------------------------------------------------------------ registry
LITE_TASKS = {"t2i": 0.01, "t2v": 0.79, "i2v": 0.20}  # report 6.2
PRO_TASKS = {"t2i": 0.02, "t2v": 0.77, "i2v": 0.21}
LR_RES = {"256x256": 0.25, "256x384": 0.22, "384x256": 0.53}
MR_RES = {"512x512": 0.28, "512x768": 0.25, "768x512": 0.47}
HR_RES = {"1024x1024": 0.183, "1408x640": 0.017, "640x1408": 0.01, "1280x768": 0.315,
          "768x1280": 0.115, "1152x896": 0.175, "896x1152": 0.185}
# latent frames of 5 s / 10 s clips at 24 fps with the 4x temporal VAE: (24 * 5) / 4 + 1
FRAMES_5S, FRAMES_10S = 31, 61
SD_ROPE, HD_ROPE = (1.0, 2.0, 2.0), (1.0, 3.16, 3.16)


def _tiny_cpu() -> TrainConfig:
    return TrainConfig(
        name="tiny-cpu",
        model=preset("tiny", visual_cond=True),
        optim=OptimConfig(lr=1e-3),
        schedule=ScheduleConfig(warmup_steps=2),
        ema=EMAConfig(decay=0.99),
        data=DataConfig(t_max=6, resolutions={"64x64": 0.5, "64x96": 0.3, "96x64": 0.2},
                        task_probs={"t2i": 0.1, "t2v": 0.6, "i2v": 0.3}),
        checkpoint=CheckpointConfig(every=5, keep_last=2),
        max_steps=20,
        # clips of several lengths per aspect ratio, so batches pack unequal clips (cu_frames)
        synthetic={"samples": 24, "shapes": [[1, 8, 8], [3, 8, 8], [1, 8, 12], [2, 8, 8], [5, 8, 12],
                                             [2, 12, 8], [2, 8, 12], [3, 12, 8]],
                   "text_len": [3, 8]},
    )


def _stage(name, model_fn, steps, batch, lr, wd, res, tasks, frames, rope) -> Callable[[], TrainConfig]:
    def make() -> TrainConfig:
        return TrainConfig(
            name=name, model=model_fn(), max_steps=steps, global_batch=batch,
            optim=OptimConfig(lr=lr, weight_decay=wd),
            schedule=ScheduleConfig(warmup_steps=1000),
            data=DataConfig(t_max=frames, resolutions=res, task_probs=tasks, rope_scale=rope),
            checkpoint=CheckpointConfig(every=1000, keep_last=3),
        )
    return make


def _lite():
    return preset("video_lite")


def _pro():
    return preset("video_pro")


T2I = {"t2i": 1.0, "t2v": 0.0, "i2v": 0.0}
REGISTRY: dict[str, Callable[[], TrainConfig]] = {
    "tiny-cpu": _tiny_cpu,
    # Table 4, Video Lite
    "video-lite-t2i-lr": _stage("video-lite-t2i-lr", _lite, 220_000, 8192, 1e-4, 0.0, LR_RES, T2I, 1,
                                (1.0, 1.0, 1.0)),
    "video-lite-lr": _stage("video-lite-lr", _lite, 10_000, 2662, 6e-5, 0.001, LR_RES, LITE_TASKS,
                            FRAMES_5S, (1.0, 1.0, 1.0)),
    "video-lite-mr-5s": _stage("video-lite-mr-5s", _lite, 50_000, 1331, 3e-5, 0.001, MR_RES, LITE_TASKS,
                               FRAMES_5S, SD_ROPE),
    "video-lite-mr-10s": _stage("video-lite-mr-10s", _lite, 10_000, 665, 3e-5, 0.001, MR_RES, LITE_TASKS,
                                FRAMES_10S, SD_ROPE),
    # Table 4, Video Pro
    "video-pro-t2i-lr": _stage("video-pro-t2i-lr", _pro, 200_000, 16384, 1e-4, 0.0, LR_RES, T2I, 1,
                               (1.0, 1.0, 1.0)),
    "video-pro-lr": _stage("video-pro-lr", _pro, 200_000, 2662, 1e-4, 0.0, LR_RES, PRO_TASKS, FRAMES_5S,
                           (1.0, 1.0, 1.0)),
    "video-pro-mr": _stage("video-pro-mr", _pro, 45_000, 1331, 3e-5, 0.001, MR_RES, PRO_TASKS, FRAMES_5S,
                           SD_ROPE),
    "video-pro-hr-5s": _stage("video-pro-hr-5s", _pro, 22_500, 665, 2e-5, 0.001, HR_RES, PRO_TASKS,
                              FRAMES_5S, HD_ROPE),
    "video-pro-hr-10s": _stage("video-pro-hr-10s", _pro, 10_000, 333, 2e-5, 0.001, HR_RES, PRO_TASKS,
                               FRAMES_10S, HD_ROPE),
}


def get_config(name: str) -> TrainConfig:
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(REGISTRY)}") from None


# ----------------------------------------------------------------------------------------- overrides
def _parse_value(key: str, text: str, current: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string
    if current is None or isinstance(current, str):
        if value is None or isinstance(value, str):
            return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return tuple(value)
    elif isinstance(current, dict):
        if isinstance(value, (dict, str)):  # a string for fields that take one too (each field checks)
            return value
    else:
        return value
    raise ValueError(f"override {key}={text}: expected a value like {current!r} "
                     f"({type(current).__name__}), got {text!r}")


def _set(obj: Any, path: list[str], text: str, full: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    head = path[0]
    if head not in names:
        raise ValueError(f"unknown config key {full!r}: {type(obj).__name__} has no field {head!r} "
                         f"(fields: {', '.join(names)})")
    current = getattr(obj, head)
    if len(path) == 1:
        if dataclasses.is_dataclass(current):
            raise ValueError(f"config key {full!r} is a section; set one of its fields ({full}.FIELD=...)")
        new = _parse_value(full, text, current)
    else:
        if dataclasses.is_dataclass(current):
            new = _set(current, path[1:], text, full)
        elif isinstance(current, dict) and len(path) == 2:
            old = current.get(path[1], 0.0)
            new = {**current, path[1]: _parse_value(full, text, old)}
        else:
            raise ValueError(f"unknown config key {full!r}: {head!r} has no field {path[1]!r}")
    try:
        return dataclasses.replace(obj, **{head: new})
    except (TypeError, ValueError) as e:
        raise ValueError(f"override {full}={text}: {e}") from e


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``["optim.lr=3e-4", "model.num_visual_blocks=4"]`` -> a new, re-validated config.

    Raises ValueError on a malformed item, an unknown key or a bad value, naming it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (dotted key)")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        cfg = _set(cfg, key.split("."), text.strip(), key)
    return cfg


# ------------------------------------------------------------------------------------ memory estimate
def memory_estimate(cfg: TrainConfig, world_size: int = 1) -> dict[str, float]:
    """Build the model on the meta device; bytes of the static training state in GiB.

    fp32 master params (4 B), fp32 grads (4 B), AdamW m and v (8 B), EMA (4 B, if enabled): 20 B per
    parameter, divided by ``world_size`` under FSDP (activations and FSDP buffers not counted)."""
    from kandinsky_model import CrossDiT

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    model = CrossDiT.on_meta(cfg.model)
    n = model.num_parameters()
    gib = 1024 ** 3
    parts = {"params": 4 * n, "grads": 4 * n, "adamw": 8 * n, "ema": 4 * n if cfg.ema.enabled else 0}
    out = {"num_params": float(n), "world_size": float(world_size)}
    out.update({f"{k}_gib": v / gib for k, v in parts.items()})
    out["total_gib"] = sum(parts.values()) / gib
    out["per_rank_gib"] = out["total_gib"] / world_size
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.config", description="print a training config "
                                "and its memory estimate")
    p.add_argument("name", choices=sorted(REGISTRY))
    p.add_argument("--world", type=int, default=64, help="FSDP ranks for the per-rank figure")
    p.add_argument("overrides", nargs="*", help="key=value (dotted keys)")
    args = p.parse_intermixed_args(argv)
    cfg = apply_overrides(get_config(args.name), args.overrides)
    est = memory_estimate(cfg, args.world)
    print(cfg)
    print(f"{cfg.name}: {est['num_params'] / 1e9:.3f} B params; params {est['params_gib']:.2f} GiB, grads "
          f"{est['grads_gib']:.2f} GiB, AdamW {est['adamw_gib']:.2f} GiB, EMA {est['ema_gib']:.2f} GiB; "
          f"total "
          f"{est['total_gib']:.2f} GiB, {est['per_rank_gib']:.3f} GiB per rank over {args.world} FSDP ranks")
    return est


if __name__ == "__main__":
    main()
