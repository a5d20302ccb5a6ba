"""Elementwise CPU work over blocks, shared between threads by the blocks themselves.

Why not ATen's own threads: an ATen op on a large tensor is one parallel region (OpenMP) that
splits the elements evenly between the threads and ends in a barrier. The op's kernels make
several passes per block (the backward seven) so that each block's working set stays in cache;
blocks of 2^18 elements made every pass its own region, about 340 barriers per call on a
16x256x56x56 tensor. On a quiet CPU that costs little. On a shared one, each barrier waits for
whichever thread the OS has descheduled (while the other spins), and forward+backward measured
1.45x to 14.2x ``F.mish`` with 2 threads and one busy neighbour (issue 30).

Here each ATen op on a block runs inline in the thread that calls it, with no parallel region at
all, and ``torch.get_num_threads()`` threads (the caller and pool threads) take blocks from one
shared counter until none is left. A descheduled thread holds up only the block it has; the
others take the rest, and nothing waits on a barrier but the caller, once, at the end. ATen
runs an op inline when its thread's OpenMP thread count is 1: the pool threads set theirs to 1
when they start, and the caller sets its own to 1 for the call and back after
(``omp_set_num_threads`` of torch's OpenMP runtime sets the calling thread's count only). Blocks
are then up to 2^18 elements, as with one thread. Where that runtime cannot be found (torch
built without OpenMP), blocks stay below ATen's grain size (32768 elements), under which an op
never opens a parallel region; but then each block's seven Python calls, with two threads
taking the GIL in turn, cost about 10 us of CPU each, and the backward with 2 threads on a
quiet CPU measured 1.4x ``mish_backward`` (82 ms with 1 thread, 58 ms with 2).

What was measured against it (benchmarks/RESULTS.md): the same blocks as whole-tensor passes
(seven regions per call, but 1.6x slower: out of cache); a ``torch.compile``'d kernel (one
region per call, but it needs a C++ compiler and Python headers where the user runs, and
compiles on first use); a C++ extension (a build step for every user: not an option).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

# The largest block: its passes stay in cache (1 MB of float32).
SERIAL_BLOCK = 1 << 18
# The smallest block with several threads: the largest multiple of 64 below ATen's grain size
# (at::internal::GRAIN_SIZE, 32768), under which an elementwise op never opens a parallel region,
# whatever the thread's OpenMP count. Every block size is a multiple of 64 so that every block
# but the tensor's last runs ATen's vectorised loop only (its scalar remainder loop rounds
# differently), whatever the split.
THREADED_BLOCK = 32768 - 64
# OpenMP runtimes torch may be linked with, by file name (GNU, Intel, LLVM, MSVC).
_OPENMP_LIBRARIES = ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.dylib",
                     "libiomp5md.dll", "vcomp140.dll")  # fmt: skip

# Builds one thread's kernel: called once per participating thread (so scratch buffers are per
# thread), the kernel then computes elements [begin, end).
KernelFactory = Callable[[int], Callable[[int, int], None]]

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (its thread count, the pool)
_pool_lock = threading.Lock()


def _loaded_openmp() -> list[str]:
    """Paths of the OpenMP runtimes this process has loaded (Linux): wheels may bundle theirs
    under another file name (``libgomp-<hash>.so.1``), which the names below would miss."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith((".so", ".so.1"))}
    except OSError:
        return []
    return sorted(
        p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))
    )


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """torch's OpenMP runtime, if setting this thread's OpenMP count to 1 there makes ATen see 1
    thread here (checked once, on the first caller, and set back); else None. Only a library
    the process has loaded already is opened (``RTLD_NOLOAD``): none is loaded for this."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in (*_loaded_openmp(), *_OPENMP_LIBRARIES):
        try:
            library = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0))
            library.omp_get_max_threads.restype = ctypes.c_int
            library.omp_set_num_threads.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            continue
        with _aten_inline(library):
            if torch.get_num_threads() == 1:
                return library
    return None


def _one_openmp_thread(omp: ctypes.CDLL) -> int:
    """Set this thread's OpenMP thread count to 1, so that ATen runs its ops inline here;
    returns the count it had."""
    torch.get_num_threads()  # ATen sets each thread's count on first use: after that, not over ours
    saved = omp.omp_get_max_threads()
    omp.omp_set_num_threads(1)
    return saved


@contextlib.contextmanager
def _aten_inline(omp: ctypes.CDLL) -> Iterator[None]:
    """ATen ops run inline on this thread until the block ends."""
    saved = _one_openmp_thread(omp)
    try:
        yield
    finally:
        omp.omp_set_num_threads(saved)


def _inline_for_good() -> None:
    """A pool thread's initializer: its ATen ops run inline from now on (it only runs blocks)."""
    omp = _openmp()
    if omp is not None:
        _one_openmp_thread(omp)


def _helper_pool(helpers: int) -> ThreadPoolExecutor:
    """The process's pool of ``helpers`` threads, made again if the thread count changed."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != helpers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)  # its threads end once idle
            _pool = (
                helpers,
                ThreadPoolExecutor(
                    helpers, thread_name_prefix="serfswap-cpu", initializer=_inline_for_good
                ),
            )
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


def block_size(n: int, threads: int, *, inline: bool) -> int:
    """Elements per block: :data:`SERIAL_BLOCK` with one thread; with more, about four blocks
    per thread (so that a descheduled thread's block is a small share), a multiple of 64
    between :data:`THREADED_BLOCK` and :data:`SERIAL_BLOCK` when ATen runs inline on every
    thread (``inline``), else :data:`THREADED_BLOCK`."""
    if threads == 1:
        return SERIAL_BLOCK
    if not inline:
        return THREADED_BLOCK
    return min(SERIAL_BLOCK, max(THREADED_BLOCK, n // (4 * threads) // 64 * 64))


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
    omp = _openmp() if threads > 1 else None
    blocks = _Blocks(n, block_size(n, threads, inline=omp is not None), make_kernel)
    helpers = min(threads, blocks.count) - 1
    if helpers > 0:
        pool = _helper_pool(threads - 1)
        for _ in range(helpers):
            pool.submit(blocks.work)
    with _aten_inline(omp) if omp is not None else contextlib.nullcontext():
        blocks.work()
    blocks.done.wait()
    if blocks.error is not None:
        raise blocks.error
