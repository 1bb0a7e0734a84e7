"""training: flow-matching training of the Kandinsky 5.0 CrossDiT (torchtitan-style layout).

- :mod:`training.config`: typed, self-validating dataclass configs, the registry (``tiny-cpu`` and
  the Video Lite / Video Pro stages of the report's Table 4), dotted ``key=value`` overrides and a
  meta-device memory estimate (``python -m training.config NAME --world N``);
- :mod:`training.data`: ``.tar`` latent shards through fsspec (local or ``s3://``), per-aspect-ratio
  buckets packed along T under a frame budget (cu_frames), rank-sharded resumable batch plan, ``python -m training.data.write_shards``;
- :mod:`training.objective`: x_t = (1 - t) x0 + t eps, target eps - x0, 1000 t, T2I/T2V/I2V mixing,
  null-text dropout;
- :mod:`training.parallelize`: process group, named DeviceMesh, Ulysses SP, activation checkpointing,
  FSDP2 per block + root, mixed precision;
- :mod:`training.offload`: host offload of each checkpointed block's input (side stream, pinned pooled
  buffers, prefetch one block ahead in backward), ``parallel.offload``;
- :mod:`training.memory`: peak memory of a piece of work (CUDA allocator, or the profiler's
  allocation events on the CPU);
- :mod:`training.costmodel`: the report's equations 1 and 2 beside a measured run
  (``python -m training.costmodel --config NAME``);
- :mod:`training.checkpoint`: DCP async checkpoints with a complete marker, keep-last-k, EMA export;
- :mod:`training.train`: the loop (``python -m training.train --config tiny-cpu ...``, or under torchrun).

``kandinsky_model`` never imports ``torch.distributed``; everything distributed lives here.
"""
