"""Process group, DeviceMesh, Ulysses sequence parallelism, activation checkpointing and FSDP2 for
the CrossDiT, all applied from outside the model.

``kandinsky_model`` never imports ``torch.distributed``; everything distributed lives here. One named
mesh ``(replicate, shard, sp)`` is built once (:class:`ParallelDims`, :func:`build_mesh`) with an
explicit device type (``cpu`` or ``cuda``: a gloo group on a GPU host must not move the model to
CUDA, pytorch#132471), and its flattened views are made there too:

- ``dp`` = replicate x shard: the data-parallel ranks (each reads its own batches; the sp ranks of
  one ``dp`` coordinate read the same batch);
- ``shard_sp`` = shard x sp: what FSDP2 shards the parameters over. The sp ranks must sum their
  gradients (each saw a slice of the tokens), and FSDP's reduce-scatter over ``shard_sp`` does that
  in the same collective, as torchtitan shards over ``dp_shard x cp``. With ``replicate > 1`` FSDP
  gets the 2-D ``(replicate, shard_sp)`` mesh (HSDP).

Sequence parallelism (Ulysses, :class:`UlyssesSP`) replaces the model's ``run_visual_blocks`` stage on
the instance: the tokens after the patch embedding (and the RoPE table, the per-frame conditioning,
the packed-video offsets and text rows) are sliced to this rank's S / sp, the blocks run on the
slice, and the tokens are all-gathered before the output layer. Inside each block the visual
self-attention goes through ``AttentionContext.self_attention_hook``: one all-to-all moves q, k, v
(stacked) from sequence-sharded to head-sharded, the unchanged backend (dense per video, or NABLA on
all tokens of its heads in fractal order) attends, one all-to-all moves the result back.
Cross-attention and the MLP are token-local and need nothing.

A run started without ``torchrun`` gets a single-process gloo group (HashStore), so one code path
(FSDP2, DCP) serves 1 and N processes.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from kandinsky_model.attention import AttentionContext, Packing, self_attention

from .offload import BlockInputOffloader


def init_distributed(device_type: str, timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise the default process group once -> (rank, world size)."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class ParallelDims:
    """The rank layout: ``replicate x shard x sp == world`` (sp innermost: the sp ranks of one batch
    are neighbours, inside one node / NVLink island)."""

    replicate: int
    shard: int
    sp: int

    @classmethod
    def from_config(cls, parallel, world_size: int, num_heads: int | None = None) -> "ParallelDims":
        """``parallel`` (a ``ParallelConfig``) and the world size -> dims; ``shard`` is inferred.
        Raises ValueError naming what was passed when the factors do not divide."""
        r, sp = parallel.replicate, parallel.sp
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be a positive int, got {world_size!r}")
        if world_size % (r * sp):
            raise ValueError(f"world size {world_size} is not divisible by parallel.replicate x parallel.sp "
                             f"= {r} x {sp} = {r * sp}; the mesh is (replicate, shard, sp) with shard "
                             f"= world / (replicate x sp)")
        if num_heads is not None and num_heads % sp:
            raise ValueError(f"parallel.sp = {sp} must divide the model's {num_heads} attention heads "
                             f"(Ulysses gives each sp rank heads / sp heads)")
        return cls(r, world_size // (r * sp), sp)

    @property
    def world(self) -> int:
        return self.replicate * self.shard * self.sp

    @property
    def dp(self) -> int:
        """Data-parallel ranks (distinct batches per step)."""
        return self.replicate * self.shard


@dataclass(frozen=True)
class ParallelMesh:
    """The root mesh and the views the harness uses, made once (:func:`build_mesh`). The flattened
    views are kept here rather than sliced from the root again (deprecated since torch 2.11)."""

    root: DeviceMesh
    """``(replicate, shard, sp)``."""
    dp: DeviceMesh
    """replicate x shard flattened: data-parallel ranks."""
    shard_sp: DeviceMesh
    """shard x sp flattened: what FSDP shards over."""
    dims: ParallelDims

    @property
    def sp(self) -> DeviceMesh:
        return self.root["sp"]

    @property
    def fsdp(self) -> DeviceMesh:
        """FSDP's mesh: ``shard_sp`` (1-D), or ``(replicate, shard_sp)`` (HSDP) when replicate > 1."""
        if self.dims.replicate > 1:
            return self.root["replicate", "shard_sp"]
        return self.shard_sp

    def dp_rank_world(self) -> tuple[int, int]:
        """(this rank's data-parallel index, data-parallel size): what the loader shards batches by;
        the sp ranks of one index read the same batches."""
        return self.dp.get_local_rank(), self.dp.size()


def build_mesh(device_type: str, dims: ParallelDims | None = None) -> ParallelMesh:
    """The one named mesh ``(replicate, shard, sp)`` over every rank, with its flattened views
    ``dp`` (replicate x shard) and ``shard_sp`` (shard x sp) created here, once, on every rank (the
    flattening is collective; torchtitan#518). ``dims`` None: plain FSDP over all ranks."""
    world = dist.get_world_size()
    if dims is None:
        dims = ParallelDims(1, world, 1)
    if dims.world != world:
        raise ValueError(f"ParallelDims {dims} covers {dims.world} ranks but the world size is {world}")
    root = init_device_mesh(device_type, (dims.replicate, dims.shard, dims.sp),
                            mesh_dim_names=("replicate", "shard", "sp"))
    dp = root["replicate", "shard"]._flatten("dp")
    shard_sp = root["shard", "sp"]._flatten("shard_sp")
    return ParallelMesh(root, dp, shard_sp, dims)


# ------------------------------------------------------------------------------ Ulysses SP + AC
# The outputs of the all-to-alls (and their waits) are saved by the checkpoint policy: recomputing a
# block in backward must not communicate again (measured: full AC re-runs them, training_infra.md 1.3).
_SAVE_OPS = {
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops._c10d_functional_autograd.all_to_all_single.default,
    torch.ops._c10d_functional.wait_tensor.default,
}


def _sac_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _sac_context():
    return create_selective_checkpoint_contexts(_sac_policy)


class _GatherTokens(torch.autograd.Function):
    """All-gather (B, S/sp, D) -> (B, S, D) along the tokens; backward: this rank's slice times sp,
    with no communication.

    Every sp rank computes the same output layer and loss from the same gathered tensor, so the
    upstream gradient is identical on all of them and its slice is the true gradient of the local
    tokens. The factor sp makes every parameter gradient a share whose sum over the sp ranks is sp x
    the gradient of that batch, for the block parameters (each rank saw S/sp tokens) as for the
    output layer (each rank saw them all): FSDP's reduce-scatter, averaging over dp x sp ranks,
    then yields the mean over the dp batches, as without sp. (A reduce-scatter backward would give
    the same sum, at the price of a collective.)"""

    @staticmethod
    def forward(ctx, x, group, size, rank):
        ctx.size, ctx.rank, ctx.local = size, rank, x.shape[1]
        y = funcol.all_gather_single(x.contiguous(), gather_dim=1, group=group)
        return funcol.wait_tensor(y)

    @staticmethod
    def backward(ctx, grad):
        lo = ctx.rank * ctx.local
        return grad[:, lo:lo + ctx.local] * ctx.size, None, None, None


class UlyssesSP:
    """Ulysses sequence parallelism over one process group of ``size`` ranks (the mesh's ``sp``).

    :meth:`shard` cuts a :class:`~kandinsky_model.dit.ForwardState` to this rank's tokens,
    :meth:`gather` restores all tokens, :meth:`attend` is the self-attention hook (2 all-to-alls)."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    @classmethod
    def from_mesh(cls, mesh: ParallelMesh) -> "UlyssesSP":
        sp = mesh.sp
        return cls(sp.get_group(), sp.size(), sp.get_local_rank())

    def _a2a(self, x: torch.Tensor) -> torch.Tensor:
        """(size, ...) -> (size, ...): chunk j goes to rank j, chunk j of the result came from rank j."""
        return funcol.all_to_all_single_autograd(x, None, None, self.group)

    def attend(self, q, k, v, ctx):
        """q, k, v (B, S/sp, H, Dh) of this rank's tokens -> (B, S/sp, H, Dh), attending over all S
        tokens with ``ctx`` (the full-sequence context: packing, NABLA grid state)."""
        n = self.size
        b, sl, h, dh = q.shape
        # one all-to-all for q, k and v: (n, 3, B, S/n, H/n, Dh), chunk j = head group j
        x = torch.stack([q, k, v]).unflatten(3, (n, h // n)).permute(3, 0, 1, 2, 4, 5).contiguous()
        x = self._a2a(x)  # chunk j = rank j's tokens, this rank's heads
        q, k, v = x.permute(1, 2, 0, 3, 4, 5).reshape(3, b, n * sl, h // n, dh).unbind(0)
        out = self_attention(q, k, v, ctx)  # all tokens (fractal order for NABLA), H/n heads
        o = out.unflatten(1, (n, sl)).transpose(0, 1).contiguous()  # (n, B, S/n, H/n, Dh): j = tokens j
        o = self._a2a(o)  # chunk j = head group j of this rank's tokens
        return o.permute(1, 2, 0, 3, 4).reshape(b, sl, h, dh)

    def shard(self, state, num_heads: int):
        """-> (h, text, time_embed, rope, ctx) of this rank's S/sp tokens for the block stack."""
        n, r = self.size, self.rank
        b, s, _ = state.visual.shape
        if num_heads % n:
            raise ValueError(f"sequence parallelism over sp = {n} ranks needs the heads to divide: the "
                             f"model has {num_heads} heads")
        if s % n:
            what = "fractal order, padded to 8x8 tiles" if state.fractal else "row-major"
            raise ValueError(f"sequence parallelism over sp = {n} ranks needs the visual token count to "
                             f"divide: this batch has S = {s} tokens (grid T', H', W' = {state.grid}, "
                             f"{what}), not a multiple of {n}")
        sl = s // n
        lo, hi = r * sl, (r + 1) * sl
        ctx = state.ctx
        h = state.visual[:, lo:hi]
        rope = tuple(t[:, lo:hi] for t in state.rope)
        te = state.time_embed
        if te.dim() == 3:
            # per-frame conditioning (1, T', E) of packed videos: the slice may start and end inside
            # a frame, so give one row per run of g tokens (g divides both the slice and a frame);
            # the blocks broadcast a row over its run exactly as over a frame
            per_frame = s // te.shape[1]
            g = math.gcd(sl, per_frame)
            te = te[:, torch.arange(lo, hi, g, device=te.device) // per_frame]
        text, text_mask, packing = state.text, ctx.text_mask, None
        if ctx.packing is not None:
            # the videos overlapping [lo, hi), as offsets into the slice, and their text rows
            cu = ctx.packing.cu_tokens
            rows, ends = [], []
            for i, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
                if max(a, lo) < min(e, hi):
                    rows.append(i)
                    ends.append(min(e, hi) - lo)
            text = text[rows[0]:rows[-1] + 1]
            if text_mask is not None:
                text_mask = text_mask[rows[0]:rows[-1] + 1]
            cu_local = (0, *ends)
            packing = Packing(cu_local, torch.tensor(cu_local, dtype=torch.int32, device=h.device))
        local = AttentionContext(backend=ctx.backend, text_mask=text_mask, nabla=ctx.nabla, packing=packing,
                                 self_attention_hook=functools.partial(self.attend, ctx=ctx))
        return h, text, te, rope, local

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        return _GatherTokens.apply(h, self.group, self.size, self.rank)


def install_block_runner(model: torch.nn.Module, sp: UlyssesSP | None, activation_checkpointing: bool,
                         offload: bool | BlockInputOffloader = False):
    """Replace ``model.run_visual_blocks`` (on this instance) by one that shards the tokens over
    ``sp`` (when given, size > 1), checkpoints each block (when asked) and offloads each checkpointed
    block's input to the host between forward and backward (``offload``: True or a
    :class:`~training.offload.BlockInputOffloader`; needs ``activation_checkpointing``). Parameter
    names and the state dict do not change (no wrapper modules), so checkpoints and the EMA export
    are unaffected. The offloader, if any, is kept as ``model.block_input_offloader``."""
    if offload and not activation_checkpointing:
        raise ValueError("parallel.offload needs parallel.activation_checkpointing=True: the offloaded "
                         "tensor is each checkpointed block's input")
    if (sp is None or sp.size == 1) and not activation_checkpointing:
        return model
    blocks = model.visual_transformer_blocks
    num_heads = model.config.num_heads
    use_sp = sp is not None and sp.size > 1
    offloader = None
    if offload:
        offloader = offload if isinstance(offload, BlockInputOffloader) else BlockInputOffloader()
        model.block_input_offloader = offloader

    def run_visual_blocks(state):
        if use_sp:
            h, text, te, rope, ctx = sp.shard(state, num_heads)
        else:
            h, text, te, rope, ctx = state.visual, state.text, state.time_embed, state.rope, state.ctx
        run = offloader.new_run() if offloader is not None else None
        for block in blocks:
            if activation_checkpointing:
                with offloader.block(run, h) if offloader is not None else contextlib.nullcontext():
                    h = checkpoint(block, h, text, te, rope, ctx, use_reentrant=False, context_fn=_sac_context)
            else:
                h = block(h, text, te, rope, ctx)
        if offloader is not None and torch.is_grad_enabled():
            offloader.prefetch_on_grad(run, h)
        return sp.gather(h) if use_sp else h

    model.run_visual_blocks = run_visual_blocks
    return model


def mixed_precision_policy(mode: str, device_type: str) -> MixedPrecisionPolicy | None:
    """``auto``: bf16 params + fp32 gradient reduction on CUDA, plain fp32 on CPU.

    Forward inputs are not cast by FSDP (``cast_forward_inputs=False``): the loop passes latents and
    text in bf16 itself and keeps the timestep (1000 t) in fp32, which bf16 would round to ~4 units."""
    if mode == "bf16" or (mode == "auto" and device_type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return None


def parallelize_dit(model: torch.nn.Module, mesh: ParallelMesh, mp_policy: MixedPrecisionPolicy | None,
                    activation_checkpointing: bool = False, offload: bool = False):
    """In torchtitan's order: sequence parallelism over ``mesh["sp"]``, activation checkpointing
    per CrossDiT block and the host offload of the blocks' inputs (:func:`install_block_runner`), then ``fully_shard`` over ``mesh.fsdp``
    on each text-refiner and CrossDiT block and on the root (embeddings, output layer)."""
    sp = UlyssesSP.from_mesh(mesh)
    install_block_runner(model, sp, activation_checkpointing, offload)
    kwargs = {"mesh": mesh.fsdp}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in list(model.text_transformer_blocks) + list(model.visual_transformer_blocks):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def build_sharded_dit(config, mesh: ParallelMesh, mp_policy: MixedPrecisionPolicy | None, device: torch.device,
                      seed: int, activation_checkpointing: bool = False, offload: bool = False) -> torch.nn.Module:
    """The CrossDiT built on the meta device, parallelized (:func:`parallelize_dit`), then filled from
    rank 0.

    Rank 0 alone builds the full fp32 model on the CPU (``torch.manual_seed(seed)``, the model's own
    init), every rank builds it on meta, applies FSDP2 and allocates only its shards; then
    ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` sends each tensor from
    rank 0 and keeps the local shard. So the weights equal ``CrossDiT(config)`` under that seed for
    any world size, and only rank 0 needs host memory for the whole model (4 bytes per parameter).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from kandinsky_model import CrossDiT

    full = {}
    if dist.get_rank() == 0:
        torch.manual_seed(seed)
        full = CrossDiT(config).state_dict()
    model = CrossDiT.on_meta(config)
    parallelize_dit(model, mesh, mp_policy, activation_checkpointing, offload)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    torch.manual_seed(seed)  # every rank leaves with the same RNG state
    return model
