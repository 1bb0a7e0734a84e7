"""The report's analytic training cost model (section 7.3, equations 1 and 2) beside a measurement.

    python -m training.costmodel --config tiny-cpu [--steps 4] [--ac] [--offload] [key=value ...]
    python -m training.costmodel --config video-lite-mr-10s [--gpus 64] [--seq 93696] [--sp 1]
    python -m training.costmodel --config video-lite      # every Table 4 stage of Video Lite (or video-pro)

Symbols (the report's, section 7.3):

- ``d``: hidden dimension (``model.model_dim``); ``d0 = 1792``, the hidden dimension of the 2B model;
- ``d_t``: time dimension (``model.time_dim``); ``d_f``: feed-forward dimension (``model.ff_dim``);
- ``L``: number of (visual) transformer blocks; ``B``: batch size (clips);
- ``S``: in equation 1 the video "resolution", pixels x latent frames (H x W x T'), with
  ``S0 = 256 x 384 x 31`` (5 s at 24 fps, 256 x 384); here ``S / S0`` is computed as visual tokens
  over the tokens of S0 (T' x H/16 x W/16 = 11,904), the same ratio. In equation 2 ``S`` is the
  sequence length in tokens;
- ``N``: number of GPUs the parameters are sharded over (FSDP);
- ``o``: 0 if activations (the checkpointed block inputs) are offloaded, otherwise 1.

Equation 1, step time (the report gives no unit)::

    Step = d/d0 * S/S0 * (9 + 14 S/S0 + 6 d/d0) * L * B

Equation 2, GPU memory in bytes, with ``P = 9 d_t d + 8 d^2 + 2 d_f d`` the parameters of one block::

    Memory = 12 L P / N + max(4 L P / N, 2 S (L d o + 18 d + 2 d_f))

(12 B per parameter: fp32 master and Adam m, v; 4 B: the fp32 gradient; 2 B per activation value:
bf16; per token, ``L d`` are the checkpointed block inputs and ``18 d + 2 d_f`` one block's
activations during its recompute.)

Beside the report's form (``report``) the module evaluates the same equation for the run this
harness makes (``harness``): the state bytes of its optimizer (fp32 params 4 + AdamW 8, + EMA 4 when
enabled), the gradient bytes (4), the activation bytes of the run's compute dtype (4 in fp32 on the
CPU, 2 in bf16 on CUDA), all the model's parameters (counted on the meta device) rather than L P, the
tokens per sequence-parallel rank ``S / sp``, and, without activation checkpointing, every block's
activations ``L (18 d + 2 d_f)`` instead of ``L d o + 18 d + 2 d_f`` (our extensions).

The measured counterpart (``--measure``, the default for a config whose model is small enough for
this machine, i.e. ``tiny-cpu``) runs a few training steps of the config in this process (one
process: FSDP2 over 1 rank, synthetic data, the loss and optimizer of ``training.train``) and reports
the peak memory (the parameters, gradients, AdamW and EMA state alive at the step's start plus the
peak allocated above it: CUDA allocator, or on the CPU the profiler's allocation events, see
:mod:`training.memory`) and the mean step time (steps after the first), side by side with the
equations; the step time's ratio to equation 1 is the seconds per report unit on this machine.
Video Lite and Pro are evaluated on the meta device only.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time

import torch

from .config import REGISTRY, TrainConfig, apply_overrides, get_config

D0 = 1792
S0_PIXELS = 256 * 384 * 31
S0_TOKENS = 31 * (256 // 16) * (384 // 16)  # 11,904: the same S0 in visual tokens (VAE 8x, patch 2x2)
GIB = 1024 ** 3
FAMILIES = {"video-lite": "video-lite-", "video-pro": "video-pro-"}


def block_params(d: int, d_t: int, d_f: int) -> int:
    """P = 9 d_t d + 8 d^2 + 2 d_f d: one CrossDiT block's weights (modulation 9 d_t d; self- and
    cross-attention q, k, v, o 8 d^2; the MLP 2 d_f d)."""
    return 9 * d_t * d + 8 * d * d + 2 * d_f * d


def step_time(d: int, s_ratio: float, L: int, B: float = 1) -> float:
    """Equation 1 (report units): ``d/d0 * S/S0 * (9 + 14 S/S0 + 6 d/d0) * L * B``."""
    r = d / D0
    return r * s_ratio * (9 + 14 * s_ratio + 6 * r) * L * B


def memory(d: int, d_t: int, d_f: int, L: int, S: float, N: int, o: int, *, params: float | None = None,
           state_bytes: float = 12, grad_bytes: float = 4, act_bytes: float = 2,
           checkpointing: bool = True) -> dict[str, float]:
    """Equation 2 in bytes, by term. The defaults are the report's; ``params`` replaces ``L P``,
    ``checkpointing=False`` puts every block's activations in the activation term (see the module
    docstring)."""
    psi = L * block_params(d, d_t, d_f) if params is None else params
    state = state_bytes * psi / N
    grads = grad_bytes * psi / N
    per_token = (L * d * o + 18 * d + 2 * d_f) if checkpointing else L * (18 * d + 2 * d_f)
    acts = act_bytes * S * per_token
    return {"state": state, "grads": grads, "activations": acts, "total": state + max(grads, acts)}


def tokens_of(cfg: TrainConfig) -> tuple[int, int, int, int]:
    """(tokens, H, W, T') of the largest clip of a stage: its biggest resolution at ``data.t_max``
    latent frames (VAE 8x spatial)."""
    best = max(cfg.data.resolutions, key=lambda k: math.prod(int(p) for p in k.split("x")))
    h, w = (int(p) for p in best.split("x"))
    pt, ph, pw = cfg.model.patch_size
    t = cfg.data.t_max
    return (t // pt) * (h // 8 // ph) * (w // 8 // pw), h, w, t


def num_params(cfg: TrainConfig) -> int:
    from kandinsky_model import CrossDiT

    return CrossDiT.on_meta(cfg.model).num_parameters()


def analytic(cfg: TrainConfig, *, gpus: int, seq: int | None = None, sp: int | None = None,
             batch: float = 1, offload: bool | None = None, act_bytes: float = 2,
             harness: bool = False) -> dict:
    """Both equations for ``cfg`` (the report's form, or the harness's when ``harness``)."""
    m = cfg.model
    sp = cfg.parallel.sp if sp is None else sp
    offload = cfg.parallel.offload if offload is None else offload
    if seq is None:
        seq = tokens_of(cfg)[0]
    o = 0 if offload else 1
    s_ratio = seq / S0_TOKENS
    out = {"d": m.model_dim, "d_t": m.time_dim, "d_f": m.ff_dim, "L": m.num_visual_blocks, "B": batch,
           "S_tokens": seq, "S_ratio": s_ratio, "N": gpus, "sp": sp, "o": o,
           "P_block": block_params(m.model_dim, m.time_dim, m.ff_dim),
           "step_units": step_time(m.model_dim, s_ratio, m.num_visual_blocks, batch)}
    if harness:
        psi = num_params(cfg)
        state = 4 + 8 + (4 if cfg.ema.enabled else 0)
        mem = memory(m.model_dim, m.time_dim, m.ff_dim, m.num_visual_blocks, seq / sp, gpus, o, params=psi,
                     state_bytes=state, grad_bytes=4, act_bytes=act_bytes,
                     checkpointing=cfg.parallel.activation_checkpointing)
        out["params"] = psi
    else:
        mem = memory(m.model_dim, m.time_dim, m.ff_dim, m.num_visual_blocks, seq / sp, gpus, o)
        out["params"] = m.num_visual_blocks * out["P_block"]
    out["memory"] = mem
    return out


# ------------------------------------------------------------------------------------------ measured
def _state_bytes(model, optimizer, ema) -> int:
    """Bytes of distinct storages held by the parameters, the optimizer state and the EMA."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen and st.nbytes():
                seen.add(key)
                total += st.nbytes()
    for p in model.parameters():
        add(p)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    for v in ema.values():
        add(v)
    return total


def measure(cfg: TrainConfig, steps: int = 4) -> dict:
    """Run ``steps`` training steps of ``cfg`` in this process (1 rank) -> peak memory and step times.

    The steps are those of ``training.train`` (synthetic data of the config, FSDP2 over one rank, the
    flow-matching loss, AdamW, EMA); step 1 allocates the optimizer state, steps 2.. are measured."""
    import torch.distributed as dist

    from .data import LatentLoader, write_synthetic
    from .memory import peak_bytes
    from .objective import build_batch, flow_loss
    from .parallelize import ParallelDims, build_mesh, build_sharded_dit, init_distributed, mixed_precision_policy

    if steps < 2:
        raise ValueError(f"--steps must be >= 2 (the first step is not measured), got {steps}")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    own_group = not dist.is_initialized()
    init_distributed(device_type)
    try:
        mesh = build_mesh(device_type, ParallelDims.from_config(cfg.parallel, dist.get_world_size(),
                                                               cfg.model.num_heads))
        mp_policy = mixed_precision_policy(cfg.mixed_precision, device_type)
        dtype = torch.float32 if mp_policy is None else mp_policy.param_dtype
        model = build_sharded_dit(cfg.model, mesh, mp_policy, device, cfg.seed,
                                  activation_checkpointing=cfg.parallel.activation_checkpointing,
                                  offload=cfg.parallel.offload)
        o = cfg.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                      weight_decay=o.weight_decay)
        ema = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg.ema.enabled else {}
        names = list(ema)
        ema_params = [dict(model.named_parameters())[n] for n in names]
        with tempfile.TemporaryDirectory(prefix="kk_costmodel_") as tmp:
            write_synthetic(tmp, cfg.model, cfg.synthetic, seed=cfg.data.seed)
            loader = LatentLoader(tmp, t_max=cfg.data.t_max, seed=cfg.data.seed, rank=0, world=1, prefetch=0,
                                  pack=cfg.data.pack)
            rows = []
            try:
                for i in range(steps):
                    gid, samples = loader.next()
                    fb = build_batch(samples, gid, cfg.data, cfg.flow, visual_cond=cfg.model.visual_cond,
                                     null_text=loader.null_text, patch=cfg.model.patch_size,
                                     pack=cfg.data.pack).to(device, dtype)
                    optimizer.zero_grad(set_to_none=True)
                    base = _state_bytes(model, optimizer, ema)

                    def one_step():
                        loss = flow_loss(model, fb, cfg.data.rope_scale)
                        loss.backward()
                        optimizer.step()
                        if ema:
                            with torch.no_grad():
                                torch._foreach_lerp_([ema[n] for n in names], [p.detach() for p in ema_params],
                                                     1.0 - cfg.ema.decay)
                    if i == 0:
                        one_step()  # allocates the AdamW state
                        continue
                    t0 = time.perf_counter()
                    one_step()
                    if device_type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    optimizer.zero_grad(set_to_none=True)
                    peak = peak_bytes(one_step, device)  # the same batch again, for the memory
                    rows.append({"tokens": fb.tokens, "clips": len(samples), "step_s": dt,
                                 "state_bytes": base, "peak_above_bytes": peak, "peak_bytes": base + peak})
            finally:
                loader.close()
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
    return {"device": device_type, "dtype": str(dtype).replace("torch.", ""), "rows": rows,
            "peak_bytes": max(r["peak_bytes"] for r in rows),
            "step_s": sum(r["step_s"] for r in rows) / len(rows),
            "tokens": max(r["tokens"] for r in rows)}


def compare(cfg: TrainConfig, steps: int = 4) -> dict:
    """Measure ``cfg`` and evaluate the harness form of both equations for the measured batches:
    the memory at the largest batch's tokens, the step time summed over the steps' clips."""
    meas = measure(cfg, steps)
    act_bytes = 4 if meas["dtype"] == "float32" else 2
    est = analytic(cfg, gpus=1, seq=meas["tokens"], act_bytes=act_bytes, harness=True)
    units = [step_time(cfg.model.model_dim, (r["tokens"] / r["clips"]) / S0_TOKENS, cfg.model.num_visual_blocks,
                       r["clips"]) for r in meas["rows"]]
    s_per_unit = sum(r["step_s"] for r in meas["rows"]) / sum(units)
    return {"measured": meas, "estimate": est, "step_units_mean": sum(units) / len(units),
            "seconds_per_unit": s_per_unit,
            "memory_ratio": est["memory"]["total"] / meas["peak_bytes"]}


# ----------------------------------------------------------------------------------------------- CLI
def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:.2f} MiB"


def _print_analytic(name: str, a: dict) -> None:
    mem = a["memory"]
    print(f"{name}: d={a['d']} d_t={a['d_t']} d_f={a['d_f']} L={a['L']} B={a['B']:g} S={a['S_tokens']} tokens "
          f"(S/S0={a['S_ratio']:.3f}) N={a['N']} sp={a['sp']} o={a['o']}")
    print(f"  eq 1 step time: {a['step_units']:.5g} (report units)")
    print(f"  eq 2 memory per GPU: {_fmt_bytes(mem['total'])} = state {_fmt_bytes(mem['state'])} + "
          f"max(grads {_fmt_bytes(mem['grads'])}, activations {_fmt_bytes(mem['activations'])})")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m training.costmodel", description="the report's equations 1 "
                                "and 2 (step time, memory) and, for a small config, a measured run beside them")
    p.add_argument("--config", required=True, help=f"a registered config or a family ({', '.join(FAMILIES)})")
    p.add_argument("--gpus", type=int, default=None, help="N: GPUs sharding the parameters (default 64; 1 "
                   "for a measured config)")
    p.add_argument("--seq", type=int, default=None, help="S in visual tokens (default: the stage's largest "
                   "resolution at data.t_max frames; the measured batches for a measured run)")
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (S per rank = S / sp)")
    p.add_argument("--batch", type=float, default=1, help="B in equation 1")
    p.add_argument("--offload", action="store_true", help="o = 0 (and the measured run offloads)")
    p.add_argument("--ac", action="store_true", help="measured run with activation checkpointing")
    p.add_argument("--steps", type=int, default=4, help="steps of the measured run (first one not measured)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                   help="run the config here (default: only tiny-cpu)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_intermixed_args(argv)
    if args.config in FAMILIES:
        names = [n for n in REGISTRY if n.startswith(FAMILIES[args.config])]
    elif args.config in REGISTRY:
        names = [args.config]
    else:
        p.error(f"unknown config {args.config!r}; choose one of {sorted(REGISTRY) + sorted(FAMILIES)}")
    extra = list(args.overrides)
    if args.ac or args.offload:
        extra.append("parallel.activation_checkpointing=True")
    if args.offload:
        extra.append("parallel.offload=True")
    if args.sp is not None:
        extra.append(f"parallel.sp={args.sp}")
    out = {}
    for name in names:
        cfg = apply_overrides(get_config(name), extra)
        measure_it = args.measure if args.measure is not None else name == "tiny-cpu"
        if not measure_it:
            a = analytic(cfg, gpus=args.gpus or 64, seq=args.seq, batch=args.batch)
            _print_analytic(f"{name} (report form)", a)
            out[name] = {"report": a}
            continue
        if args.sp not in (None, 1):
            p.error("the measured run is one process: use --no-measure with --sp")
        c = compare(cfg, args.steps)
        est, meas = c["estimate"], c["measured"]
        _print_analytic(f"{name} (harness form, {meas['dtype']} on {meas['device']})", est)
        rep = analytic(cfg, gpus=args.gpus or 1, seq=meas["tokens"], batch=args.batch)
        _print_analytic(f"{name} (report form)", rep)
        print(f"  measured on this machine ({meas['device']}, {len(meas['rows'])} steps after the first, "
              f"1 process): peak {_fmt_bytes(meas['peak_bytes'])} (state "
              f"{_fmt_bytes(meas['rows'][0]['state_bytes'])} + "
              f"{_fmt_bytes(max(r['peak_above_bytes'] for r in meas['rows']))} above it), "
              f"step {meas['step_s'] * 1e3:.1f} ms")
        print(f"  side by side: memory eq 2 {_fmt_bytes(est['memory']['total'])} vs measured "
              f"{_fmt_bytes(meas['peak_bytes'])} (ratio {c['memory_ratio']:.2f}); step time eq 1 "
              f"{c['step_units_mean']:.4f} units vs measured {meas['step_s'] * 1e3:.1f} ms "
              f"({c['seconds_per_unit'] * 1e3:.1f} ms per unit here)")
        out[name] = {"report": rep, **c}
    return out


if __name__ == "__main__":
    main()
