"""Process group, DeviceMesh and FSDP2 for the CrossDiT, applied from outside the model.

``kandinsky_model`` never imports ``torch.distributed``; everything distributed lives here. The mesh
is a named 1-D mesh ``("dp_shard",)`` built with an explicit device type (``cpu`` or ``cuda``: a gloo
group on a GPU host must not move the model to CUDA, pytorch#132471). The sequence-parallel issue
extends :func:`build_mesh` with an ``sp`` dimension and shards over the flattened ``dp_shard x sp``.

A run started without ``torchrun`` gets a single-process gloo group (HashStore), so one code path
(FSDP2, DCP) serves 1 and N processes.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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


def build_mesh(device_type: str) -> DeviceMesh:
    """The data-parallel mesh over every rank, named ``dp_shard``."""
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp_shard",))


def mixed_precision_policy(mode: str, device_type: str) -> MixedPrecisionPolicy | None:
    """``auto``: bf16 params + fp32 gradient reduction on CUDA, plain fp32 on CPU.

    Forward inputs are not cast by FSDP (``cast_forward_inputs=False``): the loop passes latents and
    text in bf16 itself and keeps the timestep (1000 t) in fp32, which bf16 would round to ~4 units."""
    if mode == "bf16" or (mode == "auto" and device_type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return None


def parallelize_dit(model: torch.nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None):
    """``fully_shard`` each text-refiner and CrossDiT block, then the root (embeddings, output layer)."""
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in list(model.text_transformer_blocks) + list(model.visual_transformer_blocks):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def build_sharded_dit(config, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None, device: torch.device,
                      seed: int) -> torch.nn.Module:
    """The CrossDiT built on the meta device, sharded, then filled from rank 0.

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
    parallelize_dit(model, mesh, mp_policy)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    torch.manual_seed(seed)  # every rank leaves with the same RNG state
    return model
