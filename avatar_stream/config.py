"""Server settings, shared by the CLI, the server and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server handed to both peers (TURN needs username and credential)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"urls": list(self.urls)}
        if self.username is not None:
            out["username"] = self.username
        if self.credential is not None:
            out["credential"] = self.credential
        return out


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    engine: str = "warp"
    avatar: str | None = None  # path of the reference photo; None = the bundled default
    avatars_dir: str | None = None  # --avatars DIR: every usable portrait in it is an avatar
    ice_servers: list[IceServer] = field(default_factory=list)
    # restrict the server's ICE host candidates (and accepted remote ones) to these
    # addresses; None = every interface
    ice_host_addresses: list[str] | None = None
    max_sessions: int = 8
    speech_queue_s: float = 60.0
    connect_timeout_s: float = 30.0
    engine_threads: int | None = None  # None: the engine's own choice
    # -- pushed speech ---------------------------------------------------------------
    utterance_idle_end_s: float = 1.0  # an open utterance with nothing queued ends after this
    max_audio_bytes: int = 16 * 1024 * 1024  # one POST .../audio body
    max_ws_message_bytes: int = 1024 * 1024  # one WebSocket / data channel message
    # -- security and limits ---------------------------------------------------------
    api_key: str | None = None  # None: /v1 is open; else Bearer key (or a session token)
    token_secret: bytes | None = None  # None: a random one per process
    token_ttl_s: float | None = None  # None: the session's maximum duration
    cors_origins: list[str] = field(default_factory=list)  # "*" for any
    session_idle_timeout_s: float = 900.0  # no speech, no calls: the session ends (0: never)
    session_max_duration_s: float = 4 * 3600.0  # 0: unlimited
    sessions_per_ip_per_minute: int = 30  # session creations per client address (0: no limit)
    trust_forwarded_for: bool = False  # take the client address from X-Forwarded-For
    # -- text to speech (POST .../say) -----------------------------------------------
    tts: str = "espeak"  # "espeak" (offline), "openai" (an OpenAI-compatible endpoint), "off"
    tts_url: str | None = None  # e.g. http://127.0.0.1:8000/v1/audio/speech
    tts_model: str = "tts-1"
    tts_voice: str | None = None  # None: the backend's default (espeak en-us, openai alloy)
    tts_api_key: str | None = None
    tts_format: str = "wav"  # what to ask the endpoint for: "wav" or "pcm" (24 kHz s16le)
    tts_timeout_s: float = 30.0
    tts_max_chars: int = 2000
    tts_concurrency: int = 2  # syntheses at once, server-wide
    # -- engine options, TURN, replicas (deployment) -------------------------------
    engine_options: dict[str, Any] = field(default_factory=dict)  # create_engine(engine, **...)
    turn_urls: list[str] = field(default_factory=list)  # handed out with fresh credentials
    turn_secret: str | None = None  # coturn's static-auth-secret (TURN REST API scheme)
    turn_ttl_s: float = 6 * 3600.0
    advertise: str | None = None  # "ADDR:PORT" peers reach this replica at; ids carry it
    peers: str | None = None  # DNS name of every replica: forward other replicas' sessions
    workers: int = 1  # processes that run sessions (workers.py); 1: this process runs them
