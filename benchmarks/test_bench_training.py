"""Training throughput and activation memory of the bundled harness on CPU.

Throughput: ``tiny-cpu`` in 1 process (baseline), in 2 processes under FSDP2 (``torchrun``, gloo;
sp = 1) and in 2 processes with Ulysses sequence parallelism (sp = 2: both ranks on the same batch,
each on half of its tokens), the same global batch per step (1 process and sp = 2 accumulate two
micro-batches where 2 processes with sp = 1 take one each).

Each call is one short run into a fresh folder, so its time includes start-up (imports, process
group, synthetic shards); the steady-state figure is ``tokens_per_s``, recorded per provider and
round from the run's ``metrics.jsonl`` (global tokens over step time, steps after the first two)
and listed by the report. On this 2-core host the 2-process run splits the same cores, so it shows
what FSDP2's (and Ulysses') communication costs rather than a scaling gain.

Memory: the peak of one training step (forward + backward; gradients allocated before, so the peak
is the activations) of a CrossDiT of 8 tiny blocks on one long sequence, without activation
checkpointing (baseline), with it, and with it and the host offload of the blocks' inputs
(``training.offload``; on the CPU the offloaded inputs go to the reused host-buffer pool, so the
step's allocations drop by about L - 2 block inputs). Times per round show what each costs.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._util import Provider, by_profile, run_case, skip_cpu_suite_in_gpu_profile

skip_cpu_suite_in_gpu_profile()

ROOT = Path(__file__).resolve().parents[1]
STEPS = by_profile(smoke=3, quick=6, default=8)
ROUNDS = by_profile(smoke=1, quick=1, default=2)  # ~14 s a run (8 steps: ~8 s of it start-up): 3 rounds cost 40 s
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(procs: int, tokens_per_s: list, *extra: str) -> None:
    with tempfile.TemporaryDirectory(prefix="kk_bench_train_") as out:
        common = ["--config", "tiny-cpu", "--output", out, "--max-steps", str(STEPS), "log.progress=False",
                  "log.plot=False", "checkpoint.every=1000", "checkpoint.export_ema=False"]
        if procs == 1:
            cmd = [sys.executable, "-m", "training.train", *common, "optim.grad_accum=2"]
            env = dict(os.environ)
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                   "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                   "-m", "training.train", *common, *extra]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in rows if r["step"] > 2] or rows
        tokens = sum(r["tokens_per_s"] * r["step_time"] for r in steady)
        tokens_per_s.append(tokens / sum(r["step_time"] for r in steady))


def test_training_tokens_per_s(benchmark):
    sp2 = "2 processes (FSDP2, sp=2)"
    rates = {"1 process": [], "2 processes (FSDP2)": [], sp2: []}
    info = run_case(
        benchmark,
        suite="training tokens/s (CPU)",
        op="training tiny-cpu",
        case=f"tiny-cpu, {STEPS} steps per run incl. start-up, global batch of 2 micro-batches",
        baseline="1 process",
        providers=[Provider("1 process", lambda: _run(1, rates["1 process"])),
                   Provider("2 processes (FSDP2)", lambda: _run(2, rates["2 processes (FSDP2)"])),
                   Provider(sp2, lambda: _run(2, rates[sp2], "--sp", "2", "optim.grad_accum=2"))],
        params={"steps": STEPS},
        rounds=ROUNDS,
        warmup_rounds=0,
    )
    for name, rs in rates.items():
        info["providers"][name]["tokens_per_s"] = rs


# ------------------------------------------------------------------------------ activation memory
MEM_BLOCKS = by_profile(smoke=4, quick=8, default=8)
MEM_SHAPE = by_profile(smoke=(2, 16, 16), quick=(8, 32, 32), default=(8, 32, 32))  # latent T, H, W
MEM_ROUNDS = by_profile(smoke=1, quick=3, default=3)


def _memory_case():
    import copy

    import torch

    from kandinsky_model import CrossDiT, preset
    from training.parallelize import install_block_runner

    torch.manual_seed(0)
    cfg = preset("tiny", num_visual_blocks=MEM_BLOCKS)
    base = CrossDiT(cfg)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, *MEM_SHAPE, cfg.in_channels, generator=g), torch.randn(1, 5, cfg.in_text_dim, generator=g),
              torch.randn(1, cfg.in_text_dim2, generator=g), torch.tensor([300.0]), torch.ones(1, 5, dtype=torch.bool))
    steps = {}
    for name, ac, off in (("no AC", False, False), ("AC", True, False), ("AC + offload", True, True)):
        model = copy.deepcopy(base)
        install_block_runner(model, None, ac, off)

        def step(model=model):
            model.zero_grad(set_to_none=False)  # gradients stay allocated: the step's peak is activations
            (model(*inputs).float() ** 2).mean().backward()
        step()  # allocates the gradients (and the offload's host buffers)
        steps[name] = step
    return steps


def test_training_activation_memory(benchmark):
    steps = _memory_case()
    t, h, w = MEM_SHAPE
    tokens = t * (h // 2) * (w // 2)
    run_case(
        benchmark,
        suite="training activation memory (CPU)",
        op="CrossDiT train step",
        case=f"tiny, {MEM_BLOCKS} blocks, S = {tokens} tokens, fp32, forward + backward",
        baseline="no AC",
        providers=[Provider(n, fn, memory=True) for n, fn in steps.items()],
        params={"blocks": MEM_BLOCKS, "tokens": tokens},
        mem_goal={"provider": "AC + offload", "vs": "AC", "max_ratio": 0.9},
        rounds=MEM_ROUNDS,
        warmup_rounds=1,
    )
