"""``charrnn serve`` (also ``charrnn-serve``): the HTTP server on a trained model."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ..apps.server import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, MAX_CONCURRENT, MAX_LENGTH, make_server
from ..config import SAMPLE_DEFAULTS
from ..errors import ConfigError
from ..generation.sampler import load
from .options import add_runtime_options, new_parser, run_cli

HELP = "serve a trained model over HTTP"


def build_parser(prog: str = "charrnn-serve") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Serve a trained charrnn model over HTTP: POST /complete (JSON, or server-sent events "
        'with "stream": true) and GET /health.',
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind; anything but 127.0.0.1 opens the model to the network"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free port)")
    add_runtime_options(parser)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="most characters one request may ask for")
    parser.add_argument(
        "--default-length",
        type=int,
        default=None,
        help=f"characters when a request gives no length (default: {SAMPLE_DEFAULTS.length}, at most --max-length)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body accepted")
    parser.add_argument("--max-concurrent", type=int, default=MAX_CONCURRENT, help="generations running at once; others wait")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    return parser


def run(argv: list[str], prog: str = "charrnn-serve") -> int:
    args = build_parser(prog).parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    limits = dict(
        max_length=args.max_length,
        default_length=args.default_length,
        max_body_bytes=args.max_body_bytes,
        max_concurrent=args.max_concurrent,
        quiet=args.quiet,
    )
    sampler = load(args.checkpoint, device=args.device, dtype=args.precision)
    try:
        server = make_server(sampler, args.host, args.port, **limits)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach it can use this model", file=sys.stderr)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    print(f"charrnn-serve: listening on {server.url} (POST /complete, GET /health; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("charrnn-serve: stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn-serve") -> int:
    """Entry point of ``charrnn-serve`` / ``charrnn serve``."""
    return run_cli(lambda args: run(args, prog), argv)
