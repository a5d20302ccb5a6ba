"""serfswap.ops.blocks: every element once, the pool threads taking part, errors raised."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from serfswap.ops.blocks import SERIAL_BLOCK, THREADED_BLOCK, _openmp, block_size, run_blocks
from serfswap.ops.formula import grad_times


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _waiting_for_a_helper(out: torch.Tensor, ran_on: set[int]):
    """A kernel factory whose kernels add 1 to their blocks; the first block of the caller and
    of a pool thread each wait until the other has started one, so that both take part whatever
    the timing (needs at least two blocks)."""
    caller = threading.get_ident()
    started = {True: threading.Event(), False: threading.Event()}  # keyed by "is the caller"

    def make_kernel(block: int):
        def kernel(begin: int, end: int) -> None:
            mine = threading.get_ident() == caller
            started[mine].set()
            assert started[not mine].wait(timeout=60), "the caller and a pool thread did not meet"
            out[begin:end] += 1  # in place: needs inference mode for an inference tensor
            ran_on.add(threading.get_ident())

        return kernel

    return make_kernel


def test_every_element_once_on_caller_and_pool(two_threads: None) -> None:
    n = 5 * THREADED_BLOCK + 7
    out = torch.zeros(n)
    ran_on: set[int] = set()
    run_blocks(n, _waiting_for_a_helper(out, ran_on))
    assert torch.equal(out, torch.ones(n))
    assert len(ran_on) == 2


def test_pool_threads_share_the_callers_inference_mode(two_threads: None) -> None:
    """An output made under inference_mode may be written only under it, in every thread."""
    n = 4 * THREADED_BLOCK
    ran_on: set[int] = set()
    with torch.inference_mode():
        out = torch.zeros(n)
        run_blocks(n, _waiting_for_a_helper(out, ran_on))
    assert torch.equal(out, torch.ones(n)) and len(ran_on) == 2


def test_every_thread_runs_aten_inline_and_the_caller_gets_its_count_back(
    two_threads: None,
) -> None:
    """With torch's OpenMP runtime found, each thread's ATen ops run inline (its OpenMP count
    1) during the blocks, so blocks can be cache-sized rather than below ATen's grain size; the
    caller's count is 2 again afterwards, and a forward in between still uses 2 threads."""
    if _openmp() is None:
        pytest.skip("torch is built without OpenMP here: blocks stay below the grain size")
    n = 4 * SERIAL_BLOCK
    assert block_size(n, 2, inline=True) == SERIAL_BLOCK // 2
    counts: dict[int, int] = {}
    out = torch.zeros(n)
    ran_on: set[int] = set()
    waiting = _waiting_for_a_helper(out, ran_on)

    def make_kernel(block: int):
        inner = waiting(block)

        def kernel(begin: int, end: int) -> None:
            counts[threading.get_ident()] = torch.get_num_threads()
            inner(begin, end)

        return kernel

    run_blocks(n, make_kernel)
    assert torch.equal(out, torch.ones(n)) and len(ran_on) == 2
    assert set(counts.values()) == {1} and len(counts) == 2
    assert torch.get_num_threads() == 2


def test_block_sizes() -> None:
    assert block_size(10**8, 1, inline=True) == SERIAL_BLOCK
    assert block_size(10**8, 2, inline=True) == SERIAL_BLOCK
    assert block_size(10**8, 2, inline=False) == THREADED_BLOCK
    assert block_size(10**5, 2, inline=True) == THREADED_BLOCK
    size = block_size(1_572_864, 2, inline=True)  # 8 x 128 x 1536: about 4 blocks a thread
    assert size % 64 == 0 and THREADED_BLOCK < size < SERIAL_BLOCK and 1_572_864 // size == 8


def test_one_thread_runs_big_blocks_inline() -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    spans: list[tuple[int, int, int]] = []
    try:
        run_blocks(
            SERIAL_BLOCK + 3,
            lambda block: lambda b, e: spans.append((threading.get_ident(), b, e)),
        )
    finally:
        torch.set_num_threads(saved)
    me = threading.get_ident()
    assert spans == [(me, 0, SERIAL_BLOCK), (me, SERIAL_BLOCK, SERIAL_BLOCK + 3)]


def test_an_error_in_any_thread_is_raised_and_the_pool_still_works(two_threads: None) -> None:
    def make_kernel(block: int):
        def kernel(begin: int, end: int) -> None:
            if begin == 2 * THREADED_BLOCK:
                raise ValueError("block 2 failed")

        return kernel

    with pytest.raises(ValueError, match="block 2 failed"):
        run_blocks(6 * THREADED_BLOCK, make_kernel)
    out = torch.zeros(3 * THREADED_BLOCK)
    run_blocks(out.numel(), lambda block: lambda b, e: out[b:e].fill_(1))
    assert torch.equal(out, torch.ones_like(out))


def _backward_in_child(queue, g: torch.Tensor, x: torch.Tensor) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do
    queue.put(grad_times(g, x).tolist())  # a list: tensors would be shared by fd


def test_a_one_thread_child_forked_after_the_pool_ran_computes(two_threads: None) -> None:
    """DataLoader workers are forked from a process whose backward made the pool. (A child that
    uses 2 threads hangs in ATen ops with or without serfswap's pool: torch's OpenMP.)"""
    x, g = torch.randn(4 * THREADED_BLOCK), torch.randn(4 * THREADED_BLOCK)
    expected = grad_times(g, x)  # the pool now exists in this process
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_backward_in_child, args=(queue, g, x))
    child.start()
    try:
        got = queue.get(timeout=120)
    finally:
        child.kill()
        child.join()
    assert got == expected.tolist()
