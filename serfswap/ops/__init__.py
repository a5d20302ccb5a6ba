"""The op: Serf itself (``x * erf(softplus(x))``), its autograd and custom op, and its fused
CUDA kernels. Everything else in serfswap puts this op somewhere or writes it out."""
