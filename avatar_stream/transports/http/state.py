"""What one server process holds: its engine, sessions, avatars, limits and metrics.

The front of ``--workers`` holds no engine (``engine`` and ``worker`` are None): its
sessions, renders and engine steps all run in the worker processes.

Apart from ``server.py`` so that the route modules (``avatars_api.py``) reach the state
through the application's key without importing the server that imports them.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from avatar_stream.audio.tts import TTS
from avatar_stream.config import ServerConfig
from avatar_stream.core.session import Session
from avatar_stream.core.worker import EngineWorker
from avatar_stream.engines.base import Avatar, Engine
from avatar_stream.scale.capacity import CapacityCollector, admission_limit
from avatar_stream.scale.metrics import Metrics
from avatar_stream.transports.http.auth import Guard, RateLimiter, TokenIssuer

if TYPE_CHECKING:
    from avatar_stream.scale.workers import WorkerPool


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine | None
    worker: EngineWorker | None
    avatars: dict[str, Avatar]
    sessions: dict[str, Session] = field(default_factory=dict)
    metrics: Metrics = field(init=False)
    guard: Guard = field(init=False)
    creations: RateLimiter = field(init=False)
    tts: TTS | None = None
    tts_slots: asyncio.Semaphore = field(init=False)
    ended: OrderedDict[str, str] = field(default_factory=OrderedDict)  # id -> why it ended
    pool: WorkerPool | None = None  # --workers: sessions run in these processes, not here

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: list(self.sessions.values()))
        self.metrics.registry.register(
            CapacityCollector(lambda: self.engine, lambda: self.max_sessions)
        )
        self.guard = Guard(self.config.api_key, TokenIssuer(self.config.token_secret))
        self.creations = RateLimiter(self.config.sessions_per_ip_per_minute)
        self.tts_slots = asyncio.Semaphore(max(1, self.config.tts_concurrency))

    @property
    def token_ttl_s(self) -> float:
        ttl = self.config.token_ttl_s
        if ttl is None:  # outlive the session a little: after it, callers learn it ended (410)
            ttl = (self.config.session_max_duration_s or 24 * 3600.0) + 300.0
        return ttl

    @property
    def max_sessions(self) -> int:
        """--max-sessions, capped by what a GPU engine measured it serves in real time."""
        if self.engine is None:  # the front: each worker admits its share
            return self.config.max_sessions
        return admission_limit(self.config.max_sessions, self.engine)

    @property
    def has_capacity(self) -> bool:
        return len(self.sessions) < self.max_sessions


STATE = web.AppKey("state", ServerState)
