"""Glue between kandinsky-kernels and other libraries; each submodule imports its library lazily.

- :mod:`kandinsky_kernels.integrations.diffusers`: ``enable_nabla`` / ``disable_nabla`` switch the
  self-attention of diffusers' ``Kandinsky5Transformer3DModel`` and ``WanTransformer3DModel`` to
  fractal reordering + NABLA + block-sparse attention through diffusers' attention processors.
"""
