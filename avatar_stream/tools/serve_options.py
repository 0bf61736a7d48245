"""``avatar-stream serve`` options for pushed speech, access control, limits and TTS.

Secrets (the API key, the token secret, the TTS endpoint's key) are better given through
the environment than on the command line, where ``ps`` shows them to every local user.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_cli_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("access and limits")
    g.add_argument("--api-key", default=os.environ.get("AVATAR_STREAM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (a session's own calls "
                        "also accept its token); env AVATAR_STREAM_API_KEY. Default: open")
    g.add_argument("--token-secret", default=os.environ.get("AVATAR_STREAM_TOKEN_SECRET"),
                   help="HMAC secret for session tokens (default: random per process); "
                        "env AVATAR_STREAM_TOKEN_SECRET")
    g.add_argument("--token-ttl", type=float, metavar="S",
                   help="session token lifetime (default: the maximum session duration + 300)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow this browser origin to call /v1 (repeatable; '*' for any)")
    g.add_argument("--session-idle-timeout", type=float, default=900.0, metavar="S",
                   help="end a session after S seconds with no speech and no calls "
                        "(default 900; 0: never)")
    g.add_argument("--session-max-duration", type=float, default=4 * 3600.0, metavar="S",
                   help="end every session after S seconds (default 14400; 0: unlimited)")
    g.add_argument("--sessions-per-ip", type=int, default=30, metavar="N",
                   help="session creations per client address per minute; more get 429 "
                        "(default 30; 0: no limit)")
    g.add_argument("--trust-x-forwarded-for", action="store_true",
                   help="take the client address from X-Forwarded-For (only behind a proxy "
                        "that sets it)")
    g.add_argument("--speech-queue", type=float, default=60.0, metavar="S",
                   help="seconds of speech a session may queue ahead; more get 429 (default 60)")
    g.add_argument("--max-audio-bytes", type=int, default=16 * 1024 * 1024, metavar="N",
                   help="largest POST .../audio body (default 16 MiB)")
    g.add_argument("--max-message-bytes", type=int, default=1024 * 1024, metavar="N",
                   help="largest WebSocket / data channel message (default 1 MiB)")
    g.add_argument("--utterance-idle-end", type=float, default=1.0, metavar="S",
                   help="an utterance left open with nothing queued ends after S seconds "
                        "without audio (default 1)")

    t = p.add_argument_group("text to speech (POST /v1/sessions/{id}/say)")
    t.add_argument("--tts", choices=["espeak", "openai", "off"], default="espeak",
                   help="espeak: espeak-ng, offline (default); openai: an OpenAI-compatible "
                        "/v1/audio/speech endpoint (--tts-url); off")
    t.add_argument("--tts-url", metavar="URL",
                   help="e.g. http://127.0.0.1:8000/v1/audio/speech")
    t.add_argument("--tts-model", default="tts-1", help="model name sent to the endpoint")
    t.add_argument("--tts-voice", help="voice (espeak default en-us, openai default alloy)")
    t.add_argument("--tts-api-key", default=os.environ.get("AVATAR_STREAM_TTS_API_KEY"),
                   help="Bearer key for the endpoint; env AVATAR_STREAM_TTS_API_KEY")
    t.add_argument("--tts-format", choices=["wav", "pcm"], default="wav",
                   help="response_format asked of the endpoint (pcm: 24 kHz s16le)")
    t.add_argument("--tts-timeout", type=float, default=30.0, metavar="S")
    t.add_argument("--tts-max-chars", type=int, default=2000, metavar="N")


def config_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerConfig fields these options set (exits with a message when they clash)."""
    if args.tts == "openai" and not args.tts_url:
        raise SystemExit("avatar-stream: --tts openai needs --tts-url (an /v1/audio/speech URL)")
    return {
        "api_key": args.api_key or None,
        "token_secret": args.token_secret.encode() if args.token_secret else None,
        "token_ttl_s": args.token_ttl,
        "cors_origins": args.cors_origin,
        "session_idle_timeout_s": args.session_idle_timeout,
        "session_max_duration_s": args.session_max_duration,
        "sessions_per_ip_per_minute": args.sessions_per_ip,
        "trust_forwarded_for": args.trust_x_forwarded_for,
        "speech_queue_s": args.speech_queue,
        "max_audio_bytes": args.max_audio_bytes,
        "max_ws_message_bytes": args.max_message_bytes,
        "utterance_idle_end_s": args.utterance_idle_end,
        "tts": args.tts,
        "tts_url": args.tts_url,
        "tts_model": args.tts_model,
        "tts_voice": args.tts_voice,
        "tts_api_key": args.tts_api_key,
        "tts_format": args.tts_format,
        "tts_timeout_s": args.tts_timeout,
        "tts_max_chars": args.tts_max_chars,
    }
