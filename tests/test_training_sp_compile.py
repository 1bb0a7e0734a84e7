"""A CrossDiT block under Ulysses sequence parallelism (sp = 2, 2 CPU processes, gloo) compiles with
``torch.compile(fullgraph=True)``: the funcol all-to-alls are in the graph dynamo captures and in
the forward and backward graphs AOTAutograd derives (2 each), and the compiled block's output and
input gradient equal eager's. The backend is AOTAutograd with the graphs run as captured
(``aot_eager``-like: no Inductor code generation, so no C++ compiler is needed).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from test_training_sp import SP, _free_port, _inputs, _model, _spawn
from training.parallelize import UlyssesSP


def _count_a2a(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "all_to_all_single" in str(n.target))


def _compile_block(rank, out_dir):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    model = _model("sdpa")
    args, kwargs = _inputs(False, "sdpa")
    sp = UlyssesSP(dist.group.WORLD, SP, rank)
    with torch.no_grad():
        state = model.prepare(*args, **kwargs)
    h, text, te, rope, ctx = sp.shard(state, model.config.num_heads)
    block = model.visual_transformer_blocks[0]

    def run(h, text, te, rope):
        return block(h, text, te, rope, ctx)

    h = h.detach().requires_grad_(True)
    ref = run(h, text, te, rope)
    ref.float().pow(2).sum().backward()
    grad_ref, h.grad = h.grad.clone(), None
    block.zero_grad(set_to_none=True)

    counts = {"forward": [], "backward": []}

    def compiler(kind):
        def fn(gm, example_inputs):
            counts[kind].append(_count_a2a(gm))
            return make_boxed_func(gm.forward)
        return fn

    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))
    compiled = torch.compile(run, fullgraph=True, backend=backend)
    out = compiled(h, text, te, rope)
    out.float().pow(2).sum().backward()
    assert counts["forward"] == [2] and counts["backward"] == [2], counts
    assert torch.equal(out, ref), (out - ref).abs().max()
    torch.testing.assert_close(h.grad, grad_ref, rtol=1e-6, atol=1e-7)
    if rank == 0:
        with open(os.path.join(out_dir, "report.txt"), "w") as f:
            f.write(f"all-to-alls in the compiled graphs: {counts}")


def test_sp_block_compiles_fullgraph_with_collectives(tmp_path):
    try:
        _spawn(_compile_block, _free_port(), str(tmp_path), timeout=300)
    except Exception as e:
        errors = "".join(p.read_text() for p in tmp_path.glob("error*.txt"))
        raise AssertionError(f"{e}\n{errors}") from None
    print((tmp_path / "report.txt").read_text())
