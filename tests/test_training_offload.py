"""Host offload of the checkpointed blocks' inputs (training/offload.py) on the CPU: the inputs leave
during forward (their tensors are freed), the gradients are bit-identical to checkpointing without
offload, the step's peak memory drops by L - 2 block inputs (profiler memory events), the config
switch and its errors, and ``python -m training.train`` with offload under sp = 2 on 2 processes
against one process.
"""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from kandinsky_model import CrossDiT, preset
from training.config import apply_overrides, get_config
from training.memory import peak_bytes
from training.offload import BlockInputOffloader, HostPool
from training.parallelize import install_block_runner
from test_training import assert_same_losses, losses, run_train
from test_training_sp import _torchrun

BLOCKS = 8


def _model(blocks=BLOCKS) -> CrossDiT:
    torch.manual_seed(0)
    model = CrossDiT(preset("tiny", num_visual_blocks=blocks))
    with torch.no_grad():  # the modulations start at zero (identity blocks): make them matter
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.05)
    return model


def _inputs(frames=2, side=16):
    c = preset("tiny")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, frames, side, side, c.in_channels, generator=g)
    text = torch.randn(1, 5, c.in_text_dim, generator=g)
    pooled = torch.randn(1, c.in_text_dim2, generator=g)
    return x, text, pooled, torch.tensor([300.0]), torch.ones(1, 5, dtype=torch.bool)


def _runner(model, ac, offload):
    model = copy.deepcopy(model)
    install_block_runner(model, None, ac, offload)
    return model


def _step(model, inputs, set_to_none=True):
    model.zero_grad(set_to_none=set_to_none)
    out = model(*inputs)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("linears", ["default", "onednn"])
def test_offload_frees_inputs_and_keeps_gradients(linears, monkeypatch):
    if linears == "onednn":  # every Linear through the oneDNN autograd path (kandinsky_model/linear.py)
        from kandinsky_model import linear as lin

        if lin._onednn_op()[0] is None:
            pytest.skip(str(lin._onednn_op()[1]))
        monkeypatch.setenv(lin.ENV_VAR, "onednn")
    base, inputs = _model(), _inputs()
    tokens = 2 * 8 * 8  # frames x (side / patch) ** 2
    input_bytes = tokens * base.config.model_dim * 4

    ref = _runner(base, True, False)
    loss_ref = _step(ref, inputs)
    grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
    plain = _runner(base, False, False)
    _step(plain, inputs)

    off = _runner(base, True, True)
    offloader = off.block_input_offloader
    refs = []
    offloader.on_offload = lambda t: refs.append(weakref.ref(t))
    for it in range(2):  # the second step reuses the host buffers of the first
        refs.clear()
        off.zero_grad(set_to_none=True)
        out = off(*inputs)
        gc.collect()
        # every block's input went to the host and its tensor is gone before backward
        assert len(refs) == BLOCKS
        assert all(r() is None for r in refs), "an offloaded block input is still alive after forward"
        loss = (out.float() ** 2).mean()
        loss.backward()
        assert torch.equal(loss.detach(), loss_ref)
        for n, p in off.named_parameters():
            assert torch.equal(p.grad, grads_ref[n]), n  # same ops in the same order: bit-identical
            torch.testing.assert_close(p.grad, dict(plain.named_parameters())[n].grad, rtol=1e-4, atol=1e-6)
    assert offloader.offloaded_bytes == 2 * BLOCKS * input_bytes
    assert offloader.pool.allocated_bytes == BLOCKS * input_bytes  # allocated once, then reused
    assert offloader.pool.free_bytes() == BLOCKS * input_bytes  # every buffer came back

    # without offload the checkpoint keeps each block input alive until backward
    keep = _runner(base, True, False)
    seen = []
    hooked = keep.run_visual_blocks

    def spy(state):
        seen.append(weakref.ref(state.visual))
        return hooked(state)
    keep.run_visual_blocks = spy
    out = keep(*inputs)
    gc.collect()
    assert seen[0]() is not None
    del out


def test_offload_peak_memory_drop():
    """With the gradients allocated before the step (zeroed, not freed), the step allocates only
    activations; the peak is in the last block's backward, where checkpointing holds all L block
    inputs and offloading holds 2 (the block's own, copied back, and the next one, prefetched)."""
    base, inputs = _model(), _inputs(frames=8, side=32)
    input_bytes = 8 * 16 * 16 * base.config.model_dim * 4
    peaks = {}
    for name, ac, off in (("ac", True, False), ("ac+offload", True, True)):
        model = _runner(base, ac, off)
        _step(model, inputs)  # allocates the grads and the host buffers
        peaks[name] = peak_bytes(lambda: _step(model, inputs, set_to_none=False))
    drop = peaks["ac"] - peaks["ac+offload"]
    expected = (BLOCKS - 2) * input_bytes
    assert abs(drop - expected) <= 0.1 * expected, (peaks, drop, expected)


def test_host_pool_reuses_smallest_fit():
    pool = HostPool()
    a = pool.acquire(torch.Size([4, 8]), torch.float32)
    b = pool.acquire(torch.Size([100]), torch.float32)
    assert pool.allocated_bytes == (32 + 100) * 4
    pool.release(b)
    pool.release(a)
    c = pool.acquire(torch.Size([2, 10]), torch.float32)  # fits in a (32): the smallest that fits
    assert c.shape == (2, 10) and c.untyped_storage().nbytes() == 32 * 4
    assert pool.allocated_bytes == (32 + 100) * 4
    d = pool.acquire(torch.Size([3]), torch.bfloat16)  # another dtype: a new buffer
    assert d.dtype == torch.bfloat16 and pool.allocated_bytes == (32 + 100) * 4 + 6


def test_offload_switch_and_errors():
    cfg = get_config("tiny-cpu")
    assert cfg.parallel.offload is False and cfg.parallel.activation_checkpointing is False
    cfg = apply_overrides(cfg, ["parallel.offload=True", "parallel.activation_checkpointing=True"])
    assert cfg.parallel.offload and cfg.parallel.activation_checkpointing
    with pytest.raises(ValueError, match="parallel.offload"):
        apply_overrides(cfg, ["parallel.offload=1"])
    with pytest.raises(ValueError, match="needs parallel.activation_checkpointing"):
        install_block_runner(_model(2), None, False, True)
    # a second backward over offloaded inputs is refused with a message, not silently wrong
    model = _runner(_model(2), True, BlockInputOffloader())
    out = model(*_inputs())
    loss = (out.float() ** 2).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="unpacked twice"):
        loss.backward()
    # no grad: nothing is saved, nothing offloaded
    with torch.no_grad():
        model(*_inputs())
    assert model.block_input_offloader.offloaded_bytes == 2 * 2 * 8 * 8 * 64 * 4


def test_train_sp2_offload_matches_one_process(tmp_path):
    """``--sp 2`` on 2 processes (gloo) with checkpointing and offload gives the losses of one
    process without either (3 steps; steps 2 and 3 depend on the gradients)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max-steps", "3", "checkpoint.every=0"]
    run_train(one, *common, "checkpoint.export_ema=False")
    _torchrun(two, "--sp", "2", *common, "parallel.activation_checkpointing=True", "parallel.offload=True")
    assert_same_losses(losses(one), losses(two), range(1, 4), rtol=1e-5)
