"""Runs one function over many work shards: in this process, in a local process pool, or on a Ray
cluster. Results come back as they finish, with the shard's index, so the caller can write each one
at once (that is what makes an interrupted run resumable) and merge them later in index order (that is
what makes every executor give the same output). At most two shards per worker are in flight, so
memory stays bounded however large the input."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lmkiln.errors import UserError

Task = tuple[int, tuple]


def map_shards(
    fn: Callable[..., Any],
    tasks: Iterable[Task],
    executor: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield (index, fn(*args)) for each (index, args) in `tasks`, in completion order."""
    workers = workers or os.cpu_count() or 1
    tasks = iter(tasks)
    if executor == "ray":
        yield from _ray(fn, tasks, workers, ray_address)
        return
    head = list(itertools.islice(tasks, 2))
    if workers == 1 or len(head) < 2:  # a pool costs a second per worker to start; one shard needs none
        for index, args in itertools.chain(head, tasks):
            yield index, fn(*args)
        return
    yield from _pool(fn, itertools.chain(head, tasks), workers)


def _pool(fn, tasks: Iterator[Task], workers: int) -> Iterator[tuple[int, Any]]:
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield from _pool_map(fn, tasks, workers)
    except BrokenProcessPool:
        raise UserError(
            "a data worker process died (out of memory, or killed). If you call lmkiln from your own "
            "script, put the call under `if __name__ == '__main__':` (worker processes import the "
            "script again), or set data.workers=1"
        ) from None


def _pool_map(fn, tasks: Iterator[Task], workers: int) -> Iterator[tuple[int, Any]]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn, not fork: the driver runs a progress thread, and forking a threaded process can deadlock.
    # Workers ignore Ctrl-C: the driver takes it, lets running shards finish and stops cleanly.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)
    pending: dict = {}
    try:
        for index, args in tasks:
            while len(pending) >= 2 * workers:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
            pending[pool.submit(fn, *args)] = index
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ray(fn, tasks: Iterator[Task], workers: int, address: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import ray
    except ImportError:
        raise UserError("data.executor=ray needs Ray: pip install 'lmkiln[ray]'") from None
    started = not ray.is_initialized()
    if started:
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        else:  # a local instance sized to data.workers
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    remote = ray.remote(fn)
    capacity = 2 * max(int(ray.cluster_resources().get("CPU", workers)), 1)
    pending: dict = {}
    try:
        for index, args in tasks:
            while len(pending) >= capacity:
                yield from _ray_collect(ray, pending)
            pending[remote.remote(*args)] = index
        while pending:
            yield from _ray_collect(ray, pending)
    finally:
        for ref in pending:
            ray.cancel(ref)
        if started:
            ray.shutdown()


def _ray_collect(ray, pending: dict) -> Iterator[tuple[int, Any]]:
    ready, _ = ray.wait(list(pending), num_returns=1)
    for ref in ready:
        yield pending.pop(ref), ray.get(ref)
