"""Short-lived TURN credentials from a shared secret (the "TURN REST API" scheme).

coturn (``use-auth-secret`` + ``static-auth-secret``) accepts any username of the form
``<expiry unix time>:<user>`` whose password is ``base64(HMAC-SHA1(secret, username))``,
until that expiry. The server and coturn share only the secret; each new session gets its
own credentials, so a leaked one stops working after its TTL and no user list is kept.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import time

from avatar_stream.config import IceServer, ServerConfig

DEFAULT_TTL_S = 6 * 3600  # outlives a session's ICE restarts; short enough to be worthless later


def turn_credentials(secret: str | bytes, user: str = "avatar", ttl_s: float = DEFAULT_TTL_S,
                     now: float | None = None) -> tuple[str, str]:
    """(username, credential) valid for ``ttl_s`` seconds from ``now``."""
    if ":" in user:
        raise ValueError("the TURN user part may not contain ':'")
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{user}"
    return username, _credential(secret, username)


def _credential(secret: str | bytes, username: str) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def check_credentials(secret: str | bytes, username: str, credential: str,
                      now: float | None = None) -> bool:
    """What coturn does with them: the HMAC matches and the expiry has not passed."""
    expiry, _, _ = username.partition(":")
    if not expiry.isdigit() or int(expiry) < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(_credential(secret, username), credential)


def session_ice_servers(config: ServerConfig, user: str = "avatar") -> list[IceServer]:
    """The ICE servers for one new session: the static ones plus, with a TURN secret, the
    TURN URLs with freshly minted credentials."""
    servers = list(config.ice_servers)
    if config.turn_secret and config.turn_urls:
        username, credential = turn_credentials(config.turn_secret, user, config.turn_ttl_s)
        servers.append(IceServer(tuple(config.turn_urls), username, credential))
    return servers


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TURN (short-lived credentials from a shared secret)")
    g.add_argument("--turn-url", action="append", default=[], metavar="URL",
                   help="TURN URL handed to each session with fresh credentials (repeatable), "
                        "e.g. turn:turn.example.com:3478?transport=udp")
    g.add_argument("--turn-secret", default=os.environ.get("TURN_SECRET"),
                   help="coturn's static-auth-secret (default: $TURN_SECRET)")
    g.add_argument("--turn-ttl", type=float, default=DEFAULT_TTL_S, metavar="SECONDS",
                   help=f"credential lifetime (default {DEFAULT_TTL_S} s)")
