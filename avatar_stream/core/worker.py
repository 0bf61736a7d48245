"""The engine worker: runs engine steps for every session on its own threads.

One worker per engine. A GPU engine asks for one thread (it owns the CUDA context); the
CPU engine for a few, so that sessions' steps seldom queue behind each other. Awaiting a
step suspends only the session that asked. Work that needs no device (a GPU engine's
cached idle frames) can go to a separate CPU pool, so it never waits behind other
sessions' device steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class EngineWorker:
    def __init__(self, threads: int, cpu_threads: int = 0) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="engine")
        self._cpu_pool = (
            ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="engine-cpu")
            if cpu_threads else self._pool
        )
        self.steps = 0
        self.busy_s = 0.0

    async def run(
        self, fn: Callable[..., T], *args: object, on_device: bool = True
    ) -> tuple[T, float]:
        """Run ``fn(*args)`` on a worker thread (the CPU pool when ``on_device`` is False);
        returns its result and its run time."""
        loop = asyncio.get_running_loop()
        pool = self._pool if on_device else self._cpu_pool

        def timed() -> tuple[T, float]:
            t = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - t

        result, elapsed = await loop.run_in_executor(pool, timed)
        self.steps += 1
        self.busy_s += elapsed
        return result, elapsed

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._cpu_pool is not self._pool:
            self._cpu_pool.shutdown(wait=True, cancel_futures=True)
