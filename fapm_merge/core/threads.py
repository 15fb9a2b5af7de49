"""Run the kernel's chunks on a pool of threads, each doing torch work on one core.

Why: every torch op on a CPU tensor above 32K entries is an OpenMP parallel region
over all ``torch.get_num_threads()`` threads, ending in a barrier. The kernel
streams cache-sized chunks, so a 1B-parameter merge runs ~10^5 such regions, and on
a machine where another process holds a core each barrier waits for a descheduled
thread: measured, a CPU-bound neighbour made ``fapm`` 4.9x slower while
``task_arithmetic`` (a few large ops per tensor) lost 1.5x. Here each worker runs
whole chunks with its own torch ops on one thread (OpenMP's thread count is a
per-thread setting), and idle workers take the next chunk, so a slow core delays
one chunk, not every op.

The workers never change a result: every chunk is computed by the same ops as in
the calling thread, and results are combined in chunk order.

Budget: at most ``torch.get_num_threads()`` workers (the user's OMP_NUM_THREADS or
``torch.set_num_threads``) run one call's chunks; the caller waits meanwhile, so
the process never runs more kernel threads than that. One pool is shared by all
callers (mergekit's ``--multi-gpu`` runs kernels in several threads), so the total
stays bounded by the largest budget asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch

T = TypeVar("T")

_LOCK = threading.Lock()
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_USABLE: Optional[bool] = None  # None: not probed yet
_local = threading.local()  # per thread: the caller's budget, or "a pool worker"


def _omp_set_num_threads() -> Optional[Callable[[int], None]]:
    """torch's own ``omp_set_num_threads``, or None where it cannot be reached.

    Looked up through torch's extension module, whose dependencies include the
    OpenMP runtime torch was built with (the same copy, not a system one).
    """
    try:
        setter = ctypes.CDLL(torch._C.__file__).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], None
    return setter


def _one_thread_here() -> None:
    """Pool initializer: torch ops of this thread run on one thread."""
    _local.in_worker = True  # a kernel called from here runs inline, never nests
    setter = _omp_set_num_threads()
    # torch sets each thread's OpenMP count on the thread's first use of it; do
    # that first, or it would later overwrite ours.
    torch.get_num_threads()
    if setter is not None:
        setter(1)


def _pool(size: int) -> Optional[ThreadPoolExecutor]:
    """The shared pool with room for ``size`` workers (call under ``_LOCK``), or
    None if torch ops cannot be made single-threaded in a worker (a torch built
    without OpenMP, or an OpenMP runtime that ctypes cannot reach)."""
    global _POOL, _POOL_SIZE, _USABLE
    if _USABLE is False:
        return None
    if _POOL is None or _POOL_SIZE < size:
        old = _POOL
        # Threads start only when work is submitted; the size is a ceiling.
        _POOL_SIZE = max(size, os.cpu_count() or 1)
        _POOL = ThreadPoolExecutor(
            _POOL_SIZE, thread_name_prefix="fapm-kernel", initializer=_one_thread_here
        )
        if old is not None:
            old.shutdown(wait=False)  # work already submitted to it still runs
    if _USABLE is None:
        _USABLE = _POOL.submit(torch.get_num_threads).result() == 1
        if not _USABLE:
            _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = None, 0
            return None
    return _POOL


def worker_count(tensor: torch.Tensor, chunks: int, min_chunks: int = 2) -> int:
    """How many pool workers a call on ``tensor`` with ``chunks`` chunks uses.

    0 means: run in the calling thread (GPU tensors, fewer than ``min_chunks``
    chunks, one torch thread, or no way to make workers single-threaded).
    ``min_chunks=1`` sends even one chunk to a worker: for reductions whose bits
    must not depend on how torch would split them over threads.
    """
    if tensor.device.type != "cpu" or chunks < min_chunks or getattr(_local, "in_worker", False):
        return 0
    budget = _budget()
    if budget < 2:
        return 0
    workers = min(budget, chunks)
    with _LOCK:
        return workers if _pool(workers) is not None else 0


def _budget() -> int:
    """The calling thread's torch thread count, as it was before `caller_on_one_thread`."""
    return getattr(_local, "budget", 0) or torch.get_num_threads()


@contextlib.contextmanager
def caller_on_one_thread(tensor: torch.Tensor) -> Iterator[None]:
    """For the ``with`` block, the calling thread's own torch ops run on one thread.

    The big passes go to the pool; what stays in the caller (scoring a sample,
    ``kthvalue`` on the band, a few small copies) would otherwise be parallel
    regions of the caller's torch threads, each a barrier that stalls on a busy
    machine. `worker_count` still sees the caller's budget. The caller's count is
    restored on exit; no other thread is affected (OpenMP's count is per thread).
    Does nothing for GPU tensors, one torch thread, or where the pool is unusable.
    """
    budget = torch.get_num_threads()
    if getattr(_local, "budget", 0) or worker_count(tensor, chunks=2) == 0:
        yield  # nested, or nothing to do
        return
    setter = _omp_set_num_threads()
    assert setter is not None, "a usable pool implies a reachable setter"
    _local.budget = budget
    setter(1)
    try:
        yield
    finally:
        setter(budget)
        _local.budget = 0


def map_chunks(
    run: Callable[[object, int, int], T],
    bounds: Sequence[Tuple[int, int]],
    workers: int,
    scratch: Callable[[], object] = lambda: None,
) -> List[T]:
    """``[run(state, start, end) for start, end in bounds]``, in that order.

    Args:
        run (`Callable`): computes one chunk; ``state`` is the scratch of the
            thread running it (never shared between threads).
        bounds (`Sequence[Tuple[int, int]]`): the chunks.
        workers (`int`): from `worker_count`; 0 runs everything in the calling
            thread with its own torch threads.
        scratch (`Callable`, defaults to no scratch): makes one thread's state.

    The first exception raised by a chunk is raised here, after the other workers
    have stopped taking chunks.
    """
    results: List[Optional[T]] = [None] * len(bounds)
    if workers == 0:
        state = scratch()
        for i, (start, end) in enumerate(bounds):
            results[i] = run(state, start, end)
        return results  # type: ignore[return-value]
    order = itertools.count()
    order_lock = threading.Lock()  # next() alone is atomic only under a GIL
    stop = threading.Event()
    grad = torch.is_grad_enabled()  # thread-local in torch: carry the caller's over

    def drain() -> None:
        torch.set_grad_enabled(grad)  # this worker thread's own mode
        state = scratch()
        while not stop.is_set():
            with order_lock:
                i = next(order)
            if i >= len(bounds):
                return
            try:
                results[i] = run(state, *bounds[i])
            except BaseException:
                stop.set()
                raise

    with _LOCK:  # never submit to a pool that a bigger one is replacing
        pool = _pool(workers)
        assert pool is not None, "worker_count said the pool is usable"
        futures = [pool.submit(drain) for _ in range(workers)]
    try:
        for future in futures:
            future.result()
    finally:
        # An error or Ctrl-C: the others stop after their current chunk, and none
        # still writes into the caller's tensors once this returns.
        stop.set()
        wait(futures)
    return results  # type: ignore[return-value]


__all__ = ["caller_on_one_thread", "map_chunks", "worker_count"]
