"""Server settings, shared by the CLI, the server and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    ice_servers: list[IceServer] = field(default_factory=list)
    # restrict the server's ICE host candidates (and accepted remote ones) to these
    # addresses; None = every interface
    ice_host_addresses: list[str] | None = None
    max_sessions: int = 8
    speech_queue_s: float = 60.0
    connect_timeout_s: float = 30.0
    engine_threads: int | None = None  # None: the engine's own choice
