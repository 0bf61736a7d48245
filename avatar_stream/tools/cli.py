"""The ``avatar-stream`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from avatar_stream.config import IceServer, ServerConfig
from avatar_stream.engines.flashhead.config import add_cli_options as add_flashhead_options
from avatar_stream.engines.flashhead.config import engine_options
from avatar_stream.engines.registry import CPU_ENGINES, ENGINES
from avatar_stream.scale.routing import add_cli_options as add_replica_options
from avatar_stream.scale.workers import default_workers
from avatar_stream.tools.serve_options import add_cli_options as add_speech_options
from avatar_stream.tools.serve_options import config_options as speech_options
from avatar_stream.transports.webrtc.ice import parse_addresses
from avatar_stream.transports.webrtc.turn import add_cli_options as add_turn_options


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the avatar server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--engine", default="warp", choices=ENGINES,
                   help="animation engine (default warp, CPU)")
    p.add_argument("--avatar", metavar="IMAGE", help="reference photo with one clear face "
                   "(default: a bundled public-domain portrait)")
    p.add_argument("--avatars", metavar="DIR", help="also load every portrait in this folder "
                   "as an avatar (id = file name); sessions pick one by id")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions at once; more get 503")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN URL handed to the peers (repeatable), e.g. turn:host:3478")
    p.add_argument("--ice-username", help="username for the TURN servers")
    p.add_argument("--ice-credential", help="credential for the TURN servers")
    p.add_argument("--ice-host-addresses", metavar="ADDR[,ADDR]",
                   help="only offer/accept ICE host candidates on these addresses "
                        "(e.g. 127.0.0.1 for loopback-only tests)")
    p.add_argument("--engine-threads", type=int, help="engine worker threads")
    p.add_argument("--workers", default="auto", metavar="N|auto",
                   help="processes that run sessions; auto (default): one more than the "
                        "cores for a CPU engine; one on a single core, for a GPU engine or "
                        "with --advertise")
    add_flashhead_options(p)
    add_turn_options(p)
    add_replica_options(p)
    add_speech_options(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    from avatar_stream.tools.doctor import add_parser

    add_parser(sub)


def _workers(args: argparse.Namespace, config: ServerConfig) -> int:
    if args.workers == "auto":
        return default_workers(config)
    try:
        workers = int(args.workers)
    except ValueError:
        workers = 0
    if workers < 1:
        raise SystemExit(f"avatar-stream: --workers must be a number of processes or auto, "
                         f"not {args.workers!r}")
    if workers > 1 and config.engine not in CPU_ENGINES:
        raise SystemExit(f"avatar-stream: --workers above 1 is for CPU engines "
                         f"({', '.join(CPU_ENGINES)}): one process owns the GPU")
    if workers > 1 and config.advertise:
        raise SystemExit("avatar-stream: --workers above 1 cannot be combined with --advertise "
                         "(session ids name one address per replica)")
    return workers


def serve_config(args: argparse.Namespace) -> ServerConfig:
    ice = [
        IceServer((url,), args.ice_username, args.ice_credential)
        if url.startswith("turn")
        else IceServer((url,))
        for url in args.ice_server
    ]
    hosts = parse_addresses(args.ice_host_addresses)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        engine=args.engine,
        avatar=args.avatar,
        avatars_dir=args.avatars,
        ice_servers=ice,
        ice_host_addresses=hosts,
        max_sessions=args.max_sessions,
        engine_threads=args.engine_threads,
        engine_options=engine_options(args),
        turn_urls=args.turn_url,
        turn_secret=args.turn_secret,
        turn_ttl_s=args.turn_ttl,
        advertise=args.advertise,
        peers=args.peers,
        **speech_options(args),
    )
    return replace(config, workers=_workers(args, config))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="avatar-stream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_doctor(sub)
    from avatar_stream.bench.cli import add_parser as add_bench

    add_bench(sub)
    from avatar_stream.avatars import ranking as avatars
    from avatar_stream.tools import render  # `render` and `avatars rank` subcommands

    render.add_parser(sub)
    avatars.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "serve":
        from avatar_stream.transports.http.app import run

        run(serve_config(args))
    elif args.command == "doctor":
        from avatar_stream.tools.doctor import main as doctor_main

        raise SystemExit(doctor_main(args))
    elif args.command in ("render", "avatars"):
        raise SystemExit((render if args.command == "render" else avatars).main(args))
    elif args.command == "bench":
        from avatar_stream.bench.cli import main as bench_main

        raise SystemExit(bench_main(args))


if __name__ == "__main__":
    main()
