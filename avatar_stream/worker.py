"""The engine worker: runs engine steps for every session on its own threads.

One worker per engine. A GPU engine asks for one thread (it owns the CUDA context); the
CPU engine for one per core. Awaiting a step suspends only the session that asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class EngineWorker:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="engine")
        self.steps = 0
        self.busy_s = 0.0

    async def run(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """Run ``fn(*args)`` on a worker thread; returns its result and its run time."""
        loop = asyncio.get_running_loop()

        def timed() -> tuple[T, float]:
            t = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - t

        result, elapsed = await loop.run_in_executor(self._pool, timed)
        self.steps += 1
        self.busy_s += elapsed
        return result, elapsed

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
