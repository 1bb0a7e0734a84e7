"""GPU timing of the Triton block-sparse attention kernels against dense SDPA (flash) and compiled Flex.

Run by ``scripts/gpu_check.sh`` on an H200; standalone:

    python3 benchmarks/gpu_timing.py --out-dir /tmp/out --budget-s 200

For each model shape (Kandinsky Lite: H=28, D=64; Pro: H=32, D=128; both S=93,696, the 10 s 512x768
video; bf16, B=1) and each block density (10 % for every model first: the goals' density) it
times forward and forward+backward of: our kernels (launchers called directly; the backward includes the
mask transpose, as the public op does), ``torch.compile(flex_attention)`` with the identical mask as a
Flex ``BlockMask`` (full blocks, 64x64 tiles; built outside the timing), and dense
``F.scaled_dot_product_attention`` on the flash backend (once per shape). Our forward+backward is timed
with both Triton backward schemes: ``ours`` (two_pass, the default) and ``ours-atomic``. Times are
medians from ``triton.testing.do_bench`` in ms. Every result is appended to the JSON as soon as it
exists, so a run stopped by its time budget still leaves what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BS = 64
MODELS = {"lite": (28, 64), "pro": (32, 128)}
# Flex's sm90 default tiles (128) do not divide 64-token blocks and raise; use 64 tiles (its generic
# default), and smaller ones only if those fail to compile.
FLEX_OPTS = (
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 64},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
)
_flex_choice: dict = {}  # key -> index into FLEX_OPTS, or the error text when every entry failed


def _flex_call(key, fn):
    """fn(kernel_options) with the first FLEX_OPTS entry that works for ``key``; remembered per key.

    A key for which every entry failed fails at once afterwards: each failed try is a full compile."""
    from benchmarks.flex_compat import flex_bwd_heuristic_tiles_at_most

    flex_bwd_heuristic_tiles_at_most(BS)  # before anything compiles (also for test_bench_attention_gpu)
    choice = _flex_choice.get(key)
    if isinstance(choice, str):
        raise RuntimeError(f"compiled Flex failed earlier for {key}: {choice}")
    if choice is not None:
        return fn(FLEX_OPTS[choice])
    for i, opts in enumerate(FLEX_OPTS):
        try:
            out = fn(opts)
            _flex_choice[key] = i
            return out
        except Exception as exc:
            if i == len(FLEX_OPTS) - 1:
                _flex_choice[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
                raise


def _random_mask(h, n, density, seed):
    """Per-head random block mask with ``density`` of the blocks active (the diagonal always)."""
    from kandinsky_kernels.mask import BlockSparseMask

    g = torch.Generator(device="cuda").manual_seed(seed)
    keep = torch.rand(1, h, n, n, device="cuda", generator=g) < density
    keep |= torch.eye(n, dtype=torch.bool, device="cuda")
    return BlockSparseMask.from_dense_blocks(keep, BS)


def _sampled_error(out, q, k, v, mask, scale):
    """max |out - reference| over three query blocks (first, middle, last) of the first and last head;
    all tensors (B, H, S, D), the reference in fp32 over every key."""
    n = mask.num_q_blocks
    blocks = mask.to_dense_blocks()[0]
    err = 0.0
    for h in sorted({0, q.shape[1] - 1}):
        for i in sorted({0, n // 2, n - 1}):
            rows = slice(i * BS, (i + 1) * BS)
            logits = (q[0, h, rows].float() @ k[0, h].float().T) * scale
            allowed = blocks[h, i].repeat_interleave(BS)[None, :]
            p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            ref = p @ v[0, h].float()
            err = max(err, (out[0, h, rows].float() - ref).abs().max().item())
    return err


@torch.no_grad()
def _sampled_grad_error(grads, q, k, v, do, mask, scale, chunk=4096):
    """{"dq", "dk", "dv"}: max |g - ref| / max |ref| over the query blocks (dq) and key blocks (dk, dv)
    first, middle and last of the first and last head. ``grads`` (dq, dk, dv) and q, k, v, do are
    (1, H, S, D). The reference is fp32 from the inputs alone: every row's lse and output over all its
    keys (in query chunks), then the exact gradient formulas on the sampled blocks."""
    from kandinsky_kernels.mask import BlockSparseMask
    from kandinsky_kernels.reference.attention import block_sparse_attention_chunked

    n = mask.num_q_blocks
    blocks = mask.to_dense_blocks()[0]
    errs = {"dq": 0.0, "dk": 0.0, "dv": 0.0}
    for h in sorted({0, q.shape[1] - 1}):
        qh, kh, vh, doh = (t[0, h].float() for t in (q, k, v, do))
        head = BlockSparseMask.from_dense_blocks(blocks[None, h:h + 1], BS)
        out, lse = block_sparse_attention_chunked(*(t[:, h:h + 1].transpose(1, 2) for t in (q, k, v)), head,
                                                  scale, chunk=chunk)
        out, lse = out[0, :, 0], lse[0, 0]
        delta = (doh * out).sum(-1)
        for i in sorted({0, n // 2, n - 1}):
            r = slice(i * BS, (i + 1) * BS)
            row_ok = blocks[h, i].repeat_interleave(BS)[None, :]
            p = torch.exp((qh[r] @ kh.T) * scale - lse[r, None]).masked_fill_(~row_ok, 0.0)
            ref_dq = (p * (doh[r] @ vh.T - delta[r, None])) @ kh * scale
            col_ok = blocks[h, :, i].repeat_interleave(BS)[:, None]
            pc = torch.exp((qh @ kh[r].T) * scale - lse[:, None]).masked_fill_(~col_ok, 0.0)
            ref_dv = pc.T @ doh
            ref_dk = (pc * (doh @ vh[r].T - delta[:, None])).T @ qh * scale
            for name, g, ref in zip(("dq", "dk", "dv"), grads, (ref_dq, ref_dk, ref_dv)):
                err = (g[0, h, r].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
                errs[name] = max(errs[name], err.item())
    return errs


_autotune_seen: dict = {}  # kernel -> {key: {"chosen": config, "timings_ms": {config: [...]}}}


def autotune_choices() -> dict:
    """Per Triton kernel of ours: the config the autotuner chose for each key (head dim, block size,
    flags, dtypes), with the timings of every config it tried (ms: median, 20th, 80th percentile; inf =
    failed to compile or launch). What the fixed tiles and the config lists are trimmed from.

    Accumulates over calls: a tuner keeps only its last tuning's timings, so they are filed under the
    key that is new since the previous call (omitted when several are)."""
    from kandinsky_kernels.ops import _bsa_triton as m

    for name in ("fwd", "dkdv", "dkdv_atomic", "dq"):
        tuner = getattr(m, f"_{name}_tuned", None)
        if tuner is None:
            continue
        seen = _autotune_seen.setdefault(name, {})
        cache = getattr(tuner, "cache", {})
        new = [key for key in cache if str(key) not in seen]
        timings = getattr(tuner, "configs_timings", None)
        for key in new:
            entry = {"chosen": str(cache[key])}
            if timings and len(new) == 1:
                entry["timings_ms"] = {str(cfg): t for cfg, t in timings.items()}
            seen[str(key)] = entry
    return _autotune_seen


class Run:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.rows: list[dict] = []
        self.meta = {
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": __import__("triton").__version__,
            "budget_s": args.budget_s,
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self):
        with open(os.path.join(self.args.out_dir, "gpu_timing.json"), "w") as f:
            tiles = {f"{k[0]} D={k[1]}": FLEX_OPTS[i] if isinstance(i, int) else i
                     for k, i in _flex_choice.items()}
            meta = {**self.meta, "flex_tiles": tiles, "autotune": autotune_choices()}
            json.dump({"meta": meta, "rows": self.rows}, f, indent=1)
        write_table(self)  # also after every row: a run killed by its timeout still leaves a table

    def time(self, row: dict, fn, min_left: float = 5.0):
        """Time ``fn`` (first call separately: compile/autotune) and record a row whatever happens."""
        from triton.testing import do_bench

        row = dict(row)
        if self.left() < min_left:
            row["status"] = "skipped: time budget"
        else:
            try:
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t0, 2)
                row["ms"] = do_bench(fn, warmup=10, rep=50, return_mode="median")
                row["status"] = "ok"
            except Exception as exc:  # keep going: one failing provider must not end the run
                row["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.synchronize()
        self.rows.append(row)
        self.save()
        print(f"  {row['model']:<4} d={row['density']:<5} {row['pass']:<7} {row['provider']:<6} "
              f"{row.get('ms', float('nan')):9.3f} ms  {row['status'][:80]}", flush=True)
        return row


def bench_model(run: Run, model: str, s: int, densities, first_round: bool = True):
    """Time ``model`` at ``densities``; the first round also times dense SDPA and checks gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from kandinsky_kernels.ops._bsa_triton import bsa_backward_triton, bsa_forward_triton

    h, d = MODELS[model]
    scale = 1.0 / math.sqrt(d)
    n = s // BS
    # BHSD memory for SDPA / Flex; our kernels read the same memory through BSHD views (any strides).
    q, k, v, do = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    qs, ks, vs, dos = (t.transpose(1, 2) for t in (q, k, v, do))
    base = {"model": model, "S": s, "H": h, "D": d, "dtype": "bf16"}
    dense_flops = 4.0 * s * s * h * d  # two matmuls, forward

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    def sdpa_fwdbwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, scale=scale)
        return torch.autograd.grad(out, (qg, kg, vg), do)

    for name, fn in (("fwd", sdpa_fwd), ("fwd+bwd", sdpa_fwdbwd)) if first_round else ():
        run.time({**base, "density": 1.0, "pass": name, "provider": "sdpa", "flops": dense_flops}, fn)

    flex = torch.compile(flex_attention, dynamic=False)
    check_grads = first_round
    for density in densities:
        if run.left() < 10:
            break
        mask = _random_mask(h, n, density, seed=int(density * 1000))
        bm = mask.to_flex_block_mask()
        real = mask.density
        row = {**base, "density": density, "real_density": round(real, 4), "flops": dense_flops * real}

        def ours_fwd():
            return bsa_forward_triton(qs, ks, vs, mask.kv_ptr, mask.kv_cols, BS, scale, None, None)

        def ours_fwdbwd(scheme="two_pass"):
            out, lse = ours_fwd()
            return bsa_backward_triton(dos, qs, ks, vs, out, lse, mask.kv_ptr, mask.kv_cols,
                                       *mask.transpose_csr(), BS, scale, None, None, scheme=scheme)

        def flex_fwd():
            return _flex_call(("fwd", d), lambda o: flex(q, k, v, block_mask=bm, scale=scale, kernel_options=o))

        def flex_fwdbwd():
            def go(o):
                out = flex(qg, kg, vg, block_mask=bm, scale=scale, kernel_options=o)
                return torch.autograd.grad(out, (qg, kg, vg), do)

            return _flex_call(("fwd+bwd", d), go)

        # Exactness at this very shape (catches index overflow at large S): both sparse kernels against an
        # fp32 reference on a sample of query blocks of the first and last head.
        for provider, fn in (("ours", lambda: ours_fwd()[0].transpose(1, 2)), ("flex", flex_fwd)):
            try:
                with torch.no_grad():
                    err = _sampled_error(fn(), q, k, v, mask, scale)
                row[f"max_err_{provider}"] = err
                print(f"  {model} d={density}: {provider} max |out - fp32 ref| (sampled rows) = {err:.3e}",
                      flush=True)
            except Exception as exc:
                row[f"max_err_{provider}"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        # The same for the gradients, once per model (its first density): both of our backward schemes
        # (the atomic one's first call autotunes here, into a zeroed dQ buffer) and Flex as the yardstick.
        if check_grads:
            check_grads = False
            for provider, fn in (("ours", lambda: [g.transpose(1, 2) for g in ours_fwdbwd()]),
                                 ("ours-atomic", lambda: [g.transpose(1, 2) for g in ours_fwdbwd("atomic")]),
                                 ("flex", flex_fwdbwd)):
                try:
                    errs = _sampled_grad_error(fn(), q, k, v, do, mask, scale)
                    row[f"grad_err_{provider}"] = errs
                    text = ", ".join(f"{name} {e:.3e}" for name, e in errs.items())
                    print(f"  {model} d={density}: {provider} max |grad - fp32 ref| / max |ref| (sampled "
                          f"blocks): {text}", flush=True)
                except Exception as exc:
                    row[f"grad_err_{provider}"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        for name, fn_ours, fn_flex in (("fwd", ours_fwd, flex_fwd), ("fwd+bwd", ours_fwdbwd, flex_fwdbwd)):
            run.time({**row, "pass": name, "provider": "ours"}, fn_ours)
            run.time({**row, "pass": name, "provider": "flex"}, fn_flex)
        # the atomic-dQ backward (first call: its own autotuning)
        run.time({**row, "pass": "fwd+bwd", "provider": "ours-atomic"}, lambda: ours_fwdbwd("atomic"))
        del mask, bm
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    """ms per provider, speedup vs SDPA and vs Flex, the fraction of the ideal 1/density speedup, and for
    forward+backward rows the backward alone over the forward (bwd/fwd; atomic: the atomic-dQ scheme)."""
    ms = {(r["model"], r["density"], r["pass"], r["provider"]): r.get("ms") for r in rows}
    lines = [f"{'model':<5} {'dens':>5} {'pass':<8} {'ours ms':>9} {'flex ms':>9} {'sdpa ms':>9} "
             f"{'x sdpa':>7} {'x flex':>7} {'flex x sdpa':>11} {'ideal':>6} {'frac':>5} {'TFLOP/s':>8} "
             f"{'bwd/fwd':>7} {'atomic ms':>9} {'atomic bwd/fwd':>14}"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    first = {}  # one row per (model, density, pass), listed by model, then density, then pass
    for r in rows:
        if r["provider"] in ("ours", "flex"):
            first.setdefault((r["model"], r["density"], r["pass"]), r)
    for key in sorted(first, key=lambda k: (models.index(k[0]), k[1], k[2])):
        r = first[key]
        ours, fl = ms.get((*key, "ours")), ms.get((*key, "flex"))
        sdpa = ms.get((r["model"], 1.0, r["pass"], "sdpa"))
        dens = r.get("real_density", r["density"])

        def f(x, w, p=3):
            return f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"

        x_sdpa = sdpa / ours if ours and sdpa else None
        x_flex = fl / ours if ours and fl else None
        flex_sdpa = sdpa / fl if fl and sdpa else None
        frac = x_sdpa * dens if x_sdpa else None
        flops = r["flops"] * (3.5 if r["pass"] == "fwd+bwd" else 1.0)  # bwd = 2.5 x fwd matmul work
        tflops = flops / (ours * 1e-3) / 1e12 if ours else None
        fwd = ms.get((r["model"], r["density"], "fwd", "ours"))
        atomic = ms.get((*key, "ours-atomic")) if r["pass"] == "fwd+bwd" else None

        def bwd_over_fwd(total):
            return (total - fwd) / fwd if r["pass"] == "fwd+bwd" and total and fwd else None
        lines.append(f"{r['model']:<5} {r['density']:>5} {r['pass']:<8} {f(ours, 9)} {f(fl, 9)} {f(sdpa, 9)} "
                     f"{f(x_sdpa, 7, 2)} {f(x_flex, 7, 2)} {f(flex_sdpa, 11, 2)} {f(1 / dens, 6, 1)} "
                     f"{f(frac, 5, 2)} {f(tflops, 8, 1)} {f(bwd_over_fwd(ours), 7, 2)} {f(atomic, 9)} "
                     f"{f(bwd_over_fwd(atomic), 14, 2)}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting new measurements after this")
    p.add_argument("--models", default="lite,pro")
    p.add_argument("--lite-seq", type=int, default=93_696, help="tokens (multiple of 64); Lite 5 s video")
    p.add_argument("--pro-seq", type=int, default=93_696, help="tokens (multiple of 64); Pro, same video")
    p.add_argument("--densities", type=lambda x: [float(v) for v in x.split(",")],
                   default=[0.05, 0.1, 0.25, 0.5])
    p.add_argument("--first-density", type=float, default=0.1,
                   help="measured for every model before the other densities (the goals' density)")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("gpu_timing.py needs a CUDA device")
    run = Run(args)
    print(json.dumps(run.meta), flush=True)
    # Two rounds: the goals' density for every model first (with the dense baseline), so a run that its
    # budget cuts short still has the goal rows of both models; then the other densities.
    first = [d for d in args.densities if d == args.first_density]
    rounds = [(first, True), ([d for d in args.densities if d not in first], not first)]
    for densities, first_round in rounds:
        for model in args.models.split(",") if densities else ():
            s = args.lite_seq if model == "lite" else args.pro_seq
            if run.left() < 20:
                print(f"skipping {model} {densities}: time budget", flush=True)
                continue
            print(f"== {model}: S={s} H={MODELS[model][0]} D={MODELS[model][1]} bf16 densities {densities}",
                  flush=True)
            try:
                bench_model(run, model, s, densities, first_round)
            except Exception as exc:
                print(f"{model} failed: {type(exc).__name__}: {exc}", flush=True)
                run.rows.append({"model": model, "status": f"error: {type(exc).__name__}: {str(exc)[:300]}"})
            torch.cuda.empty_cache()
            write_table(run)  # after every model, so a run cut short still leaves a table
    run.save()
    print("autotune choices:", json.dumps(autotune_choices(), indent=1))
    print(write_table(run))


def write_table(run: Run) -> str:
    text = table([r for r in run.rows if "provider" in r])
    with open(os.path.join(run.args.out_dir, "gpu_timing_table.txt"), "w") as f:
        f.write(json.dumps(run.meta) + "\n" + text + "\n")
    return text


if __name__ == "__main__":
    main()
