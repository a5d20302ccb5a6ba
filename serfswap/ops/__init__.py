"""The op: Serf itself (``x * erf(softplus(x))``), its autograd and custom op, and its fused
CUDA kernels. Everything else in serfswap puts this op somewhere or writes it out."""

# torch first, whichever module of this package is imported first: importing torch runs
# serfswap's post-import hook, which imports serfswap.ops.serf, which imports formula and
# blocks. Left to formula or blocks themselves, that import would start while they are half
# made (`from serfswap.ops import blocks` in a fresh interpreter failed so).
import torch  # noqa: F401
