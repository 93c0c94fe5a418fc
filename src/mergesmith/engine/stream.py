"""Execute a plan: read, merge, write, overlapped.

A reader thread converts input tensors to the compute dtype (zero-copy views of
memory-mapped safetensors, released from resident memory right after conversion) and
prefetches ahead of the math as long as the prefetched bytes stay under a budget; the
calling thread runs the method; a writer thread puts each result into the target
(``targets.py``). Work items are whole tensors or blocks of rows of one
(``merge_plan.row_spans``): the reader, the prefetch budget and the writer treat both
alike, and the blocks of a tensor give the whole-tensor merge bit for bit.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergesmith import malloc
from mergesmith.checks import pick_device
from mergesmith.engine.merge_plan import MergePlan, MergeResult, Span, TensorPlan, load_bytes, row_spans
from mergesmith.engine.options import MergeOptions
from mergesmith.engine.targets import CheckpointTarget, Target
from mergesmith.engine.tensor import load_inputs, run_method


def execute_plan(plan: MergePlan, out_dir: Path, options: MergeOptions) -> MergeResult:
    """Stream the plan into ``out_dir``; atomic: a failure or interrupt leaves no output directory."""
    target = CheckpointTarget(plan, out_dir, options.out_shard_size, overwrite=options.overwrite)
    seconds = stream(plan, target, options)
    return MergeResult(out_dir, plan, seconds, len(plan.tensors))


def stream(plan: MergePlan, target: Target, options: MergeOptions) -> float:
    """Stream the plan into ``target``, the calling thread's math on ``options.threads`` (default:
    torch's count); returns the seconds it took. The count is put back afterwards."""
    with _heap_reuse():
        threads = options.threads or torch.get_num_threads()
        try:
            return _stream(plan, target, options, threads)
        finally:
            torch.set_num_threads(threads)


def _stream(plan: MergePlan, target: Target, options: MergeOptions, threads: int) -> float:
    start = time.perf_counter()
    device = pick_device(options.device)
    with target, ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as write_pool:
        _start_single_threaded((reader, write_pool), threads)
        bar = tqdm(total=plan.bytes_to_read, unit="B", unit_scale=True, desc=f"merge ({plan.recipe.method.name})",
                   disable=not options.progress, file=sys.stderr)
        loads: deque[tuple[TensorPlan, Span, Future]] = deque()
        writes: deque[Future] = deque()
        in_flight = 0
        queue = ((task, span) for task in plan.tensors for span in row_spans(plan, task, options.chunk_bytes))
        done = False

        def fill() -> None:
            nonlocal in_flight, done
            while not done and (not loads or in_flight < options.prefetch_bytes):
                item = next(queue, None)
                if item is None:
                    done = True
                    return
                task, span = item
                in_flight += load_bytes(plan, task, span)
                loads.append((task, span, reader.submit(load_inputs, plan, task, device, options.allow_nonfinite,
                                                        span)))

        fill()
        while loads:
            task, span, future = loads.popleft()
            tensors, stats = future.result()
            in_flight -= load_bytes(plan, task, span)
            fill()
            out = run_method(plan, task, tensors, device, options.allow_nonfinite, stats, span)
            del tensors, stats
            while len(writes) >= 2:
                writes.popleft().result()
            if span is None:
                writes.append(write_pool.submit(target.write, task.name, out))
            else:
                writes.append(write_pool.submit(target.write, task.name, out, row=span[0]))
            # Whole tensors' bytes per block, so that the blocks of a tensor add up to it exactly.
            lo, hi = span or (0, 1)
            n = task.shape[0] if span else 1
            bar.update(task.input_bytes(plan) * hi // n - task.input_bytes(plan) * lo // n)
        for w in writes:
            w.result()
        target.finish()
    bar.close()
    return time.perf_counter() - start


@contextlib.contextmanager
def _heap_reuse():
    """Serve large allocations from glibc's heap instead of fresh mmaps while merging.

    By default glibc maps every allocation above 32 MiB anew and unmaps it on free, so each
    temporary tensor costs a page fault per 4 KiB page and the kernel zeroing it; measured on
    the 1.1B TIES benchmark that was a third of the run time (system time). Keeping freed
    memory in the heap lets the next tensor of the same size reuse it. glibc only; restored after.
    """
    libc = malloc.libc()
    if libc is None:
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = malloc.M_TRIM_THRESHOLD, malloc.M_MMAP_MAX, malloc.M_ARENA_MAX
    # One arena: the reader thread allocates the tensors the main thread frees; with an arena
    # per thread the freed memory could not serve the other thread and the heap would grow.
    libc.mallopt(M_ARENA_MAX, 1)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, 65536)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _start_single_threaded(pools: tuple[ThreadPoolExecutor, ...], math_threads: int) -> None:
    """Start each one-thread pool with a torch thread count of one, then give the calling
    thread ``math_threads``.

    torch keeps one count per thread, but a thread takes it, on its first parallel op, from
    the count some thread last asked for. A reader or writer that took the math's count of two
    would build an OpenMP team of its own on its first conversion, and keep it: with more
    OpenMP threads alive than cores, libgomp stops spinning at barriers and sleeps on a futex
    instead, and every barrier of the math's decompositions then costs two system calls.
    Measured on the 58M TSV-M family of benchmarks/bench_subspace.py (2 cores): one 512-wide
    float64 ``eigh`` took 19 ms alone and 70 ms beside an idle reader that had run one op at
    two threads; the merge took 20-24 s at ``--threads 2`` against 12-14 s at one, with 7.5 s
    of system time (docs/results.md, "Threads"). So the pools start while the shared count is
    one, build no team, and only then does the calling thread take ``math_threads`` (its own
    first parallel op comes first, so that the count it sets is the one it keeps).
    """
    torch.ones(1 << 16).sum()
    torch.set_num_threads(1)
    for pool in pools:
        pool.submit(_first_parallel_op).result()
    torch.set_num_threads(math_threads)


def _first_parallel_op() -> int:
    """Settle the calling pool thread's torch thread count (at the shared count, one here)."""
    torch.ones(1 << 16).sum()
    return torch.get_num_threads()
