"""Benchmark session setup. Without CUDA, Triton kernels can only run on CPU tensors through the
interpreter, which must be chosen before triton is first imported: the GPU suite uses it in smoke mode
(``make test``) to test its own code at a toy shape. The CPU suites never select the Triton backend."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
