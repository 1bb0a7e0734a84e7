"""One module per op: Triton kernels, launchers, the autograd Function / custom op, the public function."""
