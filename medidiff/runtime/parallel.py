"""Scan-level parallelism on one CPU machine: a few worker processes, one scan each at a time.

Scoring a scan is a network part (PyTorch, which uses every core it is given) and a serial
part (resampling, the 3D median filter, NIfTI compression, the PNG overlay) that runs on
one core. On a small CPU machine the serial part leaves the other cores idle, so
``W`` processes with ``cores / W`` PyTorch threads each finish a batch of scans sooner than
one process with all the threads once there are enough scans to pay for starting the
workers (each imports PyTorch and receives the model: a few seconds). Measured with
``pipelines/benchmark_workers.py`` on the 2-core reference machine, 2 workers of 1 thread
against 1 process of 2 threads: 16 scans 1.25x faster with the default method and 1.42x
with the no-network baseline; 6 scans 1.03x and 0.95x (benchmarks/RESULTS.md).

:func:`map_scans` sends one picklable ``shared`` object (a detector, with its model) to each
worker once, then calls ``fn(shared, item)`` for every item and yields the results **in
input order**. Results do not depend on the number of workers: every scan's noise comes
from seeds derived from the scan's name (:mod:`medidiff.anomaly.seeds`).
Under CUDA, or with ``workers=1``, everything runs in this process.

Workers are started with ``spawn`` (safe with PyTorch's thread pools, and the same on
Linux, macOS and Windows), ignore Ctrl-C (the parent stops them) and are terminated if
anything fails, so no orphan keeps computing.

Example:
    >>> list(map_scans(lambda shared, x: shared + x, 10, [1, 2, 3], workers=1))
    [11, 12, 13]
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["MAX_AUTO_WORKERS", "default_workers", "map_scans", "usable_cpus"]

T = TypeVar("T")
R = TypeVar("R")

#: the most workers chosen automatically (more rarely pays: each holds a model copy)
MAX_AUTO_WORKERS = 4

_SHARED: Any = None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(device: Any, items: int) -> int:
    """Worker processes for ``items`` scans: 1 on CUDA, else one per usable CPU (at most
    :data:`MAX_AUTO_WORKERS` and ``items``)."""
    if getattr(device, "type", str(device)) == "cuda":
        return 1
    return max(1, min(items, usable_cpus(), MAX_AUTO_WORKERS))


class _DeferredInterrupt:
    """Ctrl-C while worker processes start: recorded, raised once the pool exists.

    A terminal's Ctrl-C reaches every process of its foreground group. Started naively,
    a worker still importing PyTorch would print a KeyboardInterrupt traceback, and a Ctrl-C
    that stops the parent half-way through starting the pool would leave a worker loading
    state the parent then deletes (another traceback). So while the pool starts, Ctrl-C is
    only recorded here (:meth:`raise_if_interrupted` raises it once the pool can be
    terminated cleanly), and it is *ignored* for the moment each worker is forked and
    exec'ed: an ignored signal stays ignored across exec and Python then installs no
    handler of its own, so workers never see it (``multiprocessing.util.spawnv_passfds``,
    which the spawn start method calls for every child, is wrapped for that moment; a
    Ctrl-C during those few milliseconds is lost). Only the main thread can do this;
    elsewhere it does nothing.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._restore: list[Callable[[], None]] = []

    def __enter__(self) -> "_DeferredInterrupt":
        import signal
        import threading
        from multiprocessing import util

        if threading.current_thread() is not threading.main_thread():
            return self

        def record(signum: int, frame: Any) -> None:
            self.interrupted = True

        previous = signal.signal(signal.SIGINT, record)
        self._restore.append(lambda: signal.signal(signal.SIGINT, previous))
        original = getattr(util, "spawnv_passfds", None)
        if original is not None:

            def spawn_ignoring_sigint(*args: Any, **kwargs: Any) -> Any:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    return original(*args, **kwargs)
                finally:
                    signal.signal(signal.SIGINT, record)

            util.spawnv_passfds = spawn_ignoring_sigint
            self._restore.append(lambda: setattr(util, "spawnv_passfds", original))
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._restore:
            self._restore.pop()()

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt


def _init_worker(payload: bytes, threads: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    torch.set_num_threads(threads)
    global _SHARED
    _SHARED = pickle.loads(payload)


def _call(task: tuple[Callable[[Any, Any], Any], Any]) -> Any:
    fn, item = task
    return fn(_SHARED, item)


def map_scans(
    fn: Callable[[Any, T], R],
    shared: Any,
    items: Sequence[T],
    *,
    workers: int = 1,
    desc: str = "",
    progress: bool = False,
    unit: str = "scan",
) -> Iterator[R]:
    """``fn(shared, item)`` for every item, in ``workers`` processes, results in input order.

    Args:
        fn: a module-level function (it is pickled by name); exceptions it raises reach the
            caller unchanged.
        shared: what every call gets first, e.g. a detector; pickled once per worker.
        items: the work; each item is pickled to a worker.
        workers: processes; ``<= 1`` runs in this process (no pickling at all).
        desc: progress label.
        progress: report progress over items (:class:`~medidiff.runtime.progress.Progress`:
            a bar on a terminal, a plain line every 30 s in a log).
        unit: what an item is called in the progress report.

    Yields:
        The results, in the order of ``items``.
    """
    from medidiff.runtime.progress import Progress

    items = list(items)
    workers = max(1, min(int(workers), len(items)))
    bar = Progress(len(items), desc, unit=unit, enabled=progress)
    try:
        if workers == 1:
            for item in items:
                yield fn(shared, item)
                bar.update(1)
            return
        import multiprocessing

        import torch

        payload = pickle.dumps(shared)
        threads = max(1, torch.get_num_threads() // workers)
        with _DeferredInterrupt() as deferred:
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(payload, threads)
            )
        try:
            deferred.raise_if_interrupted()
            for result in pool.imap(_call, [(fn, item) for item in items], chunksize=1):
                yield result
                bar.update(1)
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
    finally:
        bar.close()
