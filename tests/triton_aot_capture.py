"""Ahead-of-time compilation of the ops' Triton kernels for Hopper (sm_90), from captured launches.

The CPU test suite runs the Triton kernels through the interpreter, which accepts constructs the real
compiler rejects, so a kernel could pass every CPU test and still fail to build on its first GPU. This
module compiles every kernel with exactly the argument types, constexprs and launch options the ops use,
without a GPU, in two phases that must run in separate interpreters (triton decides at decoration time
whether a @triton.jit function is interpreted):

``capture`` (TRITON_INTERPRET=1): the interpreter's launch entry point is wrapped to record each
launch (kernel, arguments by name, options such as num_warps), then every public op is called on small
CPU tensors through the ``triton`` backend, covering its dtypes and code-path flags. Recording real
launches instead of hand-written signatures keeps the compiled set in step with the launchers.

``compile`` (no TRITON_INTERPRET): each recorded launch is replayed through the compiled JITFunction's
own binder (the code a GPU launch runs), so ints equal to 1 become constexprs and pointers / ints
divisible by 16 get their divisibility hints as on a GPU; identical specialisations are compiled once,
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. An autotuned kernel is compiled with every
autotune config, not just the one the interpreter happened to run.

Run as ``python tests/triton_aot_capture.py capture > launches.json`` and
``python tests/triton_aot_capture.py compile < launches.json``; :func:`jit_kernels` lists the kernels
the capture must cover. The block-sparse attention kernels (``_bsa_triton``) are left out: they are
compiled with their own checks (wgmma, pipelining, spills) in tests/test_bsa_triton.py.
"""
from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kandinsky_kernels"
EXCLUDED_MODULES = ("kandinsky_kernels.ops._bsa_triton",)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one Hopper block can use


def _is_triton_decorator(node: ast.expr) -> bool:
    """@triton.jit, @triton.jit(...), @triton.autotune(...), @triton.heuristics(...)."""
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Attribute) and target.attr in ("jit", "autotune", "heuristics")
            and isinstance(target.value, ast.Name) and target.value.id == "triton")


def jit_kernels() -> set[str]:
    """``module:name`` of every @triton.jit kernel in kandinsky_kernels (except EXCLUDED_MODULES), read
    from the source so that no import decides what exists. A jit function called from another jit
    function of its file is a device function, compiled inside its caller, so it is not listed."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module in EXCLUDED_MODULES:
            continue
        tree = ast.parse(path.read_text(), str(path))
        jitted = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                  and any(_is_triton_decorator(d) for d in n.decorator_list)]
        called = {c.func.id for f in jitted for c in ast.walk(f)
                  if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        found.update(f"{module}:{f.name}" for f in jitted if f.name not in called)
    return found


# ---------------------------------------------------------------------------------------------------
# Phase 1: capture (TRITON_INTERPRET=1)


def _encode(value):
    """A launch argument as JSON: tensors by dtype and 16-byte alignment (what specialisation reads),
    triton dtypes (constexpr ACC=tl.float32) by name, Python scalars as they are."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}: {value!r}")


def _install_recorder(launches: list) -> None:
    """Wrap the interpreter's launch (``kernel[grid](...)`` ends in InterpretedFunction.run) so that every
    launch appends its record, then runs as before."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        if fn.__module__ not in EXCLUDED_MODULES:
            launches.append({
                "kernel": f"{fn.__module__}:{fn.__qualname__}",
                "args": {k: _encode(v) for k, v in bound.items()},
                "options": {k: _encode(v) for k, v in options.items()},
            })
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def _workload(errors: list[str]) -> None:
    """Call every op with Triton kernels through the ``triton`` backend on small CPU tensors: each dtype
    and each flag that changes a kernel's constexprs, options or argument types. Shapes are small but
    pick the launchers' other block-size branches too (adaln's 8 warps past D = 2048, NABLA's wider key
    tiles). The Triton backwards of these ops are plain torch (no kernels), except fractal's, which is
    the inverse op and covered by calling both directions. An op call that raises is appended to
    ``errors`` and the workload goes on."""
    import torch

    import kandinsky_kernels as kk
    from kandinsky_kernels.backends import use_backend
    from kandinsky_kernels.ops.fractal import FractalLayout

    g = torch.Generator().manual_seed(0)

    def call(op, *args, **kwargs):
        # A call the interpreter rejects still leaves its launch recorded (the recorder runs first), so
        # the compiler's verdict on it is still reported; the error itself is reported as well.
        try:
            return op(*args, **kwargs)
        except Exception as exc:
            errors.append(f"{op.__name__}: {type(exc).__name__}: {exc}")
            return None

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    with use_backend("triton"):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            # adaln: (B, S, D) rows with (B, 1, D) modulation, per-frame (B, T, S/T, D) with (B, T, 1, D),
            # and a D whose block needs 8 warps; modulation in fp32 and in x's dtype
            for x_shape, mod_dtype in (((2, 3, 64), torch.float32), ((1, 2, 3, 96), dt), ((1, 2, 4096), dt)):
                x = rand(*x_shape, dtype=dt)
                mod = (*x_shape[:-2], 1, x_shape[-1])
                call(kk.scale_shift_layer_norm, x, rand(*mod, dtype=mod_dtype), rand(*mod, dtype=mod_dtype))
                call(kk.gated_residual, x, rand(*x_shape, dtype=dt), rand(*mod, dtype=mod_dtype))

            # qk_norm: RMSNorm + RoPE at head dims 64 and 128, angles per batch or shared, RMSNorm alone
            for dh in (64, 128):
                x = rand(2, 3, 2, dh, dtype=dt)
                w = rand(dh, dtype=dt)
                for cos_b in (1, 2):
                    call(kk.rms_norm_rope, x, w, rand(cos_b, 3, 1, dh // 2), rand(cos_b, 3, 1, dh // 2))
                call(kk.rms_norm_rope, x, w)
            call(kk.rms_norm_rope, rand(1, 3, 2, 30, dtype=dt), rand(30, dtype=dt))  # odd half: masked pairs

            # GroupNorm (+ SiLU), plain and with the causal conv's padded output; the attention's 4-D x
            x5 = rand(1, 8, 3, 4, 5, dtype=dt)
            for silu in (True, False):
                for pad in ((0, 0, 0), (2, 1, 1)):
                    call(kk.group_norm_silu, x5, rand(8), rand(8), 4, silu=silu, pad=pad)
            call(kk.group_norm, rand(2, 8, 4, 5, dtype=dt), None, None, 2)

            # causal padding: plain (conv_in, downsamplers) and fused with the upsamplers' nearest upsampling
            for pad, up in (((2, 1, 1), (1, 1, 1)), ((2, 1, 1), (2, 2, 2)), ((0, 1, 1), (1, 2, 2))):
                call(kk.causal_pad3d, x5, pad, up)

            # tiled VAE blend along T, H and W, with the tiler's strided slice as the tile
            out = rand(1, 2, 6, 6, 6, dtype=dt)
            for dim in (2, 3, 4):
                shape = [1, 2, 6, 6, 6]
                shape[dim] = 5
                tile = rand(*shape, dtype=dt).narrow(dim, 1, 4)
                call(kk.tile_blend_, out, tile, dim, 2, 4)

            # fractal reordering both ways; token bytes pick the copy word (8, 4, 2 and 1 bytes)
            for channels, word_dtype in ((4, dt), (3, dt), (1, torch.uint8), (2, torch.int64)):
                x = rand(1, 2, 9, 10, channels).to(word_dtype)
                y, layout = call(kk.fractal_flatten, x, return_layout=True) or (None, None)
                if y is not None:
                    call(kk.fractal_unflatten, y, layout)

            # NABLA: plain, with STA + token_valid, per-batch token_valid, packed videos, raster order
            # through token_index, and a wider grid below
            q, k = rand(1, 256, 2, 32, dtype=dt), rand(1, 256, 2, 32, dtype=dt)
            sta = torch.eye(4, dtype=torch.bool)
            valid = torch.ones(256, dtype=torch.bool)
            valid[-10:] = False
            call(kk.nabla_block_mask, q, k, 0.9)
            call(kk.nabla_block_mask, q, k, 0.9, sta, token_valid=valid)
            call(kk.nabla_block_mask, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), 0.9,
                 token_valid=valid.expand(2, -1).clone())
            cu = torch.tensor([0, 128, 192], dtype=torch.int32)  # two videos and a tail past the end
            call(kk.nabla_block_mask, q, k, 0.9, sta, cu_seqlens=cu)
            layout = FractalLayout(1, 12, 12, 8)  # 144 raster rows in 256 fractal positions
            qr, kr = rand(1, 144, 2, 32, dtype=dt), rand(1, 144, 2, 32, dtype=dt)
            call(kk.nabla_block_mask, qr, kr, 0.9, token_index=layout.token_index("cpu"))
        # a 256-block grid: the launcher's wider key tiles (BLOCK_M 8, 8 warps). Once, in fp32: the mask
        # kernel reads the fp32 pooled q / k whatever the input dtype (the interpreter needs ~4 s for it)
        call(kk.nabla_block_mask, rand(1, 256 * 8, 1, 16), rand(1, 256 * 8, 1, 16), 0.9, block_size=8)
        # fp64 tiles blend in fp64 (ACC = tl.float64)
        call(kk.tile_blend_, torch.zeros(1, 2, 6, 4, dtype=torch.float64), rand(1, 2, 4, 4).double(), 2, 2, 4)


def capture() -> dict:
    """Run the workload under the interpreter: ``launches`` (the distinct ones, in first-seen order) and
    ``errors`` (op calls that raised)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("capture needs TRITON_INTERPRET=1 set before triton is imported")
    from kandinsky_kernels._triton import triton_runs_on, why_not

    if not triton_runs_on("cpu"):
        raise RuntimeError(f"SKIP: {why_not('cpu')}")
    launches: list[dict] = []
    errors: list[str] = []
    _install_recorder(launches)
    _workload(errors)
    unique = {json.dumps(rec, sort_keys=True): rec for rec in launches}
    return {"launches": list(unique.values()), "errors": errors}


# ---------------------------------------------------------------------------------------------------
# Phase 2: compile (no TRITON_INTERPRET)


def _decode(value):
    """A recorded argument back into something the JIT binder specialises the same way: a small tensor
    of the recorded dtype, 16-byte aligned or not, as the launch's was."""
    import torch
    import triton.language as tl

    if isinstance(value, dict) and "tensor" in value:
        base = torch.empty(32, dtype=getattr(torch, value["tensor"]))
        return base if value["aligned"] else base[1:]
    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    return value


def _kernel(name: str):
    """The kernel object named ``module:qualname`` as launched (JITFunction, or an Autotuner/Heuristics
    wrapping one)."""
    import importlib

    module, qualname = name.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _configs(launch: dict, kernel) -> list[dict]:
    """The launch once per autotune config of ``kernel`` (config kwargs and options replacing the
    recorded ones), or as recorded for a kernel that is not autotuned."""
    configs = getattr(kernel, "configs", None)
    if not configs:
        return [launch]
    out = []
    for cfg in configs:
        args = dict(launch["args"], **cfg.kwargs)
        options = dict(launch["options"], num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        out.append({"kernel": launch["kernel"], "args": args, "options": options})
    return out


def _specialise(launch: dict, backend):
    """(jit_function, signature, constexprs, attrs, options) of the launch, from the JITFunction's binder
    and argument packing: the specialisation a GPU launch with these arguments compiles."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = _kernel(launch["kernel"])
    while not isinstance(jit, JITFunction):
        jit = jit.fn
    args = {k: _decode(v) for k, v in launch["args"].items()}
    options = {k: _decode(v) for k, v in launch["options"].items()}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, kwargs = binder(**args, **options)
    opts, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, kwargs)
    return jit, signature, constexprs, attrs, opts


def compile_launches(launches: list[dict]) -> dict[str, list[dict]]:
    """Compile every distinct specialisation of the launches for sm_90. Per kernel, one entry per
    compilation: its signature, constexprs and options, and ``shared`` bytes or the compiler's ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    seen = set()
    results: dict[str, list[dict]] = {}
    for recorded in launches:
        for launch in _configs(recorded, _kernel(recorded["kernel"])):
            jit, signature, constexprs, attrs, opts = _specialise(launch, backend)
            desc = {
                "signature": signature,
                "constexprs": {jit.arg_names[k[0]]: repr(v) for k, v in constexprs.items()},
                "options": {k: opts.__dict__[k] for k in ("num_warps", "num_stages")},
            }
            key = json.dumps([launch["kernel"], desc, repr(sorted(attrs.items()))], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            try:
                k = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                   options=opts.__dict__)
                desc["shared"] = k.metadata.shared
            except Exception as exc:  # the compiler's message is the test's failure message
                desc["error"] = f"{type(exc).__name__}: {exc}"
            results.setdefault(launch["kernel"], []).append(desc)
    return results


def main(argv: list[str]) -> int:
    if argv[1:] == ["capture"]:
        try:
            json.dump(capture(), sys.stdout)
        except RuntimeError as exc:
            if str(exc).startswith("SKIP: "):
                print(exc, file=sys.stderr)
                return 3
            raise
        return 0
    if argv[1:] == ["compile"]:
        json.dump(compile_launches(json.load(sys.stdin)["launches"]), sys.stdout)
        return 0
    print(f"usage: {argv[0]} capture|compile", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv))
