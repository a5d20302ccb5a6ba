"""Elementwise CPU work over blocks, shared between threads by the blocks themselves.

Why not ATen's own threads: an ATen op on a large tensor is one parallel region (OpenMP) that
splits the elements evenly between the threads and ends in a barrier. The op's kernels make
several passes per block (the backward seven) so that each block's working set stays in cache;
blocks of 2^18 elements made every pass its own region, about 340 barriers per call on a
16x256x56x56 tensor. On a quiet CPU that costs little. On a shared one, each barrier waits for
whichever thread the OS has descheduled (while the other spins), and forward+backward measured
1.45x to 14.2x ``F.mish`` with 2 threads and one busy neighbour (issue 30).

Here, blocks are smaller than ATen's grain size (32768 elements), so each ATen op on a block runs
inline in the thread that calls it, with no parallel region at all; ``torch.get_num_threads()``
threads (the caller and pool threads) take blocks from one shared counter until none is left. A
descheduled thread holds up only the block it has; the others take the rest, and nothing waits
on a barrier but the caller, once, at the end. ATen releases the GIL inside each op, so Python
holds it only for the calls (about a seventh of each block's time on the CI machine), which
bounds the speed-up to about seven threads (not measured beyond two cores). With one thread,
blocks stay at 2^18 elements: no pool, no parallel region, and fewer Python calls.

What was measured against it (benchmarks/RESULTS.md): the same blocks as whole-tensor passes
(seven regions per call, but 1.6x slower: out of cache); a ``torch.compile``'d kernel (one
region per call, but it needs a C++ compiler and Python headers where the user runs, and
compiles on first use); a C++ extension (a build step for every user: not an option).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# Elements per block with one thread: the block's passes stay in cache (1 MB of float32).
SERIAL_BLOCK = 1 << 18
# Elements per block with several threads: the largest multiple of 64 below ATen's grain size
# (at::internal::GRAIN_SIZE, 32768), under which an elementwise op never opens a parallel region.
# A multiple of 64 so that every block but the tensor's last runs ATen's vectorised loop only
# (its scalar remainder loop rounds differently), whatever the split.
THREADED_BLOCK = 32768 - 64

# Builds one thread's kernel: called once per participating thread (so scratch buffers are per
# thread), the kernel then computes elements [begin, end).
KernelFactory = Callable[[int], Callable[[int, int], None]]

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (its thread count, the pool)
_pool_lock = threading.Lock()


def _helper_pool(helpers: int) -> ThreadPoolExecutor:
    """The process's pool of ``helpers`` threads, made again if the thread count changed."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != helpers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)  # its threads end once idle
            _pool = helpers, ThreadPoolExecutor(helpers, thread_name_prefix="serfswap-cpu")
        return _pool[1]


def _forget_pool() -> None:
    """After fork the child has none of the parent's threads: start a new pool when needed."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


class _Blocks:
    """The shared counter: hands out block indices and tells the caller when all are done."""

    def __init__(self, n: int, block: int, make_kernel: KernelFactory) -> None:
        self.n, self.block, self.make_kernel = n, block, make_kernel
        self.count = -(-n // block)
        self.next = 0
        self.running = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.caller = threading.get_ident()
        # Pool threads have none of the caller's thread-local dispatch state (a custom op's
        # kernel runs below autograd); an output made under inference_mode may be written only
        # under it, so they take that mode from the caller, and no_grad otherwise.
        self.inference = torch.is_inference_mode_enabled()

    def _claim(self) -> int | None:
        with self.lock:
            if self.next < self.count and self.error is None:
                self.next += 1
                self.running += 1
                return self.next - 1
            if self.running == 0:
                self.done.set()
            return None

    def _finish(self, error: BaseException | None) -> None:
        with self.lock:
            self.running -= 1
            if error is not None and self.error is None:
                self.error = error
            if self.running == 0 and (self.next >= self.count or self.error is not None):
                self.done.set()

    def work(self) -> None:
        """Run blocks until none is left: on the caller and on each pool thread."""
        if threading.get_ident() == self.caller:  # its modes are the right ones already
            self._run()
            return
        with torch.inference_mode() if self.inference else torch.no_grad():
            self._run()

    def _run(self) -> None:
        kernel = None
        while (index := self._claim()) is not None:
            error = None
            try:
                if kernel is None:
                    kernel = self.make_kernel(min(self.block, self.n))
                begin = index * self.block
                kernel(begin, min(begin + self.block, self.n))
            except BaseException as exc:  # handed to the caller, which raises it
                error = exc
            self._finish(error)


def run_blocks(n: int, make_kernel: KernelFactory) -> None:
    """Compute elements ``[0, n)`` block by block on ``torch.get_num_threads()`` threads.

    ``make_kernel(block)`` is called once per thread that takes part, with the largest block it
    will get; the kernel it returns is called with each block's ``(begin, end)``. Blocks are
    disjoint, so kernels that write only their own elements need no locking. Returns when every
    block is done; an exception from any thread is raised here. Kernels must use only tensors
    that carry no autograd (``detach()`` them: that drops forward-mode tangents too), since pool
    threads do not run below autograd as a custom op's kernel does.
    """
    threads = torch.get_num_threads()
    block = SERIAL_BLOCK if threads == 1 else THREADED_BLOCK
    blocks = _Blocks(n, block, make_kernel)
    helpers = min(threads, blocks.count) - 1
    if helpers > 0:
        pool = _helper_pool(threads - 1)
        for _ in range(helpers):
            pool.submit(blocks.work)
    blocks.work()
    blocks.done.wait()
    if blocks.error is not None:
        raise blocks.error
